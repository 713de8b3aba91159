"""Student rollouts: a jitted, sharded KV-cache sampler.

One call generates continuations for a whole batch of prompts:

1. **Prefill.** The padded prompt batch ``[batch, prompt_len]`` goes through the model in one
   cached call, which writes every prompt key/value into a static-shape cache of
   ``prompt_len + max_new_tokens`` slots. The first new token is sampled from the final-normed
   hidden state of each row's last real prompt token.
2. **Decode.** A ``lax.while_loop`` feeds the previously sampled token (one cached call with
   ``new = 1``), samples the next one and records it. A row stops after it emits one of
   ``eos_token_ids``; the loop exits as soon as every row has stopped or ``max_new_tokens``
   tokens were sampled.

Everything runs inside one ``jax.jit``: parameters are ordinary arguments (a new student after
an optimizer step reuses the compiled program), the sampling settings and shapes are static,
and the cache buffer is donated so prefill and decode update it in place. :func:`generate`
pads prompt lists to buckets (powers of two) so calls inside one bucket share a compilation.

Sampling (per step, row-wise, with ``logits`` the model's float32 next-token logits):

* ``temperature == 0``: greedy, ``argmax(logits)`` (ties: the lowest token id).
* otherwise ``z = logits / temperature``; top-k keeps the ``k`` largest ``z`` (ties broken
  towards the lower token id, so exactly ``k`` survive); top-p then keeps the smallest prefix of
  the survivors, sorted by decreasing probability, whose renormalised mass is ``>= top_p``
  (always at least the most likely token); the token is drawn from ``softmax`` of the kept
  ``z``. This is the order ``transformers`` and vLLM use (temperature, top-k, top-p).

Random numbers do not depend on batching: the draw of response token ``t`` of row ``r`` uses the
key ``fold_in(fold_in(key, r), t)`` (:func:`token_keys`), where ``r`` is the row's index in the
step (``row_ids``; by default its row in the batch). So a row samples the same tokens whatever
the other rows of its batch, its place in it, the micro-batch or slot it runs in or the device
layout, and a resumed run reproduces them; every rollout engine follows this scheme.

The returned ``logprobs`` are ``log pi(token)`` under exactly that filtered, renormalised
distribution. With ``temperature=1``, ``top_k=0`` and ``top_p=1`` this is the student's own
(policy) log-probability ``log_softmax(logits)[token]`` -- the behaviour log-probability the
OPD loss's importance ratio uses. For greedy decoding the sampling distribution is a point mass,
so ``logprobs`` instead holds the unmodified model log-probability ``log_softmax(logits)[token]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import models
from effopd_jax import sharding as sharding_lib
from effopd_jax.models import ModelConfig
from effopd_jax.models import qwen as qwen_lib

# Smallest prompt-length bucket: shorter prompts all share one compilation.
MIN_PROMPT_BUCKET = 8


class SampleOutput(NamedTuple):
    """Generated continuations; row ``b`` belongs to prompt ``b``.

    Attributes:
      tokens: ``[batch, max_new_tokens]`` int32 sampled ids; ``pad_token_id`` after a row stopped.
      logprobs: ``[batch, max_new_tokens]`` float32 log-probability of each token under the
        distribution it was sampled from (see the module docstring); 0 where ``mask`` is False.
      mask: ``[batch, max_new_tokens]`` bool, True for generated tokens up to and including EOS.
      lengths: ``[batch]`` int32, the number of generated tokens (``mask.sum(-1)``).
    """

    tokens: Any
    logprobs: Any
    mask: Any
    lengths: Any


class PaddedPrompts(NamedTuple):
    """A left-padded, bucketed prompt batch (host numpy arrays).

    Attributes:
      ids: ``[batch_bucket, length_bucket]`` int32, ``pad_token_id`` left of each prompt.
      mask: ``[batch_bucket, length_bucket]`` bool, True on real prompt tokens.
      num_prompts: the real prompts are rows ``[0, num_prompts)``; later rows are dummies
        (``mask`` all False) that the sampler treats as already stopped.
    """

    ids: np.ndarray
    mask: np.ndarray
    num_prompts: int


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The static (compile-time) part of a sampling call; hashable, validated on construction."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.pad_token_id, (int, np.integer)) or self.pad_token_id < 0:
            raise ValueError(f"pad_token_id must be an int >= 0, got {self.pad_token_id!r}")
        eos = tuple(self.eos_token_ids)
        if any(not isinstance(t, (int, np.integer)) or t < 0 for t in eos):
            raise ValueError(f"eos_token_ids must be ints >= 0, got {self.eos_token_ids!r}")
        # Normalise so equal settings hash equal (one compilation).
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "eos_token_ids", tuple(sorted({int(t) for t in eos})))
        object.__setattr__(self, "pad_token_id", int(self.pad_token_id))

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError if a token id in the settings is outside ``[0, vocab_size)``."""
        if self.pad_token_id >= vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the vocabulary (size {vocab_size})")
        bad = [t for t in self.eos_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"eos_token_ids {bad} are outside the vocabulary (size {vocab_size})")


