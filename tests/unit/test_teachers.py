"""Several teachers, the student as its own teacher, and teachers with their own chat template
(effopd_jax/teachers.py), against independent references.

References: each teacher's log-probs of a row come from one *unpadded* forward of that row alone
(``models.forward`` logits, a float64 numpy log-softmax at the sampling temperature), the
multi-teacher G-OPD / ExOPD advantage from a numpy transcription of the authors' per-row rule
(``dp_actor.py:494-519``, docs/opd_loss.md#advantage), the mixture from numpy's logaddexp, and
teacher input ids from the tokenizer's own encoding of the rendered prompt.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax import data, losses, models, objectives
from effopd_jax import sharding as sharding_lib
from effopd_jax.config import default_config
from effopd_jax.models.qwen import QwenConfig
from effopd_jax.objectives import LossSettings, OPDBatch
from effopd_jax.rollout import Rollout
from effopd_jax.teachers import (
    DEFAULT_CONTEXT_TEMPLATE,
    Teacher,
    TeacherPrompts,
    TeacherSet,
    default_rows_per_forward,
    fill_context,
    privileged_messages,
)
from effopd_jax.trainer import FullFineTuning, make_optimizer, new_train_state, update_step
from helpers_tiny import QWEN3_TOKENIZER_DIR

VOCAB, PROMPT, NEW = 40, 5, 4
CONFIG = QwenConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype=jnp.float32,
                    tie_word_embeddings=True)
OTHER_CONFIG = dataclasses.replace(CONFIG, hidden_size=24, intermediate_size=48, num_hidden_layers=1)
TAGS = ("math", "code", "poetry", "math", "code", "math", "poetry", "code")
ROWS = len(TAGS)


@pytest.fixture(scope="module")
def mesh():
    return sharding_lib.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def student_params():
    return models.init_params(CONFIG, jax.random.key(1))


@pytest.fixture(scope="module")
def other_params():
    return models.init_params(OTHER_CONFIG, jax.random.key(2))


def _example(index: int, prompt_ids, *, tag: str = "math", messages=None, solution=None) -> data.PromptExample:
    messages = messages or [{"role": "user", "content": f"problem {index}"}]
    return data.PromptExample(example_id=index, origin=f"test:{index}", prompt_token_ids=np.asarray(prompt_ids, np.int32),
                               prompt_text="", messages=messages, answer="1", data_source=tag, solution=solution,
                               route_tag=tag)


@pytest.fixture(scope="module")
def routed_rollout():
    """Hand-made rows: left-padded prompts of 2..5 tokens, responses of 1..4 tokens. The first
    response token of row r is r + 1, so a stub teacher can tell which row it was given."""
    rng = np.random.RandomState(0)
    prompts = [rng.randint(1, VOCAB, size=2 + r % 4) for r in range(ROWS)]
    ids, mask = data.left_pad(prompts, 0, PROMPT)
    response = rng.randint(1, VOCAB, size=(ROWS, NEW)).astype(np.int32)
    response[:, 0] = np.arange(ROWS) + 1
    lengths = 1 + np.arange(ROWS) % NEW
    response_mask = np.arange(NEW)[None, :] < lengths[:, None]
    rollout = Rollout(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(response), jnp.asarray(response_mask),
                      jnp.zeros((ROWS, NEW), jnp.float32))
    examples = [_example(r, p, tag=tag) for r, (p, tag) in enumerate(zip(prompts, TAGS))]
    return rollout, examples


# One compiled program per row length rather than op-by-op dispatch (the reference's own forward).
_jitted_forward = jax.jit(models.forward, static_argnums=0)


def _unpadded_logprobs(config, params, prompt, response, temperature=1.0) -> np.ndarray:
    """log pi(response_t | prompt, response_<t) of one row from a forward of that row alone."""
    ids = np.concatenate([prompt, response]).astype(np.int32)[None]
    logits = np.asarray(_jitted_forward(config, params, jnp.asarray(ids)), np.float64)[0] / temperature
    logits = logits[len(prompt) - 1 : len(ids[0]) - 1]
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logits[np.arange(len(response)), response] - logz


def _row_reference(config, params, rollout: Rollout, row: int, temperature=1.0) -> np.ndarray:
    prompt = np.asarray(rollout.prompt_ids[row])[np.asarray(rollout.prompt_mask[row])]
    length = int(np.asarray(rollout.response_mask[row]).sum())
    return _unpadded_logprobs(config, params, prompt, np.asarray(rollout.response_ids[row])[:length], temperature)


class Recording(Teacher):
    """A teacher that remembers every sub-rollout it was asked to score."""

    def __post_init__(self):
        super().__post_init__()
        self.calls: list[Rollout] = []

    def score(self, rollout, batch):
        self.calls.append(jax.tree.map(np.asarray, rollout))
        return super().score(rollout, batch)


def _teacher(name, config, params, cls=Teacher, **kwargs):
    return cls(name=name, config=config, params=params, output="token_logprobs", temperature=1.0, chunk_size=2,
               **kwargs)


# ---------------------------------------------------------------------------------------------
# Routing


def test_rows_are_routed_by_tag_each_teacher_forwards_only_its_rows_and_unknown_tags_go_to_the_default(
        mesh, student_params, other_params, routed_rollout):
    rollout, examples = routed_rollout
    a = _teacher("A", CONFIG, student_params, Recording, data_sources=("math",), rows_per_forward=2)
    b = _teacher("B", OTHER_CONFIG, other_params, Recording, data_sources=("code",), rows_per_forward=2)
    teachers = TeacherSet([a, b], mesh=mesh, routing="data_source", default_teacher="B", rows_per_step=ROWS)
    teachers.prepare(examples, log=lambda *a: None)
    batch, stats = teachers.score_with_stats(rollout, OPDBatch(*rollout), example_ids=np.arange(ROWS))

    owner = {"math": (a, CONFIG, student_params), "code": (b, OTHER_CONFIG, other_params),
             "poetry": (b, OTHER_CONFIG, other_params)}  # poetry: nobody lists it -> the default, B
    mask = np.asarray(rollout.response_mask)
    for row, tag in enumerate(TAGS):
        _, config, params = owner[tag]
        np.testing.assert_allclose(np.asarray(batch.teacher_logprobs)[row][mask[row]],
                                   _row_reference(config, params, rollout, row), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(batch.teacher_rows),
                                  [[tag == "math", tag != "math"] for tag in TAGS])
    assert stats.routed_rows.tolist() == [3, 5] and stats.skipped_rows.tolist() == [0, 0]
    # No wasted forwards: A's 3 rows in sub-batches of 2 (one padding row), B's 5 likewise; each
    # sub-batch holds the teacher's own rows (the first response token is row + 1).
    for teacher, rows in ((a, [0, 3, 5]), (b, [1, 2, 4, 6, 7])):
        assert [call.response_ids.shape[0] for call in teacher.calls] == [2] * ((len(rows) + 1) // 2)
        seen = np.concatenate([call.response_ids[:, 0] - 1 for call in teacher.calls])
        assert sorted(set(seen.tolist())) == rows and len(seen) == len(rows) + len(rows) % 2
        for call in teacher.calls:
            np.testing.assert_array_equal(call.response_ids, np.asarray(rollout.response_ids)[call.response_ids[:, 0] - 1])


def test_a_tag_no_teacher_lists_is_refused_without_a_default(mesh, student_params, other_params, routed_rollout):
    _, examples = routed_rollout
    teachers = TeacherSet([_teacher("A", CONFIG, student_params, data_sources=("math",)),
                           _teacher("B", OTHER_CONFIG, other_params, data_sources=("code",))],
                          mesh=mesh, routing="data_source")
    with pytest.raises(ValueError, match=r"2 training rows have a routing tag no teacher lists \(\[\('poetry', 2\)\]; "
                                         r"first: test:2\).*routing.default_teacher"):
        teachers.prepare(examples, log=lambda *a: None)
    with pytest.raises(ValueError, match="tag 'math' is listed by 'A' and 'B'"):
        TeacherSet([_teacher("A", CONFIG, student_params, data_sources=("math",)),
                    _teacher("B", OTHER_CONFIG, other_params, data_sources=("math",))], mesh=mesh, routing="data_source")


def test_a_copy_of_the_student_has_exactly_zero_reverse_kl_in_the_update(mesh, student_params, other_params,
                                                                          routed_rollout):
    """The per-teacher reverse KL of the update: 0 (exactly) for A = the student's own weights."""
    rollout, examples = routed_rollout
    teachers = TeacherSet([_teacher("A", CONFIG, student_params, data_sources=("math",)),
                           _teacher("B", OTHER_CONFIG, other_params, data_sources=("code", "poetry"))],
                          mesh=mesh, routing="data_source", rows_per_step=ROWS)
    teachers.prepare(examples, log=lambda *a: None)
    batch, stats = teachers.score_with_stats(rollout, OPDBatch(*rollout), example_ids=np.arange(ROWS))
    config = default_config()
    optimizer, _ = make_optimizer(config.optimizer, total_steps=1, effopd_config=config.effopd,
                                  param_filter=lambda path: True)
    state = new_train_state(student_params, optimizer, seed=0, mesh=mesh)
    step = jax.jit(functools.partial(update_step, optimizer=optimizer, model_config=CONFIG,
                                     parameterization=FullFineTuning(), loss=objectives.get_loss("sampled_token"),
                                     settings=LossSettings(chunk_size=2)))
    _, metrics = step(state, batch, {})
    figures = teachers.step_metrics(stats, jax.device_get(metrics))
    # A's log-probs are bit for bit the student's plain forward (routing gathers rows exactly) ...
    plain = np.asarray(jax.jit(functools.partial(objectives.response_logprobs, CONFIG, temperature=1.0,
                                                 chunk_size=2))(student_params, *rollout[:4]))
    rows_a = np.asarray([t == "math" for t in TAGS])[:, None] & np.asarray(rollout.response_mask)
    np.testing.assert_array_equal(np.asarray(batch.teacher_logprobs)[rows_a], plain[rows_a])
    # ... and the update's student log-probs come from the forward inside value_and_grad, which
    # XLA fuses differently: reverse_kl/A is 0 to float32 rounding, not bit for bit.
    assert abs(figures["reverse_kl/A"]) < 1e-6
    assert abs(figures["reverse_kl/B"]) > 1e-3  # random tiny models are near-uniform: small, but 1000x
    assert (figures["routed_rows/A"], figures["routed_rows/B"]) == (3, 5)
    # Token-weighted, the two teachers' figures make up the batch's sampled reverse KL.
    mask = np.asarray(rollout.response_mask)
    tokens = [mask[[t == "math" for t in TAGS]].sum(), mask[[t != "math" for t in TAGS]].sum()]
    pooled = (figures["reverse_kl/A"] * tokens[0] + figures["reverse_kl/B"] * tokens[1]) / sum(tokens)
    assert pooled == pytest.approx(float(metrics["sampled_reverse_kl"]), rel=1e-5, abs=1e-6)


