"""The rollout seam: engines that sample the student's responses to a step's prompts.

    engine = make_rollout_engine("static", model_config=config, settings=settings, mesh=mesh,
                                 prompt_length=256)
    rollout = engine.generate(params, prompt_token_ids, key)   # a Rollout of global arrays

An engine turns the student's params, this process's prompts (token-id lists of any lengths)
and a PRNG key into a :class:`Rollout`: the left-padded prompts it decoded from, the sampled
response tokens, their behaviour log-probs (the log-probability under the distribution each
token was drawn from, which the loss's importance weight uses) and the response mask. Arrays
are global `jax.Array`s with the batch split over the mesh's batch axes, so the teacher and the
update read them where they are. The trainer uses three engines, all built here: rollouts,
EffOPD's validation scoring and evaluation (each with its own sampling settings).

Engines are registered by name (`config.rollout.engine`); :func:`register_rollout_engine` adds
one. How to add an engine: docs/architecture.md#how-to-add.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from effopd_jax import data, sampling
from effopd_jax import sharding as sharding_lib
from effopd_jax.models import ModelConfig
from effopd_jax.sampling import SamplingSettings

PyTree = Any


class Rollout(NamedTuple):
    """One batch of student samples, all ``[rows, ...]`` (global arrays, batch-sharded).

    Attributes:
      prompt_ids: ``[rows, prompt_len]`` int32, left-padded prompts.
      prompt_mask: ``[rows, prompt_len]`` bool, True on real prompt tokens.
      response_ids: ``[rows, max_new_tokens]`` int32 sampled tokens (pad after a row stopped).
      response_mask: ``[rows, max_new_tokens]`` bool, generated tokens up to and including EOS.
      behaviour_logprobs: ``[rows, max_new_tokens]`` float32, each token's log-probability under
        the distribution it was sampled from (0 where the mask is False).
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    behaviour_logprobs: jax.Array


class RolloutEngine(Protocol):
    """What the trainer needs of an engine."""

    settings: SamplingSettings

    def generate(self, params: PyTree, prompts: Sequence[np.ndarray], key: jax.Array) -> Rollout:
        """Samples one response per prompt.

        Args:
          params: the student's params (as the model family's forward takes them).
          prompts: this process's rows, token-id arrays of any lengths up to the engine's
            prompt length; every process passes the same number of rows.
          key: the step's PRNG key.

        Returns:
          A :class:`Rollout` whose rows are every process's prompts, in process order.
        """
        ...


class StaticEngine:
    """All rows at once: one prefill of the left-padded batch into a dense KV cache of
    ``prompt_length + max_new_tokens`` slots, then a jitted ``lax.while_loop`` decode until
    every row has stopped (``effopd_jax.sampling``). Memory grows with the rows of the step; the
    compiled program is reused for every step (static shapes).
    """

    def __init__(self, *, model_config: ModelConfig, settings: SamplingSettings, mesh: Mesh,
                 prompt_length: int):
        settings.check_vocab(model_config.vocab_size)
        self.model_config = model_config
        self.settings = settings
        self.mesh = mesh
        self.prompt_length = prompt_length

    def generate(self, params: PyTree, prompts: Sequence[np.ndarray], key: jax.Array) -> Rollout:
        ids, mask = data.left_pad(prompts, self.settings.pad_token_id, self.prompt_length)
        prompt_ids = sharding_lib.global_batch(self.mesh, ids)
        prompt_mask = sharding_lib.global_batch(self.mesh, mask)
        sample = sampling.generate_padded(
            self.model_config, params, prompt_ids, prompt_mask, key, mesh=self.mesh,
            max_new_tokens=self.settings.max_new_tokens, temperature=self.settings.temperature,
            top_k=self.settings.top_k, top_p=self.settings.top_p,
            eos_token_ids=self.settings.eos_token_ids, pad_token_id=self.settings.pad_token_id,
        )
        return Rollout(prompt_ids, prompt_mask, sample.tokens, sample.mask, sample.logprobs)


EngineFactory = Callable[..., RolloutEngine]
_ENGINES: dict[str, EngineFactory] = {"static": StaticEngine}


def register_rollout_engine(name: str, factory: EngineFactory) -> None:
    """Makes ``config.rollout.engine = name`` build engines with ``factory(**kwargs)`` (the
    keyword arguments of :func:`make_rollout_engine`)."""
    if name in _ENGINES and _ENGINES[name] is not factory:
        raise ValueError(f"a rollout engine named {name!r} is already registered")
    _ENGINES[name] = factory


def rollout_engines() -> tuple[str, ...]:
    """The registered engine names."""
    return tuple(sorted(_ENGINES))


def make_rollout_engine(name: str, *, model_config: ModelConfig, settings: SamplingSettings,
                        mesh: Mesh, prompt_length: int) -> RolloutEngine:
    """Builds the engine registered as ``name``.

    Raises:
      ValueError: no engine of that name (the message lists the registered ones), or a token id
        of ``settings`` outside the model's vocabulary.
    """
    if name not in _ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; registered: {rollout_engines()}")
    return _ENGINES[name](model_config=model_config, settings=settings, mesh=mesh,
                          prompt_length=prompt_length)