# ----------------------------------------------------------------------------------------------
# Sampling one step
# ----------------------------------------------------------------------------------------------


def filtered_logits(
    logits: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[jax.Array, jax.Array | None]:
    """Temperature, then top-k, then top-p, as unnormalised candidate logits.

    Args:
      logits: ``[batch, vocab]`` float32 next-token logits.
      temperature: > 0.
      top_k: keep the ``top_k`` largest logits (0 or >= vocab: off). Ties at the boundary go to
        the lower token id, so exactly ``top_k`` candidates survive.
      top_p: keep the smallest probability-sorted prefix with mass ``>= top_p`` (1: off).

    Returns:
      ``(candidate_logits, candidate_ids)``. Without filtering: ``(logits / T, None)``, the
      candidates being the whole vocabulary in id order. With filtering: ``[batch, C]`` logits
      sorted by decreasing value (``-inf`` for candidates top-p removed) and their ``[batch, C]``
      int32 token ids, ``C = top_k`` or ``vocab``.
    """
    scaled = logits.astype(jnp.float32) / temperature
    vocab = scaled.shape[-1]
    use_top_k = 0 < top_k < vocab
    if not use_top_k and top_p >= 1.0:
        return scaled, None
    # lax.top_k sorts descending and puts the lower index first among equal values, which makes
    # both filters deterministic under ties. With top-p alone this is a full sort of the vocab.
    candidate_logits, candidate_ids = jax.lax.top_k(scaled, top_k if use_top_k else vocab)
    if top_p < 1.0:
        probs = jax.nn.softmax(candidate_logits, axis=-1)
        # Exclusive cumulative mass: candidate i is kept iff the mass strictly before it is
        # < top_p, i.e. the kept prefix is the shortest one whose mass reaches top_p. The first
        # candidate always has mass_before = 0 < top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        mass_before = mass_before.at[..., 0].set(0.0)
        candidate_logits = jnp.where(mass_before < top_p, candidate_logits, -jnp.inf)
    return candidate_logits, candidate_ids.astype(jnp.int32)


def sample_categorical(rng: jax.Array, logits: jax.Array, *, block_size: int | None = None) -> jax.Array:
    """An exact draw from ``softmax(logits)`` per row, with ~``2 sqrt(n)`` random numbers a row.

    ``jax.random.categorical`` adds one Gumbel variate per logit; for a 32k-152k vocabulary that
    random-number generation costs more per decode step on CPU than the rest of the sampling. Here
    the ``n`` candidates are split into blocks of ``block_size``; a block is drawn with
    probability ``sum_{i in block} e^{z_i} / sum_i e^{z_i}`` (a categorical over the blocks'
    logsumexps), then a candidate inside it with probability ``e^{z_i} / sum_{block} e^{z_j}``.
    The product is exactly ``softmax(z)_i``.

    Args:
      rng: a PRNG key.
      logits: ``[batch, n]`` float logits; ``-inf`` entries are never drawn.
      block_size: candidates per block; default a power of two near ``sqrt(n)`` when
        ``n > 1024``, else no blocking (one ``jax.random.categorical``).

    Returns:
      ``[batch]`` int32 indices into the last axis.
    """
    batch, n = logits.shape
    if block_size is None:
        block_size = 1 << ((n - 1).bit_length() + 1) // 2 if n > 1024 else n
    if block_size >= n:
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
    num_blocks = -(-n // block_size)
    padded = jnp.pad(logits, ((0, 0), (0, num_blocks * block_size - n)), constant_values=-jnp.inf)
    blocks = padded.reshape(batch, num_blocks, block_size)
    block_rng, inner_rng = jax.random.split(rng)
    # A block of only -inf has logsumexp -inf and is never drawn.
    block = jax.random.categorical(block_rng, jax.nn.logsumexp(blocks, axis=-1), axis=-1)
    inner_logits = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    inner = jax.random.categorical(inner_rng, inner_logits, axis=-1)
    return (block * block_size + inner).astype(jnp.int32)


def token_keys(key: jax.Array, row_ids: jax.Array, positions: jax.Array | int) -> jax.Array:
    """The per-row keys of one sampling step: ``fold_in(fold_in(key, row_ids[b]), positions[b])``.

    Args:
      key: the step's PRNG key (typed, or a raw ``uint32[2]`` key).
      row_ids: ``[batch]`` int, each row's index in the step.
      positions: the response-token index being sampled, a scalar or ``[batch]`` int.

    Returns:
      ``[batch]`` keys (raw ``[batch, 2]`` uint32 for a raw ``key``).
    """
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), jnp.shape(row_ids))
    return jax.vmap(lambda row, t: jax.random.fold_in(jax.random.fold_in(key, row), t))(row_ids, positions)