def test_capacity_rule():
    assert default_rows_per_forward(1024, 2, 8) == 128
    assert default_rows_per_forward(8, 2, 1) == 1
    assert default_rows_per_forward(8, 2, 4) == 4
    assert default_rows_per_forward(6, 1, 4) == 4  # at most the rows, at least one per shard
    assert default_rows_per_forward(3, 1, 4) == 3


def test_rows_per_forward_must_split_over_the_batch_shards(student_params):
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    mesh2 = sharding_lib.make_mesh(data=2, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="rows_per_forward=3 is not a multiple of the mesh's batch shards"):
        TeacherSet([_teacher("A", CONFIG, student_params, rows_per_forward=3)], mesh=mesh2)


def test_routed_scoring_on_a_sharded_mesh_equals_one_device(mesh, student_params, other_params, routed_rollout):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    rollout, examples = routed_rollout
    results = []
    for m in (mesh, sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)):
        teachers = TeacherSet([_teacher("A", CONFIG, student_params, data_sources=("math",)),
                               _teacher("B", OTHER_CONFIG, other_params, data_sources=("code", "poetry"))],
                              mesh=m, routing="data_source", rows_per_step=ROWS)
        teachers.prepare(examples, log=lambda *a: None)
        placed = jax.tree.map(lambda x: jax.device_put(x, sharding_lib.batch_sharding(m, x.ndim)), rollout)
        with sharding_lib.sharding_context(m):
            batch = teachers.score(placed, OPDBatch(*placed), example_ids=np.arange(ROWS))
        assert batch.teacher_logprobs.sharding.spec == sharding_lib.batch_sharding(m, 2).spec
        results.append(np.asarray(batch.teacher_logprobs))
    mask = np.asarray(rollout.response_mask)
    np.testing.assert_allclose(results[1][mask], results[0][mask], atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Mixture


def test_mixture_is_log_of_the_weighted_sum_and_offsets_give_each_teachers_reverse_kl(
        mesh, student_params, other_params, routed_rollout):
    rollout, examples = routed_rollout
    teachers = TeacherSet([_teacher("A", CONFIG, student_params, weight=3.0),
                           _teacher("B", OTHER_CONFIG, other_params, weight=1.0)], mesh=mesh, routing="mixture")
    teachers.prepare(examples, log=lambda *a: None)
    batch, stats = teachers.score_with_stats(rollout, OPDBatch(*rollout), example_ids=np.arange(ROWS))
    mask = np.asarray(rollout.response_mask)
    assert batch.teacher_rows is None and stats.routed_rows.tolist() == [ROWS, ROWS]
    t_a = np.zeros((ROWS, NEW))
    t_b = np.zeros((ROWS, NEW))
    for row in range(ROWS):
        t_a[row, mask[row]] = _row_reference(CONFIG, student_params, rollout, row)
        t_b[row, mask[row]] = _row_reference(OTHER_CONFIG, other_params, rollout, row)
    mixed = np.logaddexp(np.log(0.75) + t_a, np.log(0.25) + t_b)
    np.testing.assert_allclose(np.asarray(batch.teacher_logprobs)[mask], mixed[mask], atol=2e-5)
    # reverse_kl/<j> = mean(s - T_j) = mean(s - T_mix) + mean(T_mix - T_j) over the valid tokens.
    s = np.where(mask, np.random.RandomState(3).normal(-2.0, 1.0, size=mask.shape), 0.0)
    overall = float(np.sum((s - mixed)[mask]) / mask.sum())
    figures = teachers.step_metrics(jax.device_get(stats), {"sampled_reverse_kl": overall})
    assert figures["reverse_kl/A"] == pytest.approx(np.sum((s - t_a)[mask]) / mask.sum(), abs=1e-5)
    assert figures["reverse_kl/B"] == pytest.approx(np.sum((s - t_b)[mask]) / mask.sum(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Multi-teacher G-OPD / ExOPD


class HandMade(Teacher):
    """Returns fixed log-probs for whichever rows it is given (the first response token is row + 1)."""

    table: np.ndarray | None = None

    def score(self, rollout, batch):
        return batch._replace(teacher_logprobs=jnp.asarray(self.table)[rollout.response_ids[:, 0] - 1])


def test_multi_teacher_exopd_advantage_is_the_authors_formula(mesh, student_params, routed_rollout):
    """A_t = lambda (T_j - B) - (s - B) with T_j the row's teacher: math -> pi_T, code -> pi_T2."""
    rollout, examples = routed_rollout
    rng = np.random.RandomState(7)
    t_math, t_code, base, student = (rng.normal(-2.0, 1.0, size=(ROWS, NEW)).astype(np.float32) for _ in range(4))
    math = HandMade(name="math", config=CONFIG, params=None, output="token_logprobs", temperature=1.0, chunk_size=2,
                    data_sources=("math",), rows_per_forward=1)
    code = HandMade(name="code", config=CONFIG, params=None, output="token_logprobs", temperature=1.0, chunk_size=2,
                    data_sources=("code",), rows_per_forward=1)
    math.table, code.table = t_math, t_code
    teachers = TeacherSet([math, code], mesh=mesh, routing="data_source", default_teacher="math")
    teachers.prepare(examples, log=lambda *a: None)
    batch = teachers.score(rollout, OPDBatch(*rollout), example_ids=np.arange(ROWS))

    lam = 1.25
    mask = np.asarray(rollout.response_mask)
    advantage = np.zeros((ROWS, NEW))
    for i, tag in enumerate(TAGS):  # dp_actor.py:503-515, read row by row
        ref = {"math": t_math, "code": t_code}.get(tag, t_math)  # poetry: our default teacher, math
        reverse_kl = student[i] - base[i] - (ref[i] - base[i]) * lam
        advantage[i] = -reverse_kl

    def loss_of(s):
        return losses.sampled_token_opd_loss(s, batch.teacher_logprobs, batch.response_mask, base_logprobs=jnp.asarray(base),
                                             reward_scale=lam, behaviour_logprobs=None)

    (value, metrics), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(student))
    per_row = np.sum(np.where(mask, -advantage, 0.0), 1) / mask.sum(1)  # seq-mean-token-mean of -w A, w = 1
    assert float(value) == pytest.approx(per_row.mean(), rel=1e-5)
    # The gradient is -A_t / (|y_i| N) per valid token: the advantage itself, token by token.
    expected_grad = np.where(mask, -advantage / mask.sum(1, keepdims=True) / ROWS, 0.0)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)
    assert float(metrics["advantage_mean"]) == pytest.approx(advantage[mask].mean(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Own prompts: self-distillation with privileged context, re-templating (real Qwen3 tokenizer)

QWEN_TINY = QwenConfig(vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype=jnp.float32,
                       tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643)
PROBLEMS = [
    ("What is 2 + 3?", "2 + 3 = 5.\n#### 5"),
    ("A box holds 4 rows of 6 eggs. How many eggs?", "4 * 6 = 24 eggs.\n#### 24"),
    ("Tom has {problem} written on a card and 7 apples; he eats 2. How many are left?", "7 - 2 = 5.\n#### 5"),
    ("How many legs do 3 spiders have?", None),  # no reference solution
]


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(QWEN3_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def qwen_params():
    return models.init_params(QWEN_TINY, jax.random.key(5))


@pytest.fixture(scope="module")
def text_rows(tokenizer):
    """Four GSM8K-like rows as the student sees them (Qwen3 template, thinking off) and a hand-made
    rollout of them: responses of 3..6 tokens."""
    examples = []
    for index, (problem, solution) in enumerate(PROBLEMS):
        messages = [{"role": "system", "content": "You are careful."}, {"role": "user", "content": problem}]
        text = data.render_prompt(tokenizer, messages)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append(dataclasses.replace(_example(index, ids, messages=messages, solution=solution),
                                            prompt_text=text))
    length = max(len(e.prompt_token_ids) for e in examples)
    ids, mask = data.left_pad([e.prompt_token_ids for e in examples], 151643, length)
    rng = np.random.RandomState(1)
    response = rng.randint(0, 151000, size=(len(examples), 6)).astype(np.int32)
    response_mask = np.arange(6)[None, :] < np.asarray([6, 3, 5, 4])[:, None]
    rollout = Rollout(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(response), jnp.asarray(response_mask),
                      jnp.zeros(response.shape, jnp.float32))
    return rollout, examples


def _prompts(tokenizer, *, max_length=160, **kwargs):
    return TeacherPrompts(tokenizer=tokenizer, chat_template_kwargs=kwargs.pop("chat_template_kwargs",
                                                                               {"enable_thinking": False}),
                          max_length=max_length, pad_token_id=151643, **kwargs)


def test_privileged_prompt_fills_the_last_user_turn_in_one_pass():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q {solution}"}]
    out = privileged_messages(messages, "P: {problem} | S: {solution} | {other}", "A {problem}")
    assert out == [{"role": "system", "content": "s"},
                   {"role": "user", "content": "P: Q {solution} | S: A {problem} | {other}"}]
    assert messages[1]["content"] == "Q {solution}"  # the row itself is untouched
    assert fill_context("{problem}", problem="x", solution=None) == "x"
    with pytest.raises(ValueError, match="has {solution} but the row has none"):
        fill_context("{problem} {solution}", problem="x", solution=None)


def test_self_distillation_teacher_input_is_the_privileged_prompt_then_the_students_response(
        mesh, tokenizer, qwen_params, text_rows):
    rollout, examples = text_rows
    teacher = Recording(name="self", config=QWEN_TINY, params=None, output="token_logprobs", temperature=1.0,
                        chunk_size=4, live=True, rows_per_forward=3,
                        prompts=_prompts(tokenizer, context_template=DEFAULT_CONTEXT_TEMPLATE))
    teachers = TeacherSet([teacher], mesh=mesh)
    logged = []
    teachers.prepare(examples, log=logged.append)
    assert "1 without a reference solution are skipped" in logged[0]
    batch, stats = teachers.score_with_stats(rollout, OPDBatch(*rollout), example_ids=np.arange(4),
                                             student_params=qwen_params)
    assert teacher.params is None  # the live student's params are released after scoring
    assert stats.routed_rows.tolist() == [3] and stats.skipped_rows.tolist() == [1]
    assert teachers.step_metrics(stats, {"sampled_reverse_kl": 0.5})["skipped_rows/self"] == 1
    # The row without a solution is out of the loss, and was never forwarded.
    np.testing.assert_array_equal(np.asarray(batch.response_mask)[3], False)
    (call,) = teacher.calls
    assert call.response_ids.shape[0] == 3
    responses = np.asarray(rollout.response_ids)
    for row in range(3):
        problem, solution = PROBLEMS[row]
        before, rest = DEFAULT_CONTEXT_TEMPLATE.split("{problem}")
        middle, after = rest.split("{solution}")
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are careful."},
             {"role": "user", "content": before + problem + middle + solution + after}],
            tokenize=False, add_generation_prompt=True, enable_thinking=False)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        if row == 2:  # its problem holds the text "{problem}": filled in one pass, kept as it is
            assert "Tom has {problem} written" in tokenizer.decode(call.prompt_ids[row][call.prompt_mask[row]])
        length = int(call.response_mask[row].sum())
        teacher_input = np.concatenate([call.prompt_ids[row][call.prompt_mask[row]], call.response_ids[row][:length]])
        np.testing.assert_array_equal(teacher_input, np.concatenate([expected, responses[row][:length]]))
        np.testing.assert_array_equal(call.response_mask[row], np.asarray(rollout.response_mask)[row])
        # Its log-probs are those of the unpadded privileged sequence.
        np.testing.assert_allclose(
            np.asarray(batch.teacher_logprobs)[row][:length],
            _unpadded_logprobs(QWEN_TINY, qwen_params, np.asarray(expected), responses[row][:length]), atol=2e-5)


def test_self_distillation_with_an_empty_solution_template_scores_like_the_student(
        mesh, tokenizer, qwen_params, text_rows):
    rollout, examples = text_rows
    student = np.asarray(jax.jit(functools.partial(objectives.response_logprobs, QWEN_TINY, temperature=1.0,
                                                   chunk_size=4))(qwen_params, *rollout[:4]))
    mask = np.asarray(rollout.response_mask)
    for max_length in (rollout.prompt_ids.shape[1], 96):  # the student's prompt length, and a longer one
        teacher = Teacher(name="self", config=QWEN_TINY, params=None, output="token_logprobs", temperature=1.0,
                          chunk_size=4, live=True,
                          prompts=_prompts(tokenizer, max_length=max_length, context_template="{problem}"))
        teachers = TeacherSet([teacher], mesh=mesh)
        teachers.prepare(examples, log=lambda *a: None)
        batch = teachers.score(rollout, OPDBatch(*rollout), example_ids=np.arange(4), student_params=qwen_params)
        got = np.asarray(batch.teacher_logprobs)
        if max_length == rollout.prompt_ids.shape[1]:
            np.testing.assert_array_equal(got[mask], student[mask])  # the same arrays through the same program
        else:
            np.testing.assert_allclose(got[mask], student[mask], atol=2e-5)


def test_missing_solutions_can_be_refused_before_training(tokenizer, text_rows):
    _, examples = text_rows
    prompts = _prompts(tokenizer, context_template=DEFAULT_CONTEXT_TEMPLATE, missing_solution="raise")
    with pytest.raises(ValueError, match=r"1 of 4 rows have no reference solution \(first: test:3\)"):
        prompts.encode(examples)
    short = _prompts(tokenizer, max_length=40, context_template=DEFAULT_CONTEXT_TEMPLATE)
    with pytest.raises(ValueError, match=r"3 of 3 prompts are longer than its max_prompt_length=40 tokens"):
        short.encode(examples)
    with pytest.raises(ValueError, match="must contain {problem}"):
        _prompts(tokenizer, context_template="{solution} only")


@pytest.mark.parametrize("variant", ["enable_thinking", "chat_template_file"])
def test_retemplated_teacher_scores_the_same_response_tokens_as_an_unpadded_forward(
        mesh, tokenizer, qwen_params, text_rows, tmp_path, variant):
    """The teacher's own template makes its prompt a different number of tokens than the
    student's; the response boundary stays exact and it scores at the sampling temperature."""
    rollout, examples = text_rows
    if variant == "enable_thinking":
        prompts = _prompts(tokenizer, chat_template_kwargs={"enable_thinking": True})
    else:
        template = tmp_path / "plain.jinja"
        template.write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}### assistant:\n{% endif %}")
        prompts = _prompts(tokenizer, chat_template=template.read_text())
    teacher = Recording(name="retemplated", config=QWEN_TINY, params=qwen_params, output="token_logprobs",
                        temperature=0.7, chunk_size=4, prompts=prompts)
    teachers = TeacherSet([teacher], mesh=mesh)
    teachers.prepare(examples, log=lambda *a: None)
    batch = teachers.score(rollout, OPDBatch(*rollout), example_ids=np.arange(4))
    (call,) = teacher.calls  # every row is this teacher's: one forward of the whole rollout
    np.testing.assert_array_equal(call.response_ids, np.asarray(rollout.response_ids))
    responses, mask = np.asarray(rollout.response_ids), np.asarray(rollout.response_mask)
    for row, example in enumerate(examples):
        text = prompts.render(example.messages, None)
        own = tokenizer(text, add_special_tokens=False)["input_ids"]
        student_side = example.prompt_token_ids
        assert len(own) != len(student_side)  # the boundary moved
        if variant == "enable_thinking":
            assert tokenizer.decode(student_side).endswith("<think>\n\n</think>\n\n") and not text.endswith("</think>\n\n")
        np.testing.assert_array_equal(call.prompt_ids[row][call.prompt_mask[row]], own)
        length = int(mask[row].sum())
        np.testing.assert_allclose(
            np.asarray(batch.teacher_logprobs)[row][:length],
            _unpadded_logprobs(QWEN_TINY, qwen_params, np.asarray(own), responses[row][:length], temperature=0.7),
            atol=2e-5)


def test_a_teacher_tokenizer_with_other_token_ids_is_refused_by_name(tokenizer, tmp_path):
    from effopd_jax.config import default_config, teacher_config  # noqa: PLC0415
    from effopd_jax.trainer import setup  # noqa: PLC0415

    other = data.load_tokenizer(QWEN3_TOKENIZER_DIR)
    other.add_tokens(["<extra_token>"])
    other.save_pretrained(tmp_path / "other")
    config = default_config()
    same = teacher_config(name="same", tokenizer=QWEN3_TOKENIZER_DIR, chat_template_kwargs={"enable_thinking": True})
    prompts = setup._teacher_prompts(config, same, "config.teachers[0]", tokenizer)
    assert prompts.chat_template_kwargs == {"enable_thinking": True}
    assert prompts.max_length == config.data.max_prompt_length
    assert setup._teacher_prompts(config, teacher_config(name="plain"), "config.teachers[0]", tokenizer) is None
    with pytest.raises(ValueError, match=r"^config\.teachers\[1\]\.tokenizer: teacher 'code''s tokenizer maps tokens "
                                         r"to different ids than the student's"):
        setup._teacher_prompts(config, teacher_config(name="code", tokenizer=str(tmp_path / "other")),
                               "config.teachers[1]", tokenizer)
