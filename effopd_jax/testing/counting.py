"""A random Qwen model that counts, so a prompt sets its response's length (rollout tests, benchmarks).

:func:`counting_params` takes random params of a Qwen config and rewires the embedding and the
output head so that after token ``x`` the model predicts ``x + 1`` (mod vocab) with a large
margin; the attention and MLP weights stay random, so every layer does its real work. A prompt
ending in token ``x`` then gets the response ``x + 1, x + 2, ...``, which reaches an EOS id
``e`` after exactly ``(e - x) mod vocab`` tokens: :func:`prompts_for_lengths` builds prompts
whose responses have chosen lengths (under greedy decoding exactly; at temperature 1 with the
default margin, almost surely).

Why it works: with embeddings ``E ~ N(0, 1)`` of dimension ``H`` and head column
``W[:, y] = scale * E[y - 1] / sqrt(H)``, the final hidden state of token ``x`` is close to
``E[x]`` (RMS-normalised; the random layers add a small perturbation), so the logit of ``x + 1``
is ``~ scale * sqrt(H)`` and every other logit ``~ scale * N(0, 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax.models.qwen import QwenConfig, init_params


def counting_params(config: QwenConfig, seed: int, *, scale: float = 8.0) -> Any:
    """Random params of ``config`` whose next-token prediction after ``x`` is ``x + 1``.

    Args:
      config: an untied Qwen config (``tie_word_embeddings=False``).
      seed: seed of the random weights.
      scale: logit scale; the successor's margin over the rest is about
        ``scale * (sqrt(hidden_size) - 3.5)``.

    Returns:
      The params tree (float32 host-friendly device arrays).
    """
    if config.tie_word_embeddings:
        raise ValueError("counting_params needs an untied config (tie_word_embeddings=False)")
    params = jax.device_get(init_params(config, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal((config.vocab_size, config.hidden_size)).astype(np.float32)
    head = scale * np.roll(embedding, 1, axis=0).T / np.sqrt(config.hidden_size)  # column y = E[y - 1]
    params["embed_tokens"]["embedding"] = jnp.asarray(embedding, config.param_dtype)
    params["lm_head"]["kernel"] = jnp.asarray(head, config.param_dtype)
    return params


def prompts_for_lengths(lengths: Sequence[int], *, eos_token_id: int, vocab_size: int, prompt_lengths: Sequence[int],
                        seed: int = 0) -> list[np.ndarray]:
    """Prompts whose counting-model responses end with ``eos_token_id`` after ``lengths[i]`` tokens.

    Each prompt is ``prompt_lengths[i]`` random token ids ending in ``eos_token_id - lengths[i]``
    (mod vocab); the random ids avoid the EOS.
    """
    if len(lengths) != len(prompt_lengths):
        raise ValueError("lengths and prompt_lengths must have one entry per prompt")
    rng = np.random.default_rng(seed)
    prompts = []
    for length, prompt_length in zip(lengths, prompt_lengths):
        if not 1 <= length < vocab_size:
            raise ValueError(f"a response length must be in [1, vocab_size), got {length}")
        body = rng.integers(0, vocab_size - 1, size=prompt_length)
        body = np.where(body >= eos_token_id, body + 1, body) % vocab_size  # never the EOS
        body[-1] = (eos_token_id - length) % vocab_size
        prompts.append(body.astype(np.int32))
    return prompts