def sample_next_token(
    logits: jax.Array, keys: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Samples one token per row, row ``b`` from its own key ``keys[b]``.

    Args:
      logits: ``[batch, vocab]`` next-token logits.
      keys: ``[batch]`` PRNG keys (raw: ``[batch, 2]`` uint32), e.g. from :func:`token_keys`;
        row ``b``'s draw depends on ``keys[b]`` and ``logits[b]`` only. Unused when greedy.
      temperature, top_k, top_p: as in :func:`filtered_logits`; ``temperature == 0`` is greedy.

    Returns:
      ``(tokens [batch] int32, logprobs [batch] float32)``: the log-probability of each token
      under the (filtered, renormalised) distribution it was drawn from; for greedy, under the
      unmodified model distribution ``log_softmax(logits)``.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
        return tokens, logprobs
    candidate_logits, candidate_ids = filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    choice = jax.vmap(lambda key, row: sample_categorical(key, row[None])[0])(keys, candidate_logits)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(candidate_logits, axis=-1), choice[:, None], axis=-1)[:, 0]
    if candidate_ids is None:
        tokens = choice.astype(jnp.int32)
    else:
        tokens = jnp.take_along_axis(candidate_ids, choice[:, None], axis=-1)[:, 0]
    return tokens, logprobs


# ----------------------------------------------------------------------------------------------
# The jitted prefill + decode loop
# ----------------------------------------------------------------------------------------------


class _DecodeState(NamedTuple):
    step: jax.Array  # int32 scalar: tokens sampled so far
    last_token: jax.Array  # [batch] int32: the token the next model call feeds
    done: jax.Array  # [batch] bool: the row has stopped (EOS, or a dummy row)
    tokens: jax.Array  # [batch, max_new_tokens] int32
    logprobs: jax.Array  # [batch, max_new_tokens] float32
    mask: jax.Array  # [batch, max_new_tokens] bool
    cache: Any  # the model family's decoding cache (opaque here)


def _record(state: _DecodeState, sampled: jax.Array, logprob: jax.Array, settings: SamplingSettings) -> _DecodeState:
    """Writes step ``state.step``'s token for rows still running and updates ``done``."""
    active = ~state.done
    column = state.step
    token = jnp.where(active, sampled, settings.pad_token_id).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_index_in_dim(state.tokens, token, column, axis=1)
    logprobs = jax.lax.dynamic_update_index_in_dim(
        state.logprobs, jnp.where(active, logprob, 0.0).astype(jnp.float32), column, axis=1
    )
    mask = jax.lax.dynamic_update_index_in_dim(state.mask, active, column, axis=1)
    is_eos = jnp.zeros_like(active)
    for eos in settings.eos_token_ids:  # a handful of ids: unrolled compares beat jnp.isin
        is_eos = is_eos | (sampled == eos)
    return state._replace(
        step=state.step + 1, last_token=token, done=state.done | is_eos, tokens=tokens, logprobs=logprobs, mask=mask
    )


