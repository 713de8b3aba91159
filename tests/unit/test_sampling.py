"""Tests for effopd_jax.sampling: the jitted KV-cache sampler.

References are independent of the sampler: the model's uncached full forward (step-by-step
argmax / log-softmax), `transformers` `generate` on the same checkpoint (torch), and a numpy
re-implementation of temperature / top-k / top-p for the chi-square tests.
"""

from __future__ import annotations

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from effopd_jax import sampling
from effopd_jax.models.qwen import Qwen, QwenConfig, init_cache

# Prompts of different lengths in one batch (3 prompts -> batch bucket 4, length bucket 16).
PROMPTS = [[5, 17, 3], [9, 2, 44, 71, 8, 30, 12, 6, 1, 19, 50], [33, 7, 7, 90, 4, 61, 20]]
MAX_NEW = 8


# ----------------------------------------------------------------------------------------------
# Fixtures and references
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> QwenConfig:
    return QwenConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )


@pytest.fixture(scope="module")
def params(config):
    variables = Qwen(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    params = nn.meta.unbox(variables)["params"]
    # Spread the logits (std ~3 instead of ~0.2) so the sampling tests see a peaked
    # distribution where temperature / top-k / top-p matter.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20.0
    return params


@pytest.fixture(scope="module")
def full_forward(config):
    """Uncached forward of one right-padded row: logits [seq, vocab] (causal, so the padding on
    the right never changes the logits of earlier positions). One compilation per length."""
    model = Qwen(config)

    @jax.jit
    def forward(params, ids):
        return model.apply({"params": params}, ids[None, :])[0]

    return forward


def reference_greedy(forward, params, prompt, max_new, total_len):
    """Step-by-step argmax over the full uncached forward; returns (tokens, log-probs)."""
    sequence = list(prompt)
    tokens, logprobs = [], []
    for _ in range(max_new):
        ids = np.zeros(total_len, np.int32)
        ids[: len(sequence)] = sequence
        logits = np.asarray(forward(params, ids), np.float64)[len(sequence) - 1]
        token = int(np.argmax(logits))
        tokens.append(token)
        logprobs.append(logits[token] - scipy.special.logsumexp(logits))
        sequence.append(token)
    return np.array(tokens), np.array(logprobs)


def numpy_sampling_probs(logits, temperature, top_k=0, top_p=1.0):
    """Independent reference of the filtered distribution for one row of logits [vocab]."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.lexsort((np.arange(z.size), -z))  # decreasing logit, ties -> lower id
    keep = np.zeros(z.size, bool)
    kept = order if top_k == 0 else order[:top_k]
    keep[kept] = True
    if top_p < 1.0:
        p = np.exp(z[kept] - z[kept].max())
        p /= p.sum()
        mass_before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        keep[:] = False
        keep[kept[mass_before < top_p]] = True
    probs = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    return probs / probs.sum()


# jax.monitoring events of a jit cache miss: tracing, lowering to MLIR, XLA compilation. The
# persistent compilation cache (tests/conftest.py) skips the last on a disk hit, never the
# lowering, so a retrace/recompile cannot go unseen.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


@contextlib.contextmanager
def count_compilations():
    """Counts trace / lower / compile events (``COMPILE_EVENTS``) of jitted programs in the block."""
    counter = {"n": 0}

    def listener(event, duration_secs, **kwargs):
        if event in COMPILE_EVENTS:
            counter["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ----------------------------------------------------------------------------------------------
# Greedy correctness
# ----------------------------------------------------------------------------------------------


def test_greedy_matches_stepwise_argmax_of_uncached_forward(config, params, full_forward):
    out = sampling.generate(config, params, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0)
    assert out.tokens.shape == (len(PROMPTS), MAX_NEW) and out.tokens.dtype == np.int32
    assert out.logprobs.dtype == np.float32 and out.mask.dtype == bool
    total_len = max(map(len, PROMPTS)) + MAX_NEW
    for row, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logprobs = reference_greedy(full_forward, params, prompt, MAX_NEW, total_len)
        np.testing.assert_array_equal(out.tokens[row], ref_tokens)
        # Greedy logprobs are the unmodified model log-probabilities.
        np.testing.assert_allclose(out.logprobs[row], ref_logprobs, atol=2e-5)
    assert out.mask.all() and (out.lengths == MAX_NEW).all()


def test_rows_do_not_depend_on_batch_composition_or_padding_layout(config, params):
    together = sampling.generate(config, params, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0)
    # Other rows in other places (same buckets, so the same compiled program).
    shuffled = sampling.generate(config, params, PROMPTS[::-1], max_new_tokens=MAX_NEW, temperature=0.0)
    np.testing.assert_array_equal(shuffled.tokens[::-1], together.tokens)

    # Right padding through the low-level API gives the same greedy tokens as left padding.
    length = 16
    ids = np.zeros((4, length), np.int32)
    mask = np.zeros((4, length), bool)
    for row, prompt in enumerate(PROMPTS):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = True
    out = sampling.generate_padded(
        config, params, ids, mask, jax.random.key(0), max_new_tokens=MAX_NEW, temperature=0.0
    )
    np.testing.assert_array_equal(np.asarray(out.tokens)[:3], together.tokens)
    # Row 3 has no real token: a dummy row that generates nothing.
    assert not np.asarray(out.mask)[3].any() and int(out.lengths[3]) == 0
    assert (np.asarray(out.tokens)[3] == 0).all()


@pytest.mark.parametrize("model_type, tie", [("qwen3", False), ("qwen2", True)])
def test_greedy_matches_transformers_generate(tmp_path, model_type, tie):
    """Qwen3 with its own lm_head; Qwen2 (q/k/v biases) with tied embeddings."""
    torch = pytest.importorskip("torch")
    import transformers

    from effopd_jax import convert
    from tests import helpers_hf

    path = helpers_hf.make_tiny_hf_checkpoint(tmp_path, model_type=model_type, tie=tie)
    config, params = convert.load_hf(path, dtype=jnp.float32, compute_dtype=jnp.float32)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [[p % config.vocab_size for p in prompt] for prompt in PROMPTS]
    out = sampling.generate(config, params, prompts, max_new_tokens=MAX_NEW, temperature=0.0)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            hf_out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                min_new_tokens=MAX_NEW,
                eos_token_id=None,
                pad_token_id=0,
            )
        np.testing.assert_array_equal(out.tokens[row], hf_out[0, len(prompt) :].numpy())


# ----------------------------------------------------------------------------------------------
# Sampling distribution
# ----------------------------------------------------------------------------------------------

# Hand-picked logits over a 12-token vocabulary, with a tie (ids 3 and 7) at the top-k boundary.
TOY_LOGITS = np.array([1.5, -0.3, 2.2, 0.9, 0.1, -1.0, 1.1, 0.9, 2.0, -2.0, 0.4, 0.0], np.float32)
SAMPLING_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.7, top_k=5),  # 5th place is a tie of ids 3 and 7 (0.9): id 3 is kept
    dict(temperature=1.0, top_p=0.75),
    dict(temperature=0.8, top_k=6, top_p=0.8),
]


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sample_next_token_frequencies_pass_chi_square(case):
    num_samples = 40_000
    logits = jnp.broadcast_to(jnp.asarray(TOY_LOGITS), (num_samples, TOY_LOGITS.size))
    keys = jax.random.split(jax.random.key(0), num_samples)  # one key per row
    tokens, logprobs = jax.jit(lambda l, k: sampling.sample_next_token(l, k, **case))(logits, keys)
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    expected = numpy_sampling_probs(TOY_LOGITS, **case)
    if case.get("top_k") == 5:
        assert expected[3] > 0 and expected[7] == 0
    counts = np.bincount(tokens, minlength=TOY_LOGITS.size)
    # Filtered-out tokens are never drawn; the rest match the filtered softmax.
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    observed, expect = counts[support], expected[support] * num_samples
    assert scipy.stats.chisquare(observed, expect).pvalue > 1e-3
    # The test has power: the unfiltered, untempered softmax is rejected (unless it is the same).
    if case != dict(temperature=1.0):
        naive = numpy_sampling_probs(TOY_LOGITS, 1.0)
        assert scipy.stats.chisquare(counts, naive * num_samples).pvalue < 1e-6
    # Reported logprobs are the log of the filtered, renormalised probability.
    np.testing.assert_allclose(logprobs, np.log(expected[tokens]), atol=1e-5)


@pytest.mark.parametrize("block_size", [4, 5])  # 5: the last block is padded with -inf
def test_blocked_categorical_is_exact(block_size):
    num_samples = 40_000
    logits = TOY_LOGITS.copy()
    logits[6] = -np.inf  # never drawn
    batch_logits = jnp.broadcast_to(jnp.asarray(logits), (num_samples, logits.size))
    draw = jax.jit(lambda l, k: sampling.sample_categorical(k, l, block_size=block_size))
    counts = np.bincount(np.asarray(draw(batch_logits, jax.random.key(0))), minlength=logits.size)
    expected = np.exp(logits.astype(np.float64) - logits.max())
    expected /= expected.sum()
    assert counts.size == logits.size and counts[6] == 0
    support = expected > 0
    assert scipy.stats.chisquare(counts[support], expected[support] * num_samples).pvalue > 1e-3


def test_blocked_categorical_default_blocks_on_a_large_vocab():
    """n = 1500 > 1024 takes the blocked path (blocks of 64, the last one padded)."""
    num_samples, vocab = 20_000, 1500
    logits = np.random.default_rng(0).normal(0.0, 2.0, vocab).astype(np.float32)
    draw = jax.jit(
        lambda k, l: sampling.sample_categorical(k, jnp.broadcast_to(l, (num_samples, vocab))),
    )
    tokens = np.asarray(draw(jax.random.key(0), jnp.asarray(logits)))
    expected = np.exp(logits.astype(np.float64) - logits.max())
    expected /= expected.sum()
    # Compare on 15 bins of 100 consecutive ids (every bin has an expected count >> 5).
    observed = np.bincount(tokens // 100, minlength=15)
    assert observed.size == 15
    expected_bins = expected.reshape(15, 100).sum(-1) * num_samples
    assert scipy.stats.chisquare(observed, expected_bins).pvalue > 1e-3


def test_filters_break_ties_towards_lower_ids_and_keep_the_top_token():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 3.0, 2.0]])
    candidate_logits, candidate_ids = sampling.filtered_logits(logits, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(candidate_ids), [[1]])
    # A tiny top_p keeps exactly the single most likely token (the lower id of the tie).
    candidate_logits, candidate_ids = sampling.filtered_logits(logits, temperature=1.0, top_p=1e-6)
    kept = np.asarray(candidate_ids)[np.isfinite(np.asarray(candidate_logits))]
    np.testing.assert_array_equal(kept, [1])
    # top_p = mass of the top two: exactly those two are kept (smallest prefix with mass >= p).
    probs = np.asarray(jax.nn.softmax(logits[0]))
    candidate_logits, candidate_ids = sampling.filtered_logits(
        logits, temperature=1.0, top_p=float(probs[1] + probs[3]) * 0.999
    )
    kept = np.asarray(candidate_ids)[np.isfinite(np.asarray(candidate_logits))]
    np.testing.assert_array_equal(kept, [1, 3])


def test_generate_first_token_distribution_chi_square(config, params, full_forward):
    """End to end: the first sampled token of many copies of one prompt, vs the softmax of the
    uncached forward with temperature, top-k and top-p applied."""
    prompt = PROMPTS[0]
    num_samples = 2048
    case = dict(temperature=2.0, top_k=10, top_p=0.8)
    out = sampling.generate(config, params, [prompt] * num_samples, max_new_tokens=1, seed=3, **case)
    logits = np.asarray(full_forward(params, np.asarray(prompt, np.int32)))[-1]
    expected = numpy_sampling_probs(logits, **case)
    counts = np.bincount(out.tokens[:, 0], minlength=config.vocab_size)
    support = expected > 0
    assert counts[~support].sum() == 0
    assert support.sum() >= 4  # the test is about a real distribution, not a point mass
    assert scipy.stats.chisquare(counts[support], expected[support] * num_samples).pvalue > 1e-3
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(expected[out.tokens[:, 0]]), atol=1e-4)


def test_logprobs_equal_log_softmax_of_full_forward_at_temperature_one(config, params, full_forward):
    out = sampling.generate(config, params, PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0, seed=7)
    total_len = max(map(len, PROMPTS)) + MAX_NEW
    for row, prompt in enumerate(PROMPTS):
        ids = np.zeros(total_len, np.int32)
        sequence = list(prompt) + list(out.tokens[row])
        ids[: len(sequence)] = sequence
        logits = np.asarray(full_forward(params, ids), np.float64)
        targets = np.arange(len(prompt) - 1, len(prompt) - 1 + MAX_NEW)
        ref = logits[targets, out.tokens[row]] - scipy.special.logsumexp(logits[targets], axis=-1)
        np.testing.assert_allclose(out.logprobs[row], ref, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# EOS, seeds, compilation, sharding, validation
# ----------------------------------------------------------------------------------------------


def test_eos_stops_rows_and_pads_the_rest(config, params):
    greedy = sampling.generate(config, params, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0)
    # Pick an EOS that row 0 emits at some step s but that some other row never emits.
    eos, stop_step = None, None
    for step in range(1, MAX_NEW - 1):
        candidate = int(greedy.tokens[0, step])
        if candidate not in greedy.tokens[0, :step] and any(
            candidate not in greedy.tokens[r] for r in range(1, len(PROMPTS))
        ):
            eos, stop_step = candidate, step
            break
    assert eos is not None, "fixture produced no usable EOS candidate"
    pad = 95
    out = sampling.generate(
        config, params, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, eos_token_ids=(eos,), pad_token_id=pad
    )
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(greedy.tokens[row] == eos)
        length = int(hits[0]) + 1 if hits.size else MAX_NEW
        if row == 0:
            assert length == stop_step + 1 < MAX_NEW
        assert int(out.lengths[row]) == length
        np.testing.assert_array_equal(out.mask[row], np.arange(MAX_NEW) < length)
        np.testing.assert_array_equal(out.tokens[row, :length], greedy.tokens[row, :length])
        assert (out.tokens[row, length:] == pad).all()
        assert (out.logprobs[row, length:] == 0.0).all()
    assert any(int(l) == MAX_NEW for l in out.lengths)  # a row without EOS runs to the end


def test_a_rows_draws_depend_only_on_the_key_its_index_in_the_step_and_the_position(config, params, full_forward):
    """Per-row keys: a permutation of the step's rows, a sub-batch of them or other batch-mates
    sample exactly the same tokens for each row, given its index in the step."""
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.0, top_k=40)
    key = jax.random.key(21)
    padded = sampling.pad_prompts(PROMPTS)  # rows 0, 1, 2 (+ a dummy row 3)

    def run(order, row_ids, extra=()):
        prompts = [PROMPTS[i] for i in order] + list(extra)
        ids, mask = np.zeros((4, padded.ids.shape[1]), np.int32), np.zeros((4, padded.ids.shape[1]), bool)
        for row, prompt in enumerate(prompts):
            ids[row, ids.shape[1] - len(prompt):], mask[row, ids.shape[1] - len(prompt):] = prompt, True
        out = sampling.generate_padded(config, params, ids, mask, key, row_ids=np.asarray(row_ids, np.int32), **kwargs)
        return np.asarray(out.tokens), np.asarray(out.logprobs)

    tokens, logprobs = run([0, 1, 2], [0, 1, 2, 3])
    # The definition, token by token for row 1: the uncached forward's logits at each position,
    # drawn with the key fold_in(fold_in(key, 1), t).
    sequence = list(PROMPTS[1])
    for t in range(MAX_NEW):
        ids = np.zeros(len(PROMPTS[1]) + MAX_NEW, np.int32)
        ids[: len(sequence)] = sequence
        logits = full_forward(params, ids)[len(sequence) - 1]
        row_key = jax.random.fold_in(jax.random.fold_in(key, 1), t)
        token, _ = sampling.sample_next_token(logits[None], row_key[None], temperature=1.0, top_k=40)
        assert int(token[0]) == tokens[1, t], t
        sequence.append(int(token[0]))
    permuted, permuted_logprobs = run([2, 0, 1], [2, 0, 1, 3])
    np.testing.assert_array_equal(permuted[[1, 2, 0]], tokens[:3])
    np.testing.assert_allclose(permuted_logprobs[[1, 2, 0]], logprobs[:3], atol=1e-6)
    # Row 1 alone, next to other prompts (another batch composition), in another place.
    alone, _ = run([1], [1, 7, 8, 9], extra=[[4, 4, 4], [9, 8], [70, 1, 2, 3, 5]])
    np.testing.assert_array_equal(alone[0], tokens[1])
    # A row's index is what its draws depend on: the same prompt as row 5 samples other tokens.
    renamed, _ = run([0, 1, 2], [5, 1, 2, 3])
    assert (renamed[0] != tokens[0]).any()
    np.testing.assert_array_equal(renamed[1:3], tokens[1:3])


def test_token_keys_are_fold_in_of_row_then_position():
    key = jax.random.key(4)
    keys = sampling.token_keys(key, jnp.asarray([0, 3, 7]), jnp.asarray([2, 0, 5]))
    for i, (row, position) in enumerate([(0, 2), (3, 0), (7, 5)]):
        want = jax.random.fold_in(jax.random.fold_in(key, row), position)
        np.testing.assert_array_equal(jax.random.key_data(keys[i]), jax.random.key_data(want))
    raw = sampling.token_keys(jax.random.key_data(key), jnp.asarray([3]), 0)  # raw uint32[2] keys too
    np.testing.assert_array_equal(raw[0], jax.random.key_data(keys[1]))
    # A row's draw depends on its key alone, not on the other rows of the batch.
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)), jnp.float32)
    tokens, _ = sampling.sample_next_token(logits, keys, temperature=1.0)
    alone, _ = sampling.sample_next_token(logits[1:2], keys[1:2], temperature=1.0)
    assert int(alone[0]) == int(tokens[1])


def test_seeds(config, params):
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=1.0)
    a = sampling.generate(config, params, PROMPTS, seed=11, **kwargs)
    b = sampling.generate(config, params, PROMPTS, seed=11, **kwargs)
    c = sampling.generate(config, params, PROMPTS, seed=12, **kwargs)
    key = sampling.generate(config, params, PROMPTS, seed=jax.random.key(11), **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    np.testing.assert_array_equal(a.tokens, key.tokens)
    assert (a.tokens != c.tokens).any()


def test_no_recompilation_within_a_bucket(config, params):
    kwargs = dict(max_new_tokens=4, temperature=1.0, top_k=10)
    with count_compilations() as first:
        sampling.generate(config, params, [[1, 2, 3], [4, 5], [6]], seed=0, **kwargs)
    assert first["n"] > 0
    # Same buckets (batch 3 or 4 -> 4, lengths <= 8), new prompt values, new seed, new weights.
    new_params = jax.tree.map(lambda x: x * 1.01, params)
    with count_compilations() as second:
        out = sampling.generate(config, new_params, [[7, 8, 9, 10, 11, 12], [3], [2, 2], [5, 1]], seed=1, **kwargs)
    assert second["n"] == 0
    assert out.tokens.shape == (4, 4) and out.mask.all()


def test_cache_buffers_are_donated_and_never_copied(config, params):
    """The cache argument is donated and aliased to an output, and the compiled program never
    copies a cache buffer (a whole layer's, or the stack): each decode step updates the
    per-layer buffers in place."""
    padded = sampling.pad_prompts(PROMPTS)
    settings = sampling.SamplingSettings(max_new_tokens=4)
    cache = init_cache(config, padded.ids.shape[0], padded.ids.shape[1] + 4, jnp.float32)
    lowered = sampling._sample_padded_jit.lower(
        params, padded.ids, padded.mask, jax.random.key(0), None, cache, config=config, settings=settings, mesh=None
    )
    # k, v and index of the cache (the last three inputs) alias outputs.
    assert lowered.as_text().count("tf.aliasing_output") == 3
    layer_shape = ",".join(map(str, cache.k.shape[1:]))
    copies = re.findall(rf"= f32\[(?:{cache.k.shape[0]},)?{layer_shape}\]\S* copy\(", lowered.compile().as_text())
    assert copies == []


def test_sharded_greedy_equals_single_device(config, params):
    from effopd_jax import sharding

    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_params = jax.device_put(params, sharding.param_shardings(config, mesh))
    prompts = PROMPTS + [[3, 1, 4, 1, 5]]
    single = sampling.generate(config, params, prompts, max_new_tokens=MAX_NEW, temperature=0.0)
    sharded = sampling.generate(config, sharded_params, prompts, max_new_tokens=MAX_NEW, temperature=0.0, mesh=mesh)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)
    # Sampled: per-row keys make the draws independent of the device layout too.
    single_sampled = sampling.generate(config, params, prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=5)
    sharded_sampled = sampling.generate(config, sharded_params, prompts, max_new_tokens=MAX_NEW, temperature=1.0,
                                        seed=5, mesh=mesh)
    np.testing.assert_array_equal(sharded_sampled.tokens, single_sampled.tokens)
    # The low-level API returns the rows split over ('data', 'fsdp') on all 8 devices.
    padded = sampling.pad_prompts(prompts, batch_multiple=sampling.batch_shards(mesh))
    out = sampling.generate_padded(
        config, sharded_params, padded.ids, padded.mask, jax.random.key(0),
        max_new_tokens=MAX_NEW, temperature=0.0, mesh=mesh,
    )
    assert out.tokens.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
    np.testing.assert_array_equal(np.asarray(out.tokens)[: len(prompts)], single.tokens)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "prompts is empty"),
        ([[1, 2], []], {}, r"prompts\[1\] is empty"),
        ([[1] * 200], {}, r"prompts\[0\] has 200 tokens"),
        ([[1] * 10], dict(max_prompt_length=8), "maximum prompt length 8"),
        ([[1] * 120], {}, "exceeds config.max_position_embeddings"),
        ([[1, 96]], {}, "outside"),
        ([[1, 2]], dict(top_p=0.0), "top_p"),
        ([[1, 2]], dict(top_p=1.5), "top_p"),
        ([[1, 2]], dict(temperature=-0.5), "temperature"),
        ([[1, 2]], dict(top_k=-1), "top_k"),
        ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens"),
        ([[1, 2]], dict(eos_token_ids=(500,)), "eos_token_ids"),
        ([[1, 2]], dict(seed="abc"), "seed"),
        ("abc", {}, "list of token-id lists"),
        ([[1, 2], 3], {}, r"prompts\[1\] must be a list"),
    ],
)
def test_bad_input_raises_before_compiling(config, params, prompts, kwargs, message):
    kwargs = {"max_new_tokens": 16, **kwargs}
    with count_compilations() as compiled, pytest.raises(ValueError, match=message):
        sampling.generate(config, params, prompts, **kwargs)
    assert compiled["n"] == 0


def test_pad_prompts_and_buckets():
    assert [sampling.bucket_size(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert sampling.bucket_size(3, minimum=8) == 8
    assert sampling.bucket_size(3, multiple_of=6) == 6
    padded = sampling.pad_prompts([[4, 5, 6], [7]], pad_token_id=9, min_length_bucket=4, batch_multiple=4)
    np.testing.assert_array_equal(padded.ids, [[9, 4, 5, 6], [9, 9, 9, 7], [9, 9, 9, 9], [9, 9, 9, 9]])
    np.testing.assert_array_equal(padded.mask, padded.ids != 9)
    assert padded.num_prompts == 2
