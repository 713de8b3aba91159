"""Models: one family-agnostic API over every registered model family.

    from effopd_jax import models

    config, params = models.load_hf("/ckpt/Qwen3-1.7B", param_dtype="float32",
                                    compute_dtype="bfloat16")
    logits = models.forward(config, params, input_ids, attention_mask=mask)  # [batch, seq, vocab]
    models.save_hf(config, params, "/out/student")

A *family* (Qwen2/2.5/3: `effopd_jax/models/qwen.py`; Qwen3-MoE: `effopd_jax/models/qwen3_moe.py`,
on the shared MoE block of `effopd_jax/models/moe.py`; Qwen3.5/3.6 hybrids:
`effopd_jax/models/qwen3_5.py`; Qwen3.5-MoE: `effopd_jax/models/qwen3_5_moe.py`) registers itself under the HF
`model_type`s it reads; every function here dispatches on `config.model_type`, so callers never
import a family module. An unsupported `model_type` is refused with the list of supported ones.
The parameter layout (`layout(config)`) tells conversion, EffOPD's default filter, the
foresight monitor and the analysis what each parameter leaf is.

Public API
  load_hf, save_hf, load_params, config_from_hf      HF safetensors checkpoints <-> params
  forward                                            logits (or hidden states), optional cache
  forward_with_aux                                   the training forward: output + AuxOutput
                                                     (a mixture of experts' router losses)
  init_params, abstract_params, param_logical_axes   params without a checkpoint; their axes
  init_cache, lm_head_weight, layout                 decoding cache, output head, layout
  init_paged_cache, forward_paged                    paged decoding cache (continuous batching)
  relayout_params                                    the same weights in another tree layout
  family_for, register_family, supported_model_types the registry
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

# Importing a family module registers it.
from effopd_jax.models import qwen as _qwen  # noqa: F401
from effopd_jax.models import qwen3_moe as _qwen3_moe  # noqa: F401
from effopd_jax.models import qwen3_5 as _qwen3_5  # noqa: F401
from effopd_jax.models import qwen3_5_moe as _qwen3_5_moe  # noqa: F401
from effopd_jax.models.family import (
    AuxOutput,
    ModelConfig,
    ModelFamily,
    ModelLayout,
    ParamInfo,
    UnsupportedConfigError,
    family_for,
    read_hf_config,
    register_family,
    supported_model_types,
)
from effopd_jax.models.hf import (
    CheckpointError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    config_from_hf,
    load_hf,
    load_params,
    save_hf,
)

PyTree = Any

__all__ = [
    "AuxOutput", "CheckpointError", "MissingTensorError", "ModelConfig", "ModelFamily", "ModelLayout",
    "ParamInfo", "TensorShapeError", "UnexpectedTensorError", "UnsupportedConfigError",
    "abstract_params", "config_from_hf", "family_for", "forward", "forward_paged", "forward_with_aux",
    "init_cache", "init_paged_cache", "init_params",
    "layout", "lm_head_weight", "load_hf", "load_params", "param_logical_axes", "read_hf_config",
    "register_family", "relayout_params", "save_hf", "supported_model_types",
]


def forward(config: ModelConfig, params: PyTree, input_ids: jax.Array, *,
            positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
            cache: PyTree | None = None, return_hidden_states: bool = False,
            segment_ids: jax.Array | None = None) -> Any:
    """The causal LM forward of `config`'s family; pure and jit-able (`config` static).

    Args:
      config: the model config (hashable; a static argument under `jax.jit`).
      params: the params pytree.
      input_ids: `[batch, seq]` int token ids.
      positions: `[batch, seq]` int positions. Default: `cumsum(attention_mask) - 1` clipped at
        0 (correct for left padding), or `arange(seq)` (after the cache's filled slots) without
        a mask.
      attention_mask: without a cache `[batch, seq]` (1/True = real token); with a cache
        `[batch, max_len]`, the valid cache slots including the `seq` written by this call.
        Attention is causal and never attends to masked keys.
      cache: a cache from `init_cache` (opaque): the call appends this call's tokens to it.
      return_hidden_states: return the final-normed hidden states `[batch, seq, hidden]`
        (compute dtype) instead of logits, so a loss can chunk the vocabulary projection.
      segment_ids: `[batch, seq]` int, without a cache: packed rows holding several sequences,
        each a contiguous run of one id; a token attends only within its segment and 0 marks
        padding. Default positions restart at 0 in every segment. How attention is computed
        (materialised, blockwise, fused kernels) is the config's `attention_impl`.

    Returns:
      logits `[batch, seq, vocab]` float32 (or the hidden states); with a cache, the pair
      `(logits_or_hidden, new_cache)`.
    """
    family = family_for(config)
    if segment_ids is not None and not family.supports_packing:
        raise ValueError(f"model_type {config.model_type!r} ({family.name} family) does not take packed sequences "
                         "(segment_ids); run it with pack_sequences=False")
    return family.apply(config, params, input_ids, positions=positions,
                                    attention_mask=attention_mask, cache=cache,
                                    return_hidden_states=return_hidden_states,
                                    **({} if segment_ids is None else {"segment_ids": segment_ids}))


def forward_with_aux(config: ModelConfig, params: PyTree, input_ids: jax.Array, *,
                     positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                     return_hidden_states: bool = False) -> tuple[Any, AuxOutput]:
    """The training forward: :func:`forward`'s output (no cache) and the model's own losses.

    Returns `(out, aux)`: `out` as :func:`forward`; `aux` an :class:`AuxOutput` whose `loss`
    (float32, already weighted) the objective adds and whose `metrics` are logged. For a
    mixture of experts (docs/architecture.md#mixture-of-experts): `router_aux_loss_coef` times
    HF's load-balancing loss when `config.output_router_logits`, plus `router_z_loss_coef` times
    the router z-loss, over the real tokens of `attention_mask`; for a dense family 0 and no
    metrics. Pure and jit-able; the side channel is the flax collection the MoE blocks sow into.
    """
    return family_for(config).apply_with_aux(config, params, input_ids, positions=positions,
                                             attention_mask=attention_mask,
                                             return_hidden_states=return_hidden_states)


def init_params(config: ModelConfig, rng: jax.Array, shardings: Any = None) -> PyTree:
    """Randomly initialised params (plain arrays), created directly in `shardings` (a pytree of
    shardings like `sharding.param_shardings(config, mesh)`, or None) by a jitted init."""
    family = family_for(config)
    return jax.jit(lambda key: family.init_params(config, key), out_shardings=shardings)(rng)


def abstract_params(config: ModelConfig) -> PyTree:
    """`jax.ShapeDtypeStruct` leaves of the params tree, without allocating anything."""
    family = family_for(config)
    return jax.eval_shape(lambda key: family.init_params(config, key), jax.random.key(0))


def param_logical_axes(config: ModelConfig) -> PyTree:
    """A pytree like the params of `PartitionSpec`s of logical axis names."""
    return family_for(config).param_logical_axes(config)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> PyTree:
    """An empty decoding cache for `batch` rows and `max_len` positions (prompt + new tokens)."""
    return family_for(config).init_cache(config, batch, max_len, dtype)


def init_paged_cache(config: ModelConfig, *, shards: int, pages_per_shard: int, page_size: int,
                     dtype: Any = jnp.bfloat16) -> PyTree:
    """An empty paged decoding cache (the family's pytree, opaque): `shards` groups of
    `pages_per_shard` pages of `page_size` positions; see `effopd_jax.models.paged`.

    Raises:
      NotImplementedError: the family has no paged cache.
    """
    return family_for(config).init_paged_cache(config, shards=shards, pages_per_shard=pages_per_shard,
                                               page_size=page_size, dtype=dtype)


def forward_paged(config: ModelConfig, params: PyTree, input_ids: jax.Array, *, index: Any, cache: PyTree,
                  return_hidden_states: bool = False) -> tuple[Any, PyTree]:
    """The causal LM forward over a paged cache; pure and jit-able (`config` static).

    Args:
      config: the model config.
      params: the params pytree (the same as `forward`'s).
      input_ids: `[batch, seq]` int token ids; `batch` is a multiple of the cache's shards and
        row `b` uses shard `b // (batch // shards)`.
      index: `paged.PagedPrefill` (rows that start empty: the tokens attend to each other) or
        `paged.PagedDecode` (rows that continue: the tokens attend to their row's cached
        positions up to their own), with the rows' page tables `[batch, max_pages]`, the
        tokens' cache (= RoPE) positions `[batch, seq]` and which tokens are real `[batch, seq]`.
      cache: a cache from `init_paged_cache`; every valid token is written at its position.
      return_hidden_states: return the final-normed hidden states instead of logits.

    Returns:
      `(logits [batch, seq, vocab] float32 or hidden [batch, seq, hidden], new_cache)`.

    Raises:
      NotImplementedError: the family has no paged cache.
    """
    return family_for(config).apply_paged(config, params, input_ids, index=index, cache=cache,
                                          return_hidden_states=return_hidden_states)


def lm_head_weight(config: ModelConfig, params: PyTree) -> jax.Array:
    """The output projection `[hidden, vocab]` in the param dtype (the tied embedding's
    transpose when the family ties them): `hidden @ lm_head_weight` gives the logits."""
    return family_for(config).lm_head_weight(config, params)


@functools.lru_cache(maxsize=64)
def layout(config: ModelConfig) -> ModelLayout:
    """The parameter layout of `config` (see `effopd_jax.models.family.ModelLayout`); cached,
    since configs are hashable and layouts immutable."""
    return family_for(config).layout(config)


def relayout_params(params: PyTree, source: ModelConfig, target: ModelConfig) -> PyTree:
    """`params` of `source`'s tree layout rearranged into `target`'s, e.g. scanned -> unscanned
    (`dataclasses.replace(config, scan_layers=False)`). Leaves are matched through the layouts'
    HF tensor names, so it works for any family and any grouping of stacked layers; arrays are
    sliced and stacked, never changed.

    Raises:
      ValueError: the two layouts do not name the same tensors with the same shapes.
    """
    import numpy as np  # noqa: PLC0415

    def slices(config: ModelConfig, tree: PyTree) -> dict[str, tuple[Any, int, int]]:
        """{HF name: (leaf, slice number, number of stacked axes)}."""
        leaves = jax.tree.leaves(tree)
        infos = layout(config).params
        if len(leaves) != len(infos):
            raise ValueError(f"params have {len(leaves)} leaves; the {config.model_type} layout "
                             f"has {len(infos)}")
        out = {}
        for info, leaf in zip(infos, leaves):
            for i, name in enumerate(info.hf_names):
                out[name] = (leaf, i, len(info.stack_axes))
        return out

    have = slices(source, params)
    wanted_infos = layout(target).params
    wanted = {name for info in wanted_infos for name in info.hf_names}
    if set(have) != wanted:
        raise ValueError("relayout_params: the layouts name different tensors: "
                         f"{sorted(set(have) ^ wanted)[:8]}")

    def piece(name: str) -> Any:
        leaf, i, stacked = have[name]
        return leaf.reshape((-1,) + leaf.shape[stacked:])[i] if stacked else leaf

    new_leaves = []
    for info in wanted_infos:
        parts = [piece(name) for name in info.hf_names]
        if not info.stack_axes:
            new_leaves.append(parts[0])
        else:
            xnp = jnp if isinstance(parts[0], jax.Array) else np
            new_leaves.append(xnp.stack(parts))
    abstract = abstract_params(target)
    for got, want, info in zip(new_leaves, jax.tree.leaves(abstract), wanted_infos):
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"relayout_params: {info.name} would be {tuple(got.shape)}, the target "
                             f"layout needs {tuple(want.shape)}")
    return jax.tree.unflatten(jax.tree.structure(abstract), new_leaves)
