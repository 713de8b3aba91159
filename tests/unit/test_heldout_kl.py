"""The exact held-out reverse KL (effopd_jax.trainer.heldout) against numpy, and its warning."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax import models
from effopd_jax.rollout import Rollout
from effopd_jax.trainer.heldout import heldout_reverse_kl, kl_rise_warning, sample_prefixes
from helpers_tiny import tiny_qwen3_config

VOCAB = 37


def numpy_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def numpy_heldout_kl(student_logits, teacher_logits, prompt_len, response_mask) -> float:
    """Token-mean of sum_v p_s (log p_s - log p_t) at the positions predicting the response tokens."""
    s = numpy_log_softmax(student_logits)[:, prompt_len - 1 : -1]  # position prompt_len-1+t predicts token t
    t = numpy_log_softmax(teacher_logits)[:, prompt_len - 1 : -1]
    per_token = np.sum(np.exp(s) * (s - t), axis=-1)
    return float(np.sum(per_token * response_mask) / np.sum(response_mask))


def float32_config(**kwargs):
    """A tiny Qwen3 computing in float32, so the reference logits are as precise as ours."""
    return dataclasses.replace(tiny_qwen3_config(**kwargs), dtype=jnp.float32, param_dtype=jnp.float32)


def test_exact_heldout_kl_equals_numpy_on_a_tiny_pair():
    student_config = float32_config(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                       num_kv_heads=1, head_dim=8, intermediate_size=32, eos_token_id=2,
                                       pad_token_id=0)
    teacher_config = float32_config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                       num_kv_heads=2, head_dim=8, intermediate_size=48, eos_token_id=2,
                                       pad_token_id=0)
    student = models.init_params(student_config, jax.random.key(1))
    teacher = models.init_params(teacher_config, jax.random.key(2))
    rng = np.random.default_rng(0)
    rows, prompt_len, new = 3, 5, 7
    prompt_ids = rng.integers(3, VOCAB, (rows, prompt_len)).astype(np.int32)
    prompt_mask = np.ones((rows, prompt_len), bool)
    prompt_mask[1, :2] = False  # left padding
    prompt_ids[1, :2] = 0
    response_ids = rng.integers(3, VOCAB, (rows, new)).astype(np.int32)
    response_mask = np.ones((rows, new), bool)
    response_mask[0, 4:] = False  # stopped early
    response_mask[2, 1:] = False
    prefixes = Rollout(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), jnp.asarray(response_ids),
                       jnp.asarray(response_mask), jnp.zeros((rows, new), jnp.float32))

    ours = float(jax.jit(lambda s, t, p: heldout_reverse_kl(student_config, s, teacher_config, t, p, chunk_size=3))(
        student, teacher, prefixes))

    ids = np.concatenate([prompt_ids, response_ids], axis=1)
    mask = np.concatenate([prompt_mask, response_mask], axis=1)
    logits = {name: np.asarray(models.forward(config, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
              for name, config, params in (("s", student_config, student), ("t", teacher_config, teacher))}
    reference = numpy_heldout_kl(logits["s"], logits["t"], prompt_len, response_mask)
    assert ours == pytest.approx(reference, rel=1e-5)
    assert reference > 0.0
    # The same model on both sides: exactly no divergence.
    same = float(heldout_reverse_kl(student_config, student, student_config, student, prefixes))
    assert same == pytest.approx(0.0, abs=1e-6)


class _RecordingEngine:
    """An engine that answers every prompt with one token per prompt token (and records calls)."""

    def __init__(self):
        self.calls = []

    def generate(self, params, prompts, key):
        self.calls.append([list(p) for p in prompts])
        rows = len(prompts)
        return Rollout(jnp.zeros((rows, 4), jnp.int32), jnp.ones((rows, 4), bool), jnp.ones((rows, 3), jnp.int32),
                       jnp.ones((rows, 3), bool), jnp.zeros((rows, 3), jnp.float32))


def test_sample_prefixes_pads_to_the_row_multiple_and_masks_the_padding():
    engine = _RecordingEngine()
    prompts = [np.array([5, 6]), np.array([7]), np.array([8, 9, 10])]
    prefixes = sample_prefixes(engine, None, prompts, jax.random.key(0), rows_multiple=4)
    assert engine.calls == [[[5, 6], [7], [8, 9, 10], [8, 9, 10]]]  # padded with the last prompt
    np.testing.assert_array_equal(np.asarray(prefixes.response_mask).sum(axis=1), [3, 3, 3, 0])
    with pytest.raises(ValueError, match="eval.kl_prompts"):
        sample_prefixes(engine, None, [], jax.random.key(0), rows_multiple=1)


@pytest.mark.parametrize("history,rises,fires", [
    ([0.5, 0.6, 0.7, 0.8], 3, True),            # three rises in a row
    ([0.9, 0.5, 0.6, 0.7, 0.8], 3, True),       # after a fall, the last three rose
    ([0.5, 0.6, 0.7], 3, False),                # only two evaluations after the first
    ([0.9, 0.5, 0.6, 0.6, 0.8], 3, False),      # a flat step breaks the streak (and below the first)
    ([0.8, 0.7, 0.6, 0.5], 3, False),           # falling: the student approaches the teacher
    ([0.95, 0.5, 0.7, 0.6, 0.8, 0.9], 3, False),  # noisy, below the first value
    ([0.5, 0.6, math.nan, 0.8], 3, False),      # NaN is not a rise
    ([0.1, 0.2], 1, True),
    # Above the first value for the last three evaluations without three rises (the demo at lr 1e-3).
    ([1.185, 1.480, 1.486, 1.439], 3, True),
    ([0.5, 0.7, 0.6, 0.8, 0.9], 3, True),       # noisy but away from the teacher
    ([1.185, 1.480, 1.486, 1.1], 3, False),     # back below the first value
    ([1.185, 1.480, 1.486], 3, False),          # too few evaluations
])
def test_kl_warning_fires_on_a_rising_sequence_only(history, rises, fires):
    warning = kl_rise_warning(history, rises, learning_rate=1e-5)
    if fires:
        assert warning is not None and "optimizer.learning_rate=1e-05" in warning
        assert f"{history[-1]:.4g}" in warning and warning.startswith("WARNING")
        rising = all(b > a for a, b in zip(history[-(rises + 1):], history[-rises:]))
        assert ("rose over the last" in warning) == rising
        assert ("stayed above its first value" in warning) == (not rising)
    else:
        assert warning is None


def test_kl_warning_needs_a_positive_count():
    with pytest.raises(ValueError, match="rises"):
        kl_rise_warning([1.0, 2.0], 0, 1e-5)