def _sample_padded(
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    row_ids: jax.Array | None,
    cache: Any,
    *,
    config: ModelConfig,
    settings: SamplingSettings,
    mesh: Mesh | None,
) -> tuple[SampleOutput, Any]:
    """Traced body of :func:`generate_padded` (see there); also returns the final cache so the
    donated input cache buffer is aliased to an output and updated in place."""
    del mesh  # static only: it keys the compilation (see `_sample_padded_jit`)
    batch, prompt_len = prompt_ids.shape
    if row_ids is None:
        row_ids = jnp.arange(batch, dtype=jnp.int32)
    max_new = settings.max_new_tokens

    # A row with no real token is a dummy (batch padding): it starts stopped. It still gets one
    # visible key (its last slot) so no attention row is fully masked (softmax of all -inf).
    row_is_real = jnp.any(prompt_mask, axis=-1)
    prompt_mask = prompt_mask.at[:, -1].set(prompt_mask[:, -1] | ~row_is_real)
    prompt_lengths = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)
    # Positions count real tokens only, so left padding (or any padding) leaves RoPE unchanged.
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1, dtype=jnp.int32) - 1, 0)
    generated_slots = jnp.arange(max_new, dtype=jnp.int32)[None, :]

    def key_mask_after(num_fed: jax.Array) -> jax.Array:
        """[batch, prompt_len + max_new] valid cache slots once `num_fed` new tokens are cached."""
        return jnp.concatenate([prompt_mask, jnp.broadcast_to(generated_slots < num_fed, (batch, max_new))], axis=1)

    # Decode carries one cache buffer per layer, each updated in place (see qwen.KVCache):
    # splitting and re-stacking cost one cache copy per call, not one per token.
    stacked = isinstance(cache, qwen_lib.KVCache) and not getattr(config, "scan_layers", False)
    if stacked:
        cache = qwen_lib.split_cache_layers(cache)

    # Prefill: hidden states rather than logits, so only one [batch, vocab] row per prompt is
    # ever projected (a [batch, prompt_len, vocab] logits tensor is large for real vocabularies).
    hidden, cache = models.forward(
        config,
        params,
        prompt_ids,
        positions=positions,
        attention_mask=key_mask_after(0),
        cache=cache,
        return_hidden_states=True,
    )
    last_slot = prompt_len - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=-1)  # last real token
    last_hidden = jnp.take_along_axis(hidden, last_slot[:, None, None], axis=1)[:, 0]
    # The same projection as the model's own logits (compute dtype in, float32 out), so the
    # first token's logits equal those of an uncached forward.
    first_logits = jnp.einsum(
        "bh,hv->bv",
        last_hidden,
        models.lm_head_weight(config, params).astype(config.dtype),
        preferred_element_type=jnp.float32,
    )

    state = _DecodeState(
        step=jnp.zeros((), jnp.int32),
        last_token=jnp.full((batch,), settings.pad_token_id, jnp.int32),
        done=~row_is_real,
        tokens=jnp.full((batch, max_new), settings.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new), jnp.float32),
        mask=jnp.zeros((batch, max_new), bool),
        cache=cache,
    )
    sample = functools.partial(
        sample_next_token, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p
    )
    token, logprob = sample(first_logits, token_keys(rng, row_ids, 0))
    state = _record(state, token, logprob, settings)

    def keep_going(state: _DecodeState) -> jax.Array:
        return (state.step < max_new) & ~jnp.all(state.done)

    def decode_step(state: _DecodeState) -> _DecodeState:
        # Feed token `step - 1` (written at cache slot prompt_len + step - 1), sample token `step`.
        num_fed = state.step
        logits, cache = models.forward(
            config,
            params,
            state.last_token[:, None],
            positions=(prompt_lengths + num_fed - 1)[:, None],
            attention_mask=key_mask_after(num_fed),
            cache=state.cache,
        )
        token, logprob = sample(logits[:, -1], token_keys(rng, row_ids, num_fed))
        return _record(state._replace(cache=cache), token, logprob, settings)

    state = jax.lax.while_loop(keep_going, decode_step, state)
    lengths = jnp.sum(state.mask, axis=-1, dtype=jnp.int32)
    cache = qwen_lib.stack_cache_layers(state.cache) if stacked else state.cache
    return SampleOutput(state.tokens, state.logprobs, state.mask, lengths), cache


