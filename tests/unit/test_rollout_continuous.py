"""The continuous-batching engine against the static engine, row by row.

The reference is the static engine (a dense KV cache, every row at once), which
tests/unit/test_sampling.py checks against the uncached forward and `transformers`. The model is
a tiny random Qwen3 rewired to count (`effopd_jax.testing.counting`), so each prompt fixes its
response's length: lengths from 1 to the cap in one step, with fewer slots than rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax import models, rollout, sampling
from effopd_jax import sharding as sharding_lib
from effopd_jax.models import paged
from effopd_jax.models.qwen import QwenConfig
from effopd_jax.testing.counting import counting_params, prompts_for_lengths

VOCAB, EOS, PROMPT_LENGTH, MAX_NEW = 64, 63, 8, 24
CONFIG = QwenConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, dtype=jnp.float32,
                    max_position_embeddings=64)
# Response lengths by design (30 > MAX_NEW: cut at the cap without EOS) and prompt lengths.
LENGTHS = [1, 2, 23, 5, 17, 8, 1, 13, 30, 4, 11, 3]
PROMPT_LENGTHS = [3, 8, 1, 6, 2, 7, 5, 4, 8, 1, 6, 2]
PROMPTS = prompts_for_lengths(LENGTHS, eos_token_id=EOS, vocab_size=VOCAB, prompt_lengths=PROMPT_LENGTHS)
OPTIONS = dict(slots=4, page_size=4, decode_steps=5)


@pytest.fixture(scope="module")
def mesh():
    return sharding_lib.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def counting():
    """Counts with a wide margin: greedy and T = 1 give the designed lengths."""
    return counting_params(CONFIG, 0)


@pytest.fixture(scope="module")
def noisy():
    """Counts with a small margin: sampled responses wander, so their lengths are random."""
    return counting_params(CONFIG, 1, scale=1.2)


def settings(temperature, **kwargs):
    return sampling.SamplingSettings(max_new_tokens=MAX_NEW, temperature=temperature, eos_token_ids=(EOS,), **kwargs)


def engines(mesh, sampling_settings, **options):
    static = rollout.make_rollout_engine("static", model_config=CONFIG, settings=sampling_settings, mesh=mesh,
                                         prompt_length=PROMPT_LENGTH)
    continuous = rollout.make_rollout_engine("continuous", model_config=CONFIG, settings=sampling_settings,
                                             mesh=mesh, prompt_length=PROMPT_LENGTH, options={**OPTIONS, **options})
    return static, continuous


def assert_same_rollout(got: rollout.Rollout, want: rollout.Rollout):
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name)
    # The paged attention's online softmax rounds differently from the dense one.
    np.testing.assert_allclose(np.asarray(got.behaviour_logprobs), np.asarray(want.behaviour_logprobs), atol=2e-5)


def test_paged_forward_equals_the_uncached_forward():
    """Prefill (left-padded, scrambled pages, two shards) then decode steps through the pages."""
    config = dataclasses.replace(CONFIG, scan_layers=True)
    params = models.init_params(config, jax.random.key(0))
    rng = np.random.RandomState(0)
    batch, prompt, steps, page_size, shards = 4, 6, 7, 4, 2
    lengths = [6, 2, 4, 5]
    sequences = [rng.randint(1, VOCAB, size=n + steps) for n in lengths]
    pages_per_row = -(-(prompt + steps) // page_size)
    cache = models.init_paged_cache(config, shards=shards, pages_per_shard=1 + 2 * pages_per_row,
                                    page_size=page_size, dtype=jnp.float32)
    table = np.stack([1 + (b % 2) * pages_per_row + rng.permutation(pages_per_row) for b in range(batch)])
    ids, valid = np.zeros((batch, prompt), np.int32), np.zeros((batch, prompt), bool)
    for b, n in enumerate(lengths):
        ids[b, prompt - n:], valid[b, prompt - n:] = sequences[b][:n], True
    forward = jax.jit(lambda p, x, index, c: models.forward_paged(config, p, x, index=index, cache=c))
    index = paged.PagedPrefill(jnp.asarray(table), jnp.asarray(np.maximum(np.cumsum(valid, 1) - 1, 0)),
                               jnp.asarray(valid))
    logits, cache = forward(params, ids, index, cache)
    # Reference: one uncached forward of the right-padded sequences (causal: the padding on the
    # right never changes earlier positions).
    right_padded = np.zeros((batch, prompt + steps), np.int32)
    for b, s in enumerate(sequences):
        right_padded[b, : len(s)] = s
    full = np.asarray(jax.jit(lambda p, x: models.forward(config, p, x))(params, right_padded))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits)[b, prompt - n:], full[b, :n], atol=1e-5)
    for t in range(steps - 1):
        running = np.array([True, True, t < 3, True])  # row 2 stops: its later writes go to the null page
        index = paged.PagedDecode(jnp.asarray(table), jnp.asarray([[n + t] for n in lengths]),
                                  jnp.asarray(running[:, None]), block_pages=2)
        tokens = np.array([[s[n + t]] for s, n in zip(sequences, lengths)], np.int32)
        logits, cache = forward(params, tokens, index, cache)
        for b, n in enumerate(lengths):
            if running[b]:
                np.testing.assert_allclose(np.asarray(logits)[b, 0], full[b, n + t], atol=1e-5)


def test_greedy_equals_the_static_engine_with_fewer_slots_than_rows(mesh, counting):
    static, continuous = engines(mesh, settings(0.0))
    want = static.generate(counting, PROMPTS, jax.random.key(0))
    got = continuous.generate(counting, PROMPTS, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(want.response_mask).sum(1), np.minimum(LENGTHS, MAX_NEW))
    assert_same_rollout(got, want)
    stats = continuous.last_stats
    # One prefill batch per row (prefill_rows=1), each a host call except the ones fused with decoding.
    assert stats["prefill_batches"] == len(PROMPTS) and stats["preemptions"] == 0
    assert 0 < stats["slot_occupancy"] <= 1 and len(PROMPTS) <= stats["host_calls"] < 2 * len(PROMPTS)


def test_sampled_equals_the_static_engine_row_by_row(mesh, noisy):
    static, continuous = engines(mesh, settings(1.0, top_k=20, top_p=0.95))
    want = static.generate(noisy, PROMPTS, jax.random.key(3))
    got = continuous.generate(noisy, PROMPTS, jax.random.key(3))
    lengths = np.asarray(want.response_mask).sum(1)
    assert lengths.min() <= 3 and lengths.max() == MAX_NEW  # very different lengths
    assert_same_rollout(got, want)
    # The same rows in another slot layout (two slots, two rows per prefill) sample the same tokens.
    _, other = engines(mesh, settings(1.0, top_k=20, top_p=0.95), slots=2, prefill_rows=2, decode_steps=3)
    assert_same_rollout(other.generate(noisy, PROMPTS, jax.random.key(3)), want)


def test_a_small_page_pool_preempts_and_still_samples_the_same_tokens(mesh, noisy):
    # Two longest rows' worth of pages for four slots: rows that outgrow the pool are restarted.
    pages_per_row = -(-(PROMPT_LENGTH + MAX_NEW - 1) // OPTIONS["page_size"])
    static, continuous = engines(mesh, settings(1.0), kv_pages=2 * pages_per_row)
    want = static.generate(noisy, PROMPTS, jax.random.key(4))
    got = continuous.generate(noisy, PROMPTS, jax.random.key(4))
    assert continuous.last_stats["preemptions"] > 0
    assert_same_rollout(got, want)


def test_kv_memory_follows_slots_not_rows(mesh):
    sampling_settings = settings(1.0)
    static, continuous = engines(mesh, sampling_settings)
    rows = len(PROMPTS)

    def memory(engine, rows, name):
        program = {p.name: p for p in engine.programs(rows)}[name]
        return program, program.lower().compile().memory_analysis()

    decode, small = memory(continuous, rows, "rollout_step")
    decode_2x, large = memory(continuous, 2 * rows, "rollout_step")
    cache_bytes = lambda program: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(program.args[1].cache))  # noqa: E731
    assert cache_bytes(decode) == cache_bytes(decode_2x)
    assert small.temp_size_in_bytes == large.temp_size_in_bytes
    # The arguments grow by exactly the extra rows' prompts (ids, mask) and responses (tokens,
    # log-probs, lengths).
    assert large.argument_size_in_bytes - small.argument_size_in_bytes == rows * (
        PROMPT_LENGTH * (4 + 1) + MAX_NEW * (4 + 4) + 4)
    # The static engine's dense cache doubles with the rows.
    static_cache = lambda rows: sum(  # noqa: E731  (the dense cache's keys and values)
        x.size * x.dtype.itemsize for x in static.programs(rows)[0].args[5][:2])
    assert static_cache(2 * rows) == 2 * static_cache(rows)
    per_row = 2 * CONFIG.num_hidden_layers * CONFIG.num_key_value_heads * CONFIG.head_dim * 4
    assert static_cache(rows) == rows * (PROMPT_LENGTH + MAX_NEW) * per_row
    # The pool: one longest row per slot (in pages) plus one null page per shard.
    pages = OPTIONS["slots"] * continuous.pages_per_row + 1
    assert cache_bytes(decode) == pages * OPTIONS["page_size"] * per_row


def test_on_the_trainer_mesh_equals_one_device(mesh, noisy):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh8 = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    prompts = PROMPTS + PROMPTS[:4]  # 16 rows: 4 per batch shard
    sampling_settings = settings(1.0)
    static, _ = engines(mesh, sampling_settings)
    want = static.generate(noisy, prompts, jax.random.key(5))
    continuous = rollout.make_rollout_engine("continuous", model_config=CONFIG, settings=sampling_settings,
                                             mesh=mesh8, prompt_length=PROMPT_LENGTH, options=OPTIONS)
    sharded = jax.device_put(noisy, sharding_lib.param_shardings(CONFIG, mesh8))
    got = continuous.generate(sharded, prompts, jax.random.key(5))
    assert_same_rollout(got, want)
    assert got.response_ids.sharding.is_equivalent_to(sharding_lib.batch_sharding(mesh8), 2)


def test_bad_settings_are_refused(mesh):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    mesh8 = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    make = lambda mesh, **options: rollout.make_rollout_engine(  # noqa: E731
        "continuous", model_config=CONFIG, settings=settings(1.0), mesh=mesh, prompt_length=PROMPT_LENGTH,
        options=options)
    with pytest.raises(ValueError, match=r"rollout.slots=6 must be a multiple of the mesh's batch shards"):
        make(mesh8, slots=6)
    with pytest.raises(ValueError, match=r"rollout.kv_pages=4 gives each of the 1 batch shards 4 pages, fewer"):
        make(mesh, slots=2, page_size=4, kv_pages=4)
    with pytest.raises(ValueError, match="rollout.page_size must be a positive int"):
        make(mesh, page_size=0)
    with pytest.raises(ValueError, match=r"unknown continuous-engine options \['pages'\]"):
        make(mesh, pages=3)
