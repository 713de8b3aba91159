"""The trainer's seams at a tiny vocabulary: the jitted update step, the loss registry, the teacher,
the rollout engine registry, and trainable vs frozen parameters.

References are computed independently: log-probs by a full-vocabulary log-softmax of
``models.forward``'s logits (no chunking), the sampled-token loss by numpy from those, the
rollout by calling the sampler directly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax import models, objectives, rollout, sampling
from effopd_jax import sharding as sharding_lib
from effopd_jax.config import default_config
from effopd_jax.models.qwen import QwenConfig
from effopd_jax.objectives import LossSettings, OPDBatch
from effopd_jax.teachers import Teacher
from effopd_jax.trainer import FullFineTuning, TrainState, make_optimizer, new_train_state, update_step

VOCAB, PROMPT, NEW, ROWS = 40, 5, 6, 4
CONFIG = QwenConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype=jnp.float32,
                    tie_word_embeddings=True)
TEACHER_CONFIG = dataclasses.replace(CONFIG, hidden_size=24, intermediate_size=48)


@pytest.fixture(scope="module")
def mesh():
    return sharding_lib.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def student_params():
    return models.init_params(CONFIG, jax.random.key(1))


@pytest.fixture(scope="module")
def teacher(mesh):
    params = models.init_params(TEACHER_CONFIG, jax.random.key(2))
    return Teacher(name="teacher", config=TEACHER_CONFIG, params=params, output="token_logprobs",
                   temperature=1.0, chunk_size=4)


@pytest.fixture(scope="module")
def sampled(mesh, student_params):
    """A real rollout of the student: left-padded prompts of different lengths, T = 1."""
    rng = np.random.RandomState(0)
    prompts = [rng.randint(1, VOCAB, size=n).astype(np.int32) for n in (5, 3, 4, 2)]
    engine = rollout.make_rollout_engine(
        "static", model_config=CONFIG, mesh=mesh, prompt_length=PROMPT,
        settings=sampling.SamplingSettings(max_new_tokens=NEW, temperature=1.0, eos_token_ids=(0,)))
    return prompts, engine.generate(student_params, prompts, jax.random.key(7))


def _full_logprobs(config, params, out: rollout.Rollout) -> np.ndarray:
    """log softmax(logits)[token] of every response token from one unchunked forward."""
    ids = jnp.concatenate([out.prompt_ids, out.response_ids], axis=1)
    mask = jnp.concatenate([out.prompt_mask, out.response_mask], axis=1)
    logits = np.asarray(models.forward(config, params, ids, attention_mask=mask), np.float64)
    logits = logits[:, PROMPT - 1:-1]
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    tokens = np.asarray(out.response_ids)
    return np.take_along_axis(logits, tokens[..., None], -1)[..., 0] - logz


def test_static_engine_is_the_sampler_on_left_padded_prompts(mesh, student_params, sampled):
    prompts, out = sampled
    ids, mask = np.zeros((ROWS, PROMPT), np.int32), np.zeros((ROWS, PROMPT), bool)
    for row, p in enumerate(prompts):
        ids[row, PROMPT - len(p):], mask[row, PROMPT - len(p):] = p, True
    np.testing.assert_array_equal(np.asarray(out.prompt_ids), ids)
    np.testing.assert_array_equal(np.asarray(out.prompt_mask), mask)
    direct = sampling.generate_padded(CONFIG, student_params, ids, mask, jax.random.key(7), max_new_tokens=NEW,
                                      temperature=1.0, eos_token_ids=(0,), mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out.response_ids), np.asarray(direct.tokens))
    np.testing.assert_array_equal(np.asarray(out.response_mask), np.asarray(direct.mask))
    np.testing.assert_array_equal(np.asarray(out.behaviour_logprobs), np.asarray(direct.logprobs))
    # The behaviour log-probs are the student's own (T = 1, no filtering).
    reference = _full_logprobs(CONFIG, student_params, out)
    valid = np.asarray(out.response_mask)
    np.testing.assert_allclose(np.asarray(out.behaviour_logprobs)[valid], reference[valid], atol=2e-5)


def test_engine_registry_refuses_unknown_names_and_accepts_new_engines(mesh):
    settings = sampling.SamplingSettings(max_new_tokens=2)
    with pytest.raises(ValueError, match=r"unknown rollout engine 'paged'; registered: \('continuous', 'static'\)"):
        rollout.make_rollout_engine("paged", model_config=CONFIG, settings=settings, mesh=mesh, prompt_length=4)

    class Recording:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    rollout.register_rollout_engine("recording_test_engine", Recording)
    try:
        engine = rollout.make_rollout_engine("recording_test_engine", model_config=CONFIG, settings=settings,
                                             mesh=mesh, prompt_length=4)
        assert engine.kwargs["settings"] is settings and engine.kwargs["prompt_length"] == 4
        with pytest.raises(ValueError, match="already registered"):
            rollout.register_rollout_engine("recording_test_engine", lambda **k: None)
    finally:
        rollout._ENGINES.pop("recording_test_engine")


def test_teacher_scores_equal_an_unchunked_forward(teacher, sampled):
    _, out = sampled
    empty = OPDBatch(*out)
    scored = teacher.score(out, empty)
    valid = np.asarray(out.response_mask)
    np.testing.assert_allclose(np.asarray(scored.teacher_logprobs)[valid],
                               _full_logprobs(TEACHER_CONFIG, teacher.params, out)[valid], atol=2e-5)
    assert scored.teacher_hidden is None and scored.base_logprobs is None
    reference = teacher.score_reference(out, empty)
    np.testing.assert_array_equal(np.asarray(reference.base_logprobs), np.asarray(scored.teacher_logprobs))
    hidden_teacher = dataclasses.replace(teacher, output="hidden_states")
    with_hidden = hidden_teacher.score(out, empty)
    logits = np.asarray(with_hidden.teacher_hidden @ with_hidden.teacher_head)
    assert logits.shape == (ROWS, NEW, VOCAB)
    with pytest.raises(ValueError, match="Teacher.output"):
        dataclasses.replace(teacher, output="logits")


def test_loss_registry():
    assert set(objectives.registered_losses()) >= {"sampled_token", "full_reverse_kl", "topk_reverse_kl"}
    assert objectives.get_loss("full_reverse_kl").teacher_output == "hidden_states"
    with pytest.raises(ValueError, match="unknown loss 'forward_kl'; registered"):
        objectives.get_loss("forward_kl")
    with pytest.raises(ValueError, match="already registered"):
        objectives.register_loss(objectives.OPDLoss("sampled_token", "token_logprobs", lambda *a: None))
    with pytest.raises(ValueError, match="teacher_output"):
        objectives.register_loss(objectives.OPDLoss("x", "logits", lambda *a: None))


def _update(parameterization, mesh, student_params):
    config = default_config()
    config.optimizer.learning_rate = 1e-2
    trainable, frozen = parameterization.split(student_params)
    optimizer, _ = make_optimizer(config.optimizer, total_steps=10, effopd_config=config.effopd,
                                  param_filter=parameterization.param_filter(models.layout(CONFIG)))
    state = new_train_state(trainable, optimizer, seed=0, mesh=mesh)
    step = jax.jit(functools.partial(
        update_step, optimizer=optimizer, model_config=CONFIG, parameterization=parameterization,
        loss=objectives.get_loss("sampled_token"), settings=LossSettings(chunk_size=4)))
    return state, frozen, step


def test_update_step_loss_is_the_authors_formula_and_a_nan_skips_the_update(mesh, student_params, teacher, sampled):
    _, out = sampled
    batch = teacher.score(out, OPDBatch(*out))
    state, frozen, step = _update(FullFineTuning(), mesh, student_params)
    new_state, metrics = step(state, batch, frozen)

    # The value: seq-mean-token-mean of -(T - s), with s and T from unchunked forwards (IS weight 1).
    mask = np.asarray(out.response_mask)
    s = _full_logprobs(CONFIG, student_params, out)
    t = np.asarray(batch.teacher_logprobs, np.float64)
    per_sequence = np.sum(np.where(mask, -(t - s), 0.0), 1) / mask.sum(1)
    assert float(metrics["loss"]) == pytest.approx(per_sequence.mean(), rel=1e-4, abs=1e-6)
    assert not bool(metrics["update_skipped"]) and np.isfinite(float(metrics["grad_norm"]))
    assert int(new_state.step) == 1 and int(new_state.skipped_updates) == 0
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(state.trainable_params), jax.tree.leaves(new_state.trainable_params))]
    assert all(moved)

    # A NaN teacher log-prob: nothing changes but the counters; a finite step resets the streak.
    poisoned = batch._replace(teacher_logprobs=batch.teacher_logprobs.at[0, 0].set(jnp.nan))
    skipped, skipped_metrics = step(new_state, poisoned, frozen)
    assert bool(skipped_metrics["update_skipped"])
    assert (int(skipped.step), int(skipped.skipped_updates), int(skipped.consecutive_skips)) == (2, 1, 1)
    for a, b in zip(jax.tree.leaves((new_state.trainable_params, new_state.opt_state)),
                    jax.tree.leaves((skipped.trainable_params, skipped.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    skipped_twice, _ = step(skipped, poisoned, frozen)
    assert (int(skipped_twice.skipped_updates), int(skipped_twice.consecutive_skips)) == (2, 2)
    recovered, recovered_metrics = step(skipped_twice, batch, frozen)
    assert not bool(recovered_metrics["update_skipped"])
    assert (int(recovered.step), int(recovered.skipped_updates), int(recovered.consecutive_skips)) == (4, 2, 0)


@dataclasses.dataclass(frozen=True)
class FrozenEmbeddings:
    """A parameterization for the test: everything trains except the (tied) embedding."""

    name: str = "frozen_embeddings"

    def split(self, params):
        trainable = {k: v for k, v in params.items() if k != "embed_tokens"}
        return trainable, {"embed_tokens": params["embed_tokens"]}

    def merge(self, trainable, frozen):
        return {**trainable, **frozen}

    def param_filter(self, layout):
        return layout.effopd_filter()


def test_only_the_trainable_part_is_optimized(mesh, student_params, teacher, sampled):
    _, out = sampled
    batch = teacher.score(out, OPDBatch(*out))
    full_state, _, full_step = _update(FullFineTuning(), mesh, student_params)
    state, frozen, step = _update(FrozenEmbeddings(), mesh, student_params)
    assert "embed_tokens" not in state.trainable_params
    # The optimizer state holds moments for the trainable leaves only.
    import optax

    mu = optax.tree.get(state.opt_state, "mu")
    assert jax.tree.structure(mu) == jax.tree.structure(state.trainable_params)
    assert jax.tree.structure(optax.tree.get(full_state.opt_state, "mu")) == jax.tree.structure(student_params)
    new_state, metrics = step(state, batch, frozen)
    full_new, full_metrics = full_step(full_state, batch, {})
    assert float(metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-6)
    # The trainable leaves moved; the embedding, an input of the step, is untouched by definition.
    changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                           state.trainable_params, new_state.trainable_params)
    assert all(jax.tree.leaves(changed))
    assert isinstance(new_state, TrainState)


def test_rollout_weight_dtype_samples_with_cast_weights_and_the_importance_weight_corrects(
        mesh, student_params, sampled):
    """`rollout.weight_dtype`: the engine samples from the bfloat16-cast student, its behaviour
    log-probs are the cast model's, and the sampled-token loss reweights them towards the float32
    student by w = exp(s - behaviour): finite, near 1, and the loss equals its numpy formula."""
    from effopd_jax import losses

    assert rollout.cast_rollout_params(student_params, "") is student_params
    cast = rollout.cast_rollout_params(student_params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    assert rollout.cast_rollout_params(cast, "bfloat16") is cast
    with pytest.raises(ValueError, match="weight_dtype"):
        rollout.cast_rollout_params(student_params, "int8")

    prompts, _ = sampled
    engine = rollout.make_rollout_engine(
        "static", model_config=CONFIG, mesh=mesh, prompt_length=PROMPT,
        settings=sampling.SamplingSettings(max_new_tokens=NEW, temperature=1.0, eos_token_ids=(0,)))
    out = engine.generate(cast, prompts, jax.random.key(7))
    valid = np.asarray(out.response_mask)
    behaviour = np.asarray(out.behaviour_logprobs, np.float64)
    # The cast model's log-probs (independent unchunked forward with the bfloat16 weights).
    np.testing.assert_allclose(behaviour[valid], _full_logprobs(CONFIG, cast, out)[valid], atol=2e-5)
    student = _full_logprobs(CONFIG, student_params, out)
    weight = np.exp(student - behaviour)[valid]
    assert np.all(np.isfinite(weight)) and np.max(np.abs(weight - 1)) < 0.05 and np.any(weight != 1)

    teacher_logprobs = np.log(np.random.RandomState(3).dirichlet(np.ones(VOCAB), ROWS * NEW).max(-1)).reshape(ROWS, NEW)
    loss, _ = losses.sampled_token_opd_loss(
        jnp.asarray(student, jnp.float32), jnp.asarray(teacher_logprobs, jnp.float32), jnp.asarray(valid),
        behaviour_logprobs=jnp.asarray(behaviour, jnp.float32), is_threshold=5.0)
    per_token = -np.minimum(np.exp(student - behaviour), 5.0) * (teacher_logprobs - student)
    want = np.mean([per_token[r][valid[r]].mean() for r in range(ROWS)])
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-6)
