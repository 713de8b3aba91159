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

Two engines are built in: ``static`` (:class:`StaticEngine`: every row at once in a dense KV
cache, `effopd_jax.sampling`) and ``continuous``
(:class:`effopd_jax.continuous_batching.ContinuousEngine`: a fixed number of slots over a paged
KV cache, refilled as rows finish). Both sample a row's tokens from keys that depend only on
(the step's key, the row's index in the step, the token position), so they return the same
rollout for the same step.

Engines are registered by name (`config.rollout.engine`); :func:`register_rollout_engine` adds
one. How to add an engine: docs/architecture.md#how-to-add. An engine also lists its jitted
programs with abstract arguments (:meth:`RolloutEngine.programs`, :class:`EngineProgram`), so a
memory plan can compile them for a target without weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import data, models, sampling
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


class EngineProgram(NamedTuple):
    """One jitted program of an engine, with abstract arguments to compile it ahead of time.

    ``program.lower().compile().memory_analysis()`` gives its argument / output / temporary
    bytes per device for the engine's mesh, without any weights or arrays.

    Attributes:
      name: e.g. ``"rollout_step"``.
      fn: the ``jax.jit``-wrapped function the engine calls.
      args: its positional arguments as pytrees of ``jax.ShapeDtypeStruct`` (with shardings).
      kwargs: its static keyword arguments.
      mesh: the mesh the program is traced under (its activation sharding constraints).
    """

    name: str
    fn: Any
    args: tuple
    kwargs: dict
    mesh: Mesh

    def lower(self) -> Any:
        """``fn.lower(*args, **kwargs)`` under the mesh's sharding context."""
        with sharding_lib.sharding_context(self.mesh):
            return self.fn.lower(*self.args, **self.kwargs)


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
          A :class:`Rollout` whose rows are every process's prompts, in process order. Row
          ``r``'s tokens are drawn with ``sampling.token_keys(key, r, t)`` (t: token position).
        """
        ...

    def programs(self, rows: int) -> tuple[EngineProgram, ...]:
        """The jitted programs one ``generate`` of ``rows`` rows runs, with abstract arguments
        (the trainer's shardings, nothing allocated)."""
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

    def programs(self, rows: int) -> tuple[EngineProgram, ...]:
        """``rollout``: the whole prefill + decode loop (``sampling._sample_padded_jit``) for
        ``rows`` rows; its donated cache is ``[layers, rows, prompt_length + max_new_tokens, ...]``."""
        config, mesh = self.model_config, self.mesh
        rows_sharding = sharding_lib.batch_sharding(mesh)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              models.abstract_params(config), sharding_lib.param_shardings(config, mesh))
        dtype = getattr(config, "dtype", np.float32)
        cache = jax.eval_shape(lambda: models.init_cache(
            config, rows, self.prompt_length + self.settings.max_new_tokens, dtype=dtype))
        cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache,
                             sharding_lib.cache_shardings(config, mesh))
        ids = jax.ShapeDtypeStruct((rows, self.prompt_length), np.int32, sharding=rows_sharding)
        mask = jax.ShapeDtypeStruct((rows, self.prompt_length), np.bool_, sharding=rows_sharding)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
        return (EngineProgram("rollout", sampling._sample_padded_jit, (params, ids, mask, key, None, cache),
                              dict(config=config, settings=self.settings, mesh=mesh), mesh),)


EngineFactory = Callable[..., RolloutEngine]
_ENGINES: dict[str, EngineFactory] = {"static": StaticEngine}
# The engine's own settings: field names under `config.rollout` (its schema rows apply when
# `rollout.engine` names it).
_ENGINE_OPTIONS: dict[str, tuple[str, ...]] = {"static": ()}


def _cast_floating(params: PyTree, dtype: Any) -> PyTree:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


_cast_floating_jit = jax.jit(_cast_floating, static_argnames="dtype")


def cast_rollout_params(params: PyTree, weight_dtype: str | Any) -> PyTree:
    """The params an engine samples with: floating leaves cast to ``weight_dtype`` (``config.rollout.weight_dtype``).

    One jitted elementwise pass, once per step (each array keeps its sharding). A decode step
    reads every weight once, so e.g. ``bfloat16`` weights halve its bytes; the returned behaviour
    log-probs are then the cast model's (the distribution the tokens were drawn from), which the
    loss's truncated importance weight ``exp(s_t - behaviour_t)`` reweights towards the
    full-precision student. ``''``/None, or params already in that dtype: returned as they are.

    Args:
      params: the model's params tree.
      weight_dtype: a dtype name (``"bfloat16"``, ...), a dtype, or ``''``/None for no cast.

    Returns:
      the params tree (new arrays where cast).
    """
    if weight_dtype in ("", None):
        return params
    dtype = jnp.dtype(weight_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"rollout.weight_dtype must be a floating dtype, got {weight_dtype!r}")
    if all(x.dtype == dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)):
        return params
    return _cast_floating_jit(params, dtype=dtype)


def register_rollout_engine(name: str, factory: EngineFactory, *, options: Sequence[str] = ()) -> None:
    """Makes ``config.rollout.engine = name`` build engines with ``factory(**kwargs)`` (the
    keyword arguments of :func:`make_rollout_engine`; ``options`` only when given).

    Args:
      name: the engine's name.
      factory: a class or function taking those keyword arguments.
      options: the ``config.rollout`` fields that are the engine's own settings
        (:func:`engine_options` reads them for the trainer).
    """
    if name in _ENGINES and _ENGINES[name] is not factory:
        raise ValueError(f"a rollout engine named {name!r} is already registered")
    _ENGINES[name] = factory
    _ENGINE_OPTIONS[name] = tuple(options)


def rollout_engines() -> tuple[str, ...]:
    """The registered engine names."""
    return tuple(sorted(_ENGINES))


def make_rollout_engine(name: str, *, model_config: ModelConfig, settings: SamplingSettings,
                        mesh: Mesh, prompt_length: int, options: Mapping[str, Any] | None = None
                        ) -> RolloutEngine:
    """Builds the engine registered as ``name``.

    Args:
      name: the registered name (``config.rollout.engine``).
      model_config, settings, mesh, prompt_length: what every engine takes.
      options: the engine's own settings (e.g. ``{"slots": 64}`` for ``continuous``; see
        :func:`engine_options`), passed as ``options=``; None: the engine's defaults.

    Raises:
      ValueError: no engine of that name (the message lists the registered ones), a token id
        of ``settings`` outside the model's vocabulary, or a bad option.
    """
    if name not in _ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; registered: {rollout_engines()}")
    kwargs = dict(model_config=model_config, settings=settings, mesh=mesh, prompt_length=prompt_length)
    if options:
        kwargs["options"] = dict(options)
    return _ENGINES[name](**kwargs)


def engine_options(name: str, rollout_config: Mapping[str, Any]) -> dict[str, Any]:
    """Engine ``name``'s own settings read from ``config.rollout`` (the fields it registered),
    for :func:`make_rollout_engine`'s ``options``."""
    return {field: rollout_config[field] for field in _ENGINE_OPTIONS.get(name, ())}


# The built-in continuous-batching engine (imported last: it builds on the names above).
from effopd_jax.continuous_batching import ContinuousEngine  # noqa: E402

register_rollout_engine("continuous", ContinuousEngine,
                        options=("slots", "page_size", "kv_pages", "decode_steps", "prefill_rows"))
