"""Device mesh and logical-axis sharding rules.

The model names every parameter dimension and the main activation dimensions with logical axes
(see docs/architecture.md); `LOGICAL_RULES` maps them onto three mesh axes:

  data    pure data parallelism (batch split, parameters replicated)
  fsdp    batch split *and* parameters split along their `embed` dimension (ZeRO-3 style)
  tensor  Megatron tensor parallelism: attention heads, MLP columns and the vocabulary split;
          the residual stream (`act_embed`) is replicated across `tensor`.

Mixture-of-experts weights (`[experts, ...]` stacks, logical axis `expert`) are split over
`fsdp`: expert parallelism shares the fsdp axis instead of adding a mesh axis. An fsdp group of n
devices then holds E/n whole experts each, and the MoE layer runs expert-parallel over it
(`effopd_jax.models.moe.expert_ffn`: tokens all-gathered within the group, each device computes
its own experts, partial outputs reduce-scattered back), so expert weights never move, while
dense weights stay ZeRO-3 sharded on `embed` as before. Why not a separate `expert` axis: the
fsdp axis already splits the batch and the parameters, which is exactly what expert
parallelism needs, so every existing mesh keeps working (no new axis in the batch specs, the
sampler or the config), and a dense student sharing the mesh with a MoE teacher is unaffected.
The cost is that the expert-parallel degree is the fsdp size (num_experts must divide by it).
The experts' own hidden dimension (`expert_embed`) is therefore not split again; their
intermediate dimension (`expert_mlp`) follows `tensor` like a dense MLP's.

Typical use:

    mesh = make_mesh(data=-1, fsdp=2, tensor=1)
    params = jax.device_put(params, param_shardings(config, mesh))
    with sharding_context(mesh):
        logits = jax.jit(model.apply)({"params": params}, tokens)
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from effopd_jax import models
from effopd_jax.models import ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

LOGICAL_RULES: LogicalRules = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("expert", "fsdp"),
    ("expert_embed", None),
    ("expert_mlp", "tensor"),
    ("router", None),
    # Qwen3.5 Gated DeltaNet: value heads split like attention heads; the [q | k | v] conv
    # channels stay whole over `tensor` (the layer splits them into q, k, v right after the
    # conv, which a split channel axis would turn into a reshuffle every layer).
    ("linear_qkv", None),
    ("linear_value", "tensor"),
    ("linear_heads", "tensor"),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_linear_heads", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'tensor') over `devices` (default: all devices).

    One axis size may be -1: it takes the devices the others leave. The product of the sizes
    must equal the device count. All axes are `AxisType.Auto` (GSPMD propagation; jax>=0.8 makes
    `jax.make_mesh` default to Explicit axes, which the logical-constraint model does not use).

    Raises:
      ValueError: naming the axis sizes and the device count when they do not fit.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    for name, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"make_mesh: {name}={size!r} must be a positive int or -1")
    if len(free) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"make_mesh: {len(devices)} devices are not divisible by the fixed axes "
                f"{ {k: v for k, v in sizes.items() if v != -1} } (product {fixed})")
        sizes[free[0]] = len(devices) // fixed
    elif fixed != len(devices):
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {data}*{fsdp}*{tensor} = {fixed} does not equal the "
            f"{len(devices)} devices; pass devices= to use a subset")
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: LogicalRules = LOGICAL_RULES) -> Iterator[None]:
    """Makes the model's `nn.with_logical_constraint` calls active: sets `mesh` as the current
    mesh and `rules` as the logical-axis rules. Trace (jit) the model inside this context."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_sharding(logical_axes: Sequence[str | None] | PartitionSpec, mesh: Mesh,
                     rules: LogicalRules = LOGICAL_RULES) -> NamedSharding:
    """The `NamedSharding` of an array whose dimensions carry `logical_axes`."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    return NamedSharding(mesh, spec)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: LogicalRules = LOGICAL_RULES) -> Any:
    """A pytree of `NamedSharding`s with the structure of the params of `config`."""
    specs = models.param_logical_axes(config)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: LogicalRules = LOGICAL_RULES) -> NamedSharding:
    """Sharding of a `[batch, ...]` array (token ids, masks, positions): the batch dimension is
    split over ('data', 'fsdp'), the others replicated."""
    return logical_sharding(("act_batch",) + (None,) * (ndim - 1), mesh, rules)


def cache_shardings(config: ModelConfig, mesh: Mesh, rules: LogicalRules = LOGICAL_RULES) -> Any:
    """The shardings of `models.init_cache(config, ...)`: a tree like the cache, each leaf laid
    out by the logical axes its family declares (for Qwen's KV cache: k/v split over batch and
    KV heads, the write index replicated)."""
    axes = models.family_for(config).cache_logical_axes(config)
    return jax.tree.map(lambda names: logical_sharding(names, mesh, rules), axes,
                        is_leaf=lambda x: type(x) is tuple)  # NamedTuple caches are nodes


def global_batch(mesh: Mesh, local_rows: np.ndarray) -> jax.Array:
    """This process's rows of a batch -> one global array with the batch dimension split over
    ('data', 'fsdp'). Every process passes the same number of rows; process p's rows come p-th."""
    sharding = batch_sharding(mesh, local_rows.ndim)
    global_shape = (local_rows.shape[0] * jax.process_count(),) + local_rows.shape[1:]
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process sharded) array as a full numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