# `mesh` is static only to key the compilation cache: the program traced under a mesh's
# sharding context (its activation constraints) differs from the unsharded one.
_sample_padded_jit = jax.jit(
    _sample_padded, static_argnames=("config", "settings", "mesh"), donate_argnames=("cache",)
)


@functools.partial(jax.jit, static_argnames=("config", "batch", "max_len", "dtype", "out_shardings"))
def _allocate_cache(*, config, batch, max_len, dtype, out_shardings):
    cache = models.init_cache(config, batch, max_len, dtype=dtype)
    if out_shardings is not None:
        cache = jax.lax.with_sharding_constraint(cache, out_shardings)
    return cache


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways the batch dimension is split on ``mesh`` (1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES if a in mesh.shape]))


def generate_padded(
    config: ModelConfig,
    params: Any,
    prompt_ids: jax.Array | np.ndarray,
    prompt_mask: jax.Array | np.ndarray,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    cache_dtype: Any = None,
    mesh: Mesh | None = None,
    row_ids: jax.Array | np.ndarray | None = None,
) -> SampleOutput:
    """Samples continuations of an already padded prompt batch (the trainer's entry point).

    Args:
      config: the model config (static: hashed into the compilation key).
      params: the model's ``params`` tree. An argument of the compiled program, so new values
        with the same shapes never recompile. With ``mesh``, pass them already placed on it
        (``jax.device_put(params, sharding.param_shardings(config, mesh))``); they are used
        where they are, never resharded here.
      prompt_ids: ``[batch, prompt_len]`` int token ids, left-padded (what :func:`pad_prompts`
        builds; any padding layout is correct, since positions come from ``prompt_mask``).
      prompt_mask: ``[batch, prompt_len]`` bool/int, True on real prompt tokens. A row with no
        real token is a dummy: it generates nothing (all-pad ``tokens``, all-False ``mask``).
      rng: the step's PRNG key (``jax.random.key`` or a raw ``uint32[2]`` key); response token
        ``t`` of row ``r`` is drawn with ``fold_in(fold_in(rng, row_ids[r]), t)``.
      max_new_tokens, temperature, top_k, top_p, eos_token_ids, pad_token_id: see the module
        docstring and :class:`SamplingSettings`. All static: each distinct value compiles once.
      cache_dtype: KV-cache dtype; default the config's compute dtype.
      mesh: if given, the batch is split over ('data', 'fsdp') (``batch`` must be a multiple
        of their product) and the cache's KV heads over 'tensor'; the model's activations follow
        ``sharding.LOGICAL_RULES`` (traced under ``sharding.sharding_context(mesh)``).
      row_ids: ``[batch]`` int, each row's index in the step (what its random draws depend on);
        default ``arange(batch)``. Give a sub-batch or a permutation of a step's rows their
        indices in the step and they sample exactly the tokens they sample there.

    Returns:
      :class:`SampleOutput` of device arrays with the ``batch`` rows of the input.

    Each distinct (shapes, settings, config, mesh) compiles once; bucket the shapes (see
    :func:`pad_prompts`) to reuse compilations.
    """
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_ids=tuple(eos_token_ids),
        pad_token_id=pad_token_id,
    )
    settings.check_vocab(config.vocab_size)
    if np.ndim(prompt_ids) != 2:
        raise ValueError(f"prompt_ids must be [batch, prompt_len], got shape {np.shape(prompt_ids)}")
    if np.shape(prompt_mask) != np.shape(prompt_ids):
        raise ValueError(f"prompt_mask shape {np.shape(prompt_mask)} != prompt_ids shape {np.shape(prompt_ids)}")
    batch, prompt_len = np.shape(prompt_ids)
    if batch == 0 or prompt_len == 0:
        raise ValueError(f"prompt_ids must be non-empty, got shape {(batch, prompt_len)}")
    if batch % batch_shards(mesh):
        raise ValueError(
            f"batch size {batch} must be a multiple of the mesh's batch shards {batch_shards(mesh)} "
            f"({'x'.join(sharding_lib.BATCH_AXES)}); pad it (pad_prompts(..., batch_multiple=...))"
        )
    rng = _as_key(rng)
    dtype = jnp.dtype(cache_dtype if cache_dtype is not None else _compute_dtype(config))

    row_sharding = None if mesh is None else sharding_lib.batch_sharding(mesh)
    prompt_ids = _rows_as(prompt_ids, jnp.int32, row_sharding)
    prompt_mask = _rows_as(prompt_mask, jnp.bool_, row_sharding)
    if row_ids is not None:  # (None: arange(batch), built on the device: no host array to place)
        if np.shape(row_ids) != (batch,):
            raise ValueError(f"row_ids must be [batch] = {(batch,)}, got shape {np.shape(row_ids)}")
        row_ids = _rows_as(row_ids, jnp.int32, None if mesh is None else sharding_lib.batch_sharding(mesh, 1))
    cache_shardings = None
    if mesh is not None:
        rng = jax.device_put(rng, NamedSharding(mesh, P()))
        cache_shardings = sharding_lib.cache_shardings(config, mesh)
    cache = _allocate_cache(
        config=config,
        batch=batch,
        max_len=prompt_len + settings.max_new_tokens,
        dtype=dtype,
        out_shardings=cache_shardings,
    )
    if mesh is None:
        output, _ = _sample_padded_jit(
            params, prompt_ids, prompt_mask, rng, row_ids, cache, config=config, settings=settings, mesh=None
        )
    else:
        with sharding_lib.sharding_context(mesh):
            output, _ = _sample_padded_jit(
                params, prompt_ids, prompt_mask, rng, row_ids, cache, config=config, settings=settings, mesh=mesh
            )
    return output


