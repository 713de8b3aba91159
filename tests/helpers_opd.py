"""A tiny student / teacher pair and hand-made rollouts of very different lengths, for the
micro-batching, packing and accumulation tests (no sampler: the lengths are chosen, so every
case — an empty response, a one-token prompt, a full-length row — is there on purpose)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from effopd_jax.models.qwen import QwenConfig
from effopd_jax.rollout import Rollout

VOCAB = 48
# The student attends directly (cheap to compile: the accumulation tests compile many updates);
# test_attention.py checks the other forms against it.
STUDENT = QwenConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, dtype=jnp.float32,
                     tie_word_embeddings=True, attention_impl="direct")
TEACHER = dataclasses.replace(STUDENT, hidden_size=24, intermediate_size=40, attention_impl="blockwise")

PROMPT, NEW = 6, 12
# (prompt tokens, response tokens) per row: an empty response, one-token prompts, full rows.
LENGTHS = ((6, 12), (1, 1), (3, 0), (2, 9), (6, 3), (1, 12), (4, 5), (5, 2))


def hand_rollout(lengths=LENGTHS, prompt_length: int = PROMPT, new_tokens: int = NEW, seed: int = 0) -> Rollout:
    """Left-padded prompts, right-padded responses of the given lengths, random tokens, and
    behaviour log-probs (garbage at padding, which nothing may read)."""
    rng = np.random.RandomState(seed)
    rows = len(lengths)
    prompt_ids = np.zeros((rows, prompt_length), np.int32)
    prompt_mask = np.zeros((rows, prompt_length), bool)
    response_ids = np.zeros((rows, new_tokens), np.int32)
    response_mask = np.zeros((rows, new_tokens), bool)
    for row, (p, r) in enumerate(lengths):
        prompt_ids[row, prompt_length - p:] = rng.randint(1, VOCAB, p)
        prompt_mask[row, prompt_length - p:] = True
        response_ids[row, :r] = rng.randint(1, VOCAB, r)
        response_mask[row, :r] = True
    behaviour = np.where(response_mask, -rng.uniform(0.5, 4.0, (rows, new_tokens)), np.nan)
    return Rollout(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), jnp.asarray(response_ids),
                   jnp.asarray(response_mask), jnp.asarray(behaviour, jnp.float32))
