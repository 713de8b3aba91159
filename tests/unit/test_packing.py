"""Packed sequences and micro-batched teacher scoring (effopd_jax/batching.py, teachers.py).

The plan is checked against its definition token by token (numpy); packed scoring against the
padded computation of the same teacher (log-probs <= 1e-5, hidden states), with sequences of very
different lengths (an empty response, one-token prompts, full rows) and several micro-batch sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax import batching, models
from effopd_jax.teachers import Teacher
from tests.helpers_opd import LENGTHS, NEW, PROMPT, TEACHER, hand_rollout

ROWS = len(LENGTHS)


def _lengths():
    return np.array([p for p, _ in LENGTHS]), np.array([r for _, r in LENGTHS])


@pytest.mark.parametrize("micro_batch_size,shards", [(2, 2), (4, 2), (1, 1), (8, 4)])
def test_plan_places_every_real_token_once_within_its_shard(micro_batch_size, shards):
    prompt_lengths, response_lengths = _lengths()
    plan = batching.plan_packing(prompt_lengths, response_lengths, prompt_length=PROMPT, max_new_tokens=NEW,
                                 micro_batch_size=micro_batch_size, shards=shards)
    per_shard, length = micro_batch_size // shards, PROMPT + NEW
    assert plan.segment_ids.shape == (shards, ROWS // micro_batch_size, per_shard, length)
    rows_per_shard = ROWS // shards
    placed, predicted = {}, {}
    for shard in range(shards):
        packed = [tuple(np.asarray(a[shard]).reshape(-1, length)[i] for a in plan[:5])
                  for i in range(ROWS // micro_batch_size * per_shard)]
        for used, (rows, sources, segments, positions, targets) in enumerate(packed):
            if used // per_shard >= int(plan.num_micro_batches):
                assert not segments.any()        # micro-batches beyond the count are empty
            # Segments are contiguous runs numbered 1, 2, ... with padding (0) at the end only.
            ids = segments[segments > 0]
            assert np.all(np.diff(segments[: len(ids)]) >= 0) and not segments[len(ids):].any()
            assert ids.size == 0 or (ids[0] == 1 and set(np.diff(np.unique(ids))) <= {1})
            for segment in np.unique(ids):
                span = np.flatnonzero(segments == segment)
                row = int(rows[span[0]])
                assert np.all(rows[span] == row) and row < rows_per_shard
                global_row = shard * rows_per_shard + row
                p, r = LENGTHS[global_row]
                np.testing.assert_array_equal(sources[span], np.arange(PROMPT - p, PROMPT + r))
                np.testing.assert_array_equal(positions[span], np.arange(p + r))
                for position, source in zip(span, sources[span]):
                    assert (global_row, source) not in placed
                    placed[(global_row, source)] = True
                for position in span:
                    if targets[position] >= 0:
                        key = (global_row, int(targets[position]))
                        assert key not in predicted
                        # The position predicts the token right after it.
                        assert sources[position] + 1 == PROMPT + targets[position]
                        predicted[key] = True
            assert np.all(targets[segments == 0] == -1)
    expected = {(row, s) for row, (p, r) in enumerate(LENGTHS) if r for s in range(PROMPT - p, PROMPT + r)}
    assert set(placed) == expected          # rows without a response are left out
    assert set(predicted) == {(row, t) for row, (_, r) in enumerate(LENGTHS) for t in range(r)}


def test_plan_packs_short_sequences_into_fewer_micro_batches():
    # 8 rows of 3 tokens in rows of 18: one packed row holds them all.
    plan = batching.plan_packing(np.full(8, 1), np.full(8, 2), prompt_length=PROMPT, max_new_tokens=NEW,
                                 micro_batch_size=1, shards=1)
    assert int(plan.num_micro_batches) == 2  # 6 sequences fill the first row (18 tokens), 2 the second
    assert batching.packing_efficiency(plan) == pytest.approx(24 / 36)
    full = batching.plan_packing(np.full(8, PROMPT), np.full(8, NEW), prompt_length=PROMPT, max_new_tokens=NEW,
                                 micro_batch_size=2, shards=2)
    assert int(full.num_micro_batches) == 4 and batching.packing_efficiency(full) == 1.0


def test_plan_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="empty prompt"):
        batching.plan_packing(np.array([0, 2]), np.array([3, 1]), prompt_length=PROMPT, max_new_tokens=NEW,
                              micro_batch_size=1, shards=1)
    with pytest.raises(ValueError, match="multiple of the mesh's 2 batch shards"):
        batching.plan_packing(*_lengths(), prompt_length=PROMPT, max_new_tokens=NEW, micro_batch_size=1, shards=2)
    with pytest.raises(ValueError, match="must divide the step's 8 rows"):
        batching.plan_packing(*_lengths(), prompt_length=PROMPT, max_new_tokens=NEW, micro_batch_size=3, shards=1)
    with pytest.raises(ValueError, match="micro_batch_size > 0"):
        batching.abstract_packing_plan(ROWS, PROMPT, NEW, 0, 1)
    abstract = batching.abstract_packing_plan(ROWS, PROMPT, NEW, 4, 2)
    concrete = batching.plan_packing(*_lengths(), prompt_length=PROMPT, max_new_tokens=NEW, micro_batch_size=4,
                                     shards=2)
    assert [(a.shape, a.dtype) for a in abstract] == [(np.shape(c), np.asarray(c).dtype) for c in concrete]


def test_sequence_lengths_and_the_contiguity_check():
    out = hand_rollout()
    prompt_lengths, response_lengths, contiguous = batching.sequence_lengths(out.prompt_mask, out.response_mask)
    np.testing.assert_array_equal(np.asarray(prompt_lengths), _lengths()[0])
    np.testing.assert_array_equal(np.asarray(response_lengths), _lengths()[1])
    assert bool(contiguous)
    holed = out.response_mask.at[0, 3].set(False)
    assert not bool(batching.sequence_lengths(out.prompt_mask, holed)[2])


def test_micro_batch_relayout_round_trips_and_keeps_shards_together():
    x = jnp.arange(ROWS * 3).reshape(ROWS, 3)
    split = batching.split_micro_batches(x, 4, 2)            # 2 shards of 4 rows, 2 per shard per micro-batch
    np.testing.assert_array_equal(np.asarray(split[0, :, 0]) // 3, [0, 1, 4, 5])
    np.testing.assert_array_equal(np.asarray(batching.merge_micro_batches(split, 2)), np.asarray(x))


@pytest.fixture(scope="module")
def teacher_params():
    return models.init_params(TEACHER, jax.random.key(5))


def _teacher(params, output, micro_batch_size=0, impl=None):
    import dataclasses

    config = TEACHER if impl is None else dataclasses.replace(TEACHER, attention_impl=impl)
    return Teacher(name="t", config=config, params=params, output=output, temperature=0.7, chunk_size=5,
                   micro_batch_size=micro_batch_size)


def _plan(out, micro_batch_size, shards=1):
    p, r, _ = batching.sequence_lengths(out.prompt_mask, out.response_mask)
    return batching.plan_packing(np.asarray(p), np.asarray(r), prompt_length=PROMPT, max_new_tokens=NEW,
                                 micro_batch_size=micro_batch_size, shards=shards)


@pytest.mark.parametrize("impl", ["direct", "blockwise"])
def test_packed_teacher_log_probs_equal_padded(teacher_params, impl):
    out = hand_rollout()
    mask = np.asarray(out.response_mask)
    teacher = _teacher(teacher_params, "token_logprobs", impl=impl)
    padded = np.asarray(teacher._scores("token_logprobs", out, None))
    for micro_batch_size in (1, 4):
        plan = _plan(out, micro_batch_size)
        assert int(plan.num_micro_batches) < ROWS // micro_batch_size  # packing did pack
        packed = np.asarray(teacher._scores("token_logprobs", out, plan))
        np.testing.assert_allclose(packed[mask], padded[mask], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(packed[~mask], 0.0)


def test_packed_and_micro_batched_teacher_hidden_states_equal_padded(teacher_params):
    out = hand_rollout()
    mask = np.asarray(out.response_mask)
    padded = np.asarray(_teacher(teacher_params, "hidden_states")._scores("hidden_states", out, None))
    teacher = _teacher(teacher_params, "hidden_states", micro_batch_size=2)
    micro = np.asarray(teacher._scores("hidden_states", out, None))
    packed = np.asarray(teacher._scores("hidden_states", out, _plan(out, 2)))
    np.testing.assert_allclose(micro[mask], padded[mask], atol=1e-5)
    np.testing.assert_allclose(packed[mask], padded[mask], atol=1e-5)


def test_micro_batched_teacher_log_probs_equal_whole_batch(teacher_params):
    out = hand_rollout()
    mask = np.asarray(out.response_mask)
    whole = np.asarray(_teacher(teacher_params, "token_logprobs")._scores("token_logprobs", out, None))
    for micro_batch_size in (2, 8):
        micro = _teacher(teacher_params, "token_logprobs", micro_batch_size)._scores("token_logprobs", out, None)
        np.testing.assert_allclose(np.asarray(micro)[mask], whole[mask], atol=1e-6)