# ----------------------------------------------------------------------------------------------
# Host-side API on lists of prompts
# ----------------------------------------------------------------------------------------------


def bucket_size(n: int, *, minimum: int = 1, multiple_of: int = 1) -> int:
    """The smallest power of two ``>= max(n, minimum)``, rounded up to a multiple of ``multiple_of``."""
    if n < 1 or minimum < 1 or multiple_of < 1:
        raise ValueError(f"bucket_size needs n, minimum, multiple_of >= 1, got {n}, {minimum}, {multiple_of}")
    size = 1 << (max(n, minimum) - 1).bit_length()
    return -(-size // multiple_of) * multiple_of


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    batch_multiple: int = 1,
    min_length_bucket: int = MIN_PROMPT_BUCKET,
) -> PaddedPrompts:
    """Left-pads token-id lists into bucketed arrays.

    The length is padded to ``bucket_size(max_len, minimum=min_length_bucket)`` and the batch to
    ``bucket_size(len(prompts), multiple_of=batch_multiple)`` with dummy rows (mask all False).

    Args:
      prompts: non-empty list of non-empty token-id sequences.
      pad_token_id: id written into padding slots (masked out; any valid id works).
      batch_multiple: the batch bucket is a multiple of this (the mesh's batch shards).
      min_length_bucket: the smallest length bucket.

    Returns:
      :class:`PaddedPrompts`.
    """
    _check_prompt_list(prompts)
    lengths = [len(p) for p in prompts]
    length = bucket_size(max(lengths), minimum=min_length_bucket)
    batch = bucket_size(len(prompts), multiple_of=batch_multiple)
    ids = np.full((batch, length), pad_token_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = np.asarray(prompt, np.int64)
        mask[row, length - len(prompt) :] = True
    return PaddedPrompts(ids, mask, len(prompts))


def generate(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    seed: int | jax.Array = 0,
    mesh: Mesh | None = None,
    max_prompt_length: int | None = None,
    cache_dtype: Any = None,
) -> SampleOutput:
    """Samples a continuation for each prompt (prefill + ``lax.while_loop`` KV-cache decode).

    Args:
      config: the model config.
      params: the model's ``params`` tree (see :func:`generate_padded` for sharding).
      prompts: a list of token-id lists, of any (different) lengths.
      max_new_tokens: tokens to generate per prompt at most.
      temperature: 0 for greedy; otherwise logits are divided by it.
      top_k: keep only the ``top_k`` most likely tokens (0: off).
      top_p: nucleus sampling, in (0, 1] (1: off).
      eos_token_ids: a row stops after emitting any of these (the EOS is kept and masked True).
      pad_token_id: fills prompt padding and ``tokens`` after a row stopped.
      seed: an int, or a PRNG key (the trainer passes keys).
      mesh: optional mesh; the batch is split over ('data', 'fsdp'), KV heads over 'tensor'.
      max_prompt_length: refuse longer prompts (default ``config.max_position_embeddings``).
      cache_dtype: KV-cache dtype (default: the config's compute dtype).

    Returns:
      :class:`SampleOutput` of host numpy arrays, one row per prompt: ``tokens``
      ``[batch, max_new_tokens]`` int32, ``logprobs`` float32, ``mask`` bool, ``lengths`` int32.

    Raises:
      ValueError: on bad input (empty prompt list, empty prompt, too-long prompt, out-of-vocab
        ids, top_p outside (0, 1], negative temperature, top_k < 0, ...) before compiling.
    """
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_ids=tuple(eos_token_ids),
        pad_token_id=pad_token_id,
    )
    settings.check_vocab(config.vocab_size)
    _check_prompt_list(prompts)
    max_positions = int(config.max_position_embeddings)
    limit = max_positions if max_prompt_length is None else int(max_prompt_length)
    for i, prompt in enumerate(prompts):
        if len(prompt) > limit:
            raise ValueError(f"prompts[{i}] has {len(prompt)} tokens, more than the maximum prompt length {limit}")
        if len(prompt) + settings.max_new_tokens > max_positions:
            raise ValueError(
                f"prompts[{i}] ({len(prompt)} tokens) + max_new_tokens ({settings.max_new_tokens}) exceeds "
                f"config.max_position_embeddings ({max_positions})"
            )
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}] has token ids outside [0, {config.vocab_size}): {bad[:5]}")
    rng = _as_key(seed)
    padded = pad_prompts(prompts, pad_token_id=settings.pad_token_id, batch_multiple=batch_shards(mesh))
    output = generate_padded(
        config,
        params,
        padded.ids,
        padded.mask,
        rng,
        mesh=mesh,
        cache_dtype=cache_dtype,
        **dataclasses.asdict(settings),
    )
    # Drop the dummy rows on the host: slicing device arrays by a varying row count would
    # compile one small program per count.
    return SampleOutput(*(np.asarray(x)[: padded.num_prompts] for x in output))


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _check_prompt_list(prompts: Sequence[Sequence[int]]) -> None:
    def is_sequence(x: Any) -> bool:
        return isinstance(x, (Sequence, np.ndarray)) and not isinstance(x, (str, bytes))

    if not is_sequence(prompts):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not is_sequence(prompt):
            raise ValueError(f"prompts[{i}] must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if any(not isinstance(t, (int, np.integer)) for t in prompt):
            raise ValueError(f"prompts[{i}] must contain int token ids")


def _rows_as(x: jax.Array | np.ndarray, dtype: Any, sharding: NamedSharding | None) -> jax.Array | np.ndarray:
    """``x`` in ``dtype``: host arrays are converted on the host (and, with a sharding, sent
    straight to their shards); device arrays stay where they are unless a sharding is given."""
    if isinstance(x, jax.Array):
        x = x if x.dtype == dtype else x.astype(dtype)
    else:
        x = np.asarray(x, dtype)
    return x if sharding is None else jax.device_put(x, sharding)


def _as_key(seed: int | jax.Array) -> jax.Array:
    """An int seed -> ``jax.random.key(seed)``; a typed or raw ``uint32[2]`` key passes through."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array) or isinstance(seed, np.ndarray):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.shape == ():
            return seed
        if seed.dtype == jnp.uint32 and seed.shape == (2,):
            return seed
    raise ValueError(
        f"seed must be an int or a single PRNG key, got {type(seed).__name__} {getattr(seed, 'shape', '')}"
    )


def _compute_dtype(config: ModelConfig) -> Any:
    return getattr(config, "dtype", jnp.float32)
