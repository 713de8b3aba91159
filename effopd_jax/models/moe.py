"""Sparse mixture-of-experts layers shared by the MoE families (Qwen3-MoE, Qwen3.5-MoE).

The block is the Hugging Face `Qwen3MoeSparseMoeBlock` computation (and, with a shared expert,
`Qwen2MoeSparseMoeBlock` / `Qwen3_5MoeSparseMoeBlock`):

    logits  = x @ W_router                    [tokens, E], float32 (see "Router precision")
    p       = softmax(logits)                 float32
    idx, w  = top_k(p, k)                     the k likeliest experts and their probabilities
    w       = w / sum(w)                      only when `norm_topk_prob`
    y       = sum_j w_j * SwiGLU_{idx_j}(x)   SwiGLU_e(x) = (silu(x @ G_e) * (x @ U_e)) @ D_e
    y      += sigmoid(x @ W_sg) * SwiGLU_shared(x)      (only with a shared expert)

Compute follows the routing, dropless: every (token, expert) assignment is computed once and
no token is ever dropped, whatever the balance. The assignments are sorted by expert and the
experts run as grouped matmuls (:func:`expert_ffn`), one of

* ``"ragged_dot"``: three `jax.lax.ragged_dot` calls over the sorted rows (the GPU/TPU kernels).
  On the CPU backend XLA lowers `ragged_dot` to a dense masked product over *every* group (each
  row is multiplied by all E experts), which is slower than the dense all-experts computation;
* ``"blocked"``: each expert's rows are padded to a multiple of a block of rows and a `lax.scan`
  runs one SwiGLU per block with that block's expert weights, skipping (`lax.cond`) the blocks
  the static bound reserved but the routing did not fill. FLOPs = 6·H·I·(assignments + padding),
  padding < E·block. The CPU default;
* ``"auto"``: ``"blocked"`` on the CPU backend, ``"ragged_dot"`` elsewhere.

`dense_expert_ffn_reference` (every expert on every token, weighted by the routing) is the test
oracle and the benchmark's baseline, never used by a model.

Expert parallelism. Expert weights are stacked `[experts, ...]` with the logical axis `expert`;
`effopd_jax.sharding.LOGICAL_RULES` maps it to the mesh axis `fsdp`, so an fsdp group of n
devices holds E/n experts each (weight-stationary). When the active mesh splits `expert` over
n > 1 devices, :func:`expert_ffn` runs under `shard_map`: each device all-gathers the tokens
(and their routing) of its expert group, computes the assignments to its own E/n experts and
returns each token's partial sum with a reduce-scatter (`psum_scatter`), so expert weights never
move. The gathered tokens are processed one source device at a time (`lax.map`), so the
sorted-rows buffer holds T_local·min(k, E/n) rows (the dropless bound for one source: all its
tokens might pick this device's experts), as in the local path. Its cost per layer and device:
an all-gather of n·T_local·H activations (and their routing) and a reduce-scatter of as many
partial outputs (compute dtype), i.e. about 2·n·T_local·H values held at once besides the
expert weights, instead of gathering the layer's E·3·H·I expert weights. Off a mesh, or with
n = 1, the experts run locally.

Router precision. The router matmul and softmax run in float32 whatever the compute dtype
(transformers computes the logits in the model dtype and the softmax in float32), so top-k ties
and near-ties are decided on float32 logits.

Router statistics. The block `sow`s per-layer routing statistics into the flax collection
``"moe_stats"`` (:class:`RouterStats`, masked to real tokens); :func:`router_losses` turns the
statistics of all layers into Hugging Face's load-balancing loss (`load_balancing_loss_func`,
pooled over layers and tokens) and the router z-loss (ST-MoE). A plain `apply` (the collection
not mutable) sows nothing and costs nothing.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from effopd_jax.models.family import AuxOutput
from effopd_jax.models.layers import Linear, Weight, constrain

Array = jax.Array
DType = Any

MOE_IMPLS = ("auto", "ragged_dot", "blocked")
STATS_COLLECTION = "moe_stats"
# The largest row block of the "blocked" implementation; smaller when groups are small.
MAX_BLOCK_ROWS = 128


# ============================================================================================
# Routing
# ============================================================================================
class Routing(NamedTuple):
    """The router's decision for every token.

    Attributes:
      logits: ``[tokens, E]`` float32 router logits.
      probs: ``[tokens, E]`` float32 softmax of the logits.
      experts: ``[tokens, k]`` int32 chosen experts, by decreasing probability.
      weights: ``[tokens, k]`` float32 combine weights (the chosen probabilities, renormalised
        to sum 1 when `norm_topk_prob`).
    """

    logits: Array
    probs: Array
    experts: Array
    weights: Array


def route(router_logits: Array, top_k: int, norm_topk_prob: bool) -> Routing:
    """Softmax over the experts, top-k, optional renormalisation (HF's `Qwen3MoeTopKRouter`).

    Args:
      router_logits: ``[tokens, E]`` (computed in float32 by the caller).
      top_k: experts per token, 1 <= top_k <= E.
      norm_topk_prob: divide the k chosen probabilities by their sum.
    """
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    logits = router_logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(logits, probs, experts.astype(jnp.int32), weights)


# ============================================================================================
# Expert FFN: grouped (ragged_dot / blocked) and the dense oracle
# ============================================================================================
def default_block_rows(assignments: int, num_groups: int) -> int:
    """Row block of the "blocked" implementation: the power of two at or below half the mean
    group size, in [8, MAX_BLOCK_ROWS]. Larger blocks run faster matmuls, smaller ones pad less
    (padding < E·block rows). benchmarks/moe_layer.py, 64 experts, top-8, mean group 128 on a
    loaded CPU: B = 64 (padding 23%) had the better forward+backward median, B = 32 (11%) the
    better forward median, in three runs (benchmarks/README.md)."""
    mean_rows = max(1, assignments // max(num_groups, 1))
    block = 1 << max(0, (mean_rows // 2).bit_length() - 1)
    return int(min(MAX_BLOCK_ROWS, max(8, block)))


def blocked_capacity(assignments: int, num_groups: int, block: int) -> int:
    """Static row capacity of the "blocked" buffer: every group padded up to a whole block."""
    rows = assignments + num_groups * (block - 1)
    return -(-rows // block) * block


def _sorted_groups(group_of: Array, num_groups: int) -> tuple[Array, Array]:
    """Stable order of the flat assignments by group (group `num_groups` = "not here", last) and
    the size of each real group."""
    order = jnp.argsort(group_of, stable=True)
    sizes = jnp.bincount(group_of, length=num_groups + 1)[:num_groups]
    return order, sizes


def _ragged_dot_rows(x: Array, group_of: Array, w_gate: Array, w_up: Array, w_down: Array,
                     dtype: DType) -> Array:
    """Per-assignment expert outputs ``[tokens * k, H]`` via `jax.lax.ragged_dot` (0 for
    assignments whose group is "not here")."""
    tokens, k = group_of.shape
    num_groups = w_gate.shape[0]
    flat = group_of.reshape(-1)
    order, sizes = _sorted_groups(flat, num_groups)
    rows = jnp.take(x, order // k, axis=0).astype(dtype)
    gate = jax.lax.ragged_dot(rows, w_gate.astype(dtype), sizes)
    up = jax.lax.ragged_dot(rows, w_up.astype(dtype), sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down.astype(dtype), sizes)
    # Rows past the last group are not defined by ragged_dot's contract: zero them.
    out = jnp.where((flat[order] < num_groups)[:, None], out, jnp.zeros_like(out))
    return jnp.zeros_like(out).at[order].set(out, unique_indices=True)


def _blocked_rows(x: Array, group_of: Array, w_gate: Array, w_up: Array, w_down: Array,
                  dtype: DType, block: int | None) -> Array:
    """Per-assignment expert outputs ``[tokens * k, H]`` by padded row blocks (0 for
    assignments whose group is "not here"); see the module docstring."""
    tokens, k = group_of.shape
    hidden = x.shape[-1]
    num_groups = w_gate.shape[0]
    flat = group_of.reshape(-1)
    assignments = flat.shape[0]
    block = default_block_rows(assignments, num_groups) if block is None else block
    capacity = blocked_capacity(assignments, num_groups, block)
    num_blocks = capacity // block

    order, sizes = _sorted_groups(flat, num_groups)
    padded_end = jnp.cumsum(-(-sizes // block) * block)
    padded_start = padded_end - (-(-sizes // block) * block)
    group_start = jnp.cumsum(sizes) - sizes
    sorted_group = flat[order]
    here = sorted_group < num_groups
    safe_group = jnp.minimum(sorted_group, num_groups - 1)
    rank = jnp.arange(assignments) - group_start[safe_group]
    slot_sorted = jnp.where(here, padded_start[safe_group] + rank, capacity)  # capacity = none
    slot = jnp.zeros((assignments,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32),
                                                              unique_indices=True)
    # The token in each slot of the padded buffer (`tokens` = an empty slot, read as zeros).
    token_of_slot = jnp.full((capacity,), tokens, jnp.int32).at[slot].set(
        jnp.arange(assignments, dtype=jnp.int32) // k, mode="drop")
    padded = jnp.take(x.astype(dtype), token_of_slot, axis=0, mode="fill", fill_value=0)
    block_group = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")
    block_used = block_group < num_groups
    block_group = jnp.minimum(block_group, num_groups - 1).astype(jnp.int32)

    out = _block_swiglu(padded.reshape(num_blocks, block, hidden), block_group, block_used,
                        w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype))
    return jnp.take(out.reshape(capacity, hidden), slot, axis=0, mode="fill", fill_value=0)


def _block_forward(rows, group, used, w_gate, w_up, w_down):
    """One block's SwiGLU with its expert's weights, or zeros for an unused block:
    (out [B, H], gate [B, I], up [B, I])."""
    def compute():
        gate = jnp.dot(rows, w_gate[group])
        up = jnp.dot(rows, w_up[group])
        return jnp.dot(jax.nn.silu(gate) * up, w_down[group]), gate, up

    def skip():
        block, inter = rows.shape[0], w_gate.shape[-1]
        return (jnp.zeros_like(rows), jnp.zeros((block, inter), rows.dtype),
                jnp.zeros((block, inter), rows.dtype))

    return jax.lax.cond(used, compute, skip)


@jax.custom_vjp
def _block_swiglu(rows: Array, block_group: Array, block_used: Array, w_gate: Array, w_up: Array,
                  w_down: Array) -> Array:
    """The blocked experts: rows ``[blocks, B, H]``, block b computed with expert
    ``block_group[b]`` when ``block_used[b]`` (zeros otherwise). Returns ``[blocks, B, H]``.

    A `lax.scan` over the blocks. The backward pass is written out (custom VJP) so the expert
    weight gradients accumulate in place, one expert slice per block: differentiating the
    forward scan would add a full ``[E, H, I]`` cotangent per block (E times the work)."""
    def body(_, xs):
        return None, _block_forward(*xs, w_gate, w_up, w_down)[0]

    return jax.lax.scan(body, None, (rows, block_group, block_used))[1]


def _block_swiglu_fwd(rows, block_group, block_used, w_gate, w_up, w_down):
    def body(_, xs):
        return None, _block_forward(*xs, w_gate, w_up, w_down)

    out, gate, up = jax.lax.scan(body, None, (rows, block_group, block_used))[1]
    return out, (rows, block_group, block_used, w_gate, w_up, w_down, gate, up)


def _block_swiglu_bwd(residuals, d_out):
    rows, block_group, block_used, w_gate, w_up, w_down, gate, up = residuals

    def body(grads, xs):
        x, group, used, g, u, dy = xs

        def compute():
            silu = jax.nn.silu(g)
            d_act = jnp.dot(dy, w_down[group].T)
            sig = jax.nn.sigmoid(g)
            d_gate = d_act * u * (sig * (1 + g * (1 - sig)))
            d_up = d_act * silu
            d_x = jnp.dot(d_gate, w_gate[group].T) + jnp.dot(d_up, w_up[group].T)
            return d_x, jnp.dot(x.T, d_gate), jnp.dot(x.T, d_up), jnp.dot((silu * u).T, dy)

        def skip():
            return (jnp.zeros_like(x), jnp.zeros(w_gate.shape[1:], w_gate.dtype),
                    jnp.zeros(w_up.shape[1:], w_up.dtype), jnp.zeros(w_down.shape[1:], w_down.dtype))

        d_x, *d_w = jax.lax.cond(used, compute, skip)
        grads = tuple(acc.at[group].add(d) for acc, d in zip(grads, d_w))
        return grads, d_x

    zeros = (jnp.zeros_like(w_gate), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    (d_gate, d_up, d_down), d_rows = jax.lax.scan(
        body, zeros, (rows, block_group, block_used, gate, up, d_out))
    return d_rows, None, None, d_gate, d_up, d_down


_block_swiglu.defvjp(_block_swiglu_fwd, _block_swiglu_bwd)


def resolve_impl(impl: str) -> str:
    """The implementation `impl` names on the current backend ("auto": blocked on CPU,
    ragged_dot elsewhere)."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"MoE implementation {impl!r} is not one of {MOE_IMPLS}")
    if impl == "auto":
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return impl


def local_expert_ffn(x: Array, group_of: Array, weights: Array, w_gate: Array, w_up: Array,
                     w_down: Array, *, dtype: DType, impl: str = "auto",
                     block: int | None = None) -> Array:
    """The weighted expert outputs of the assignments to the experts in ``w_*``.

    Args:
      x: ``[tokens, H]``.
      group_of: ``[tokens, k]`` int32, the local expert of each assignment, or ``E_local``
        (= ``w_gate.shape[0]``) for an assignment to an expert held elsewhere (contributes 0).
      weights: ``[tokens, k]`` float32 combine weights.
      w_gate, w_up: ``[E_local, H, I]``; w_down: ``[E_local, I, H]``.
      dtype: compute dtype of the matmuls.
      impl: "auto", "ragged_dot" or "blocked" (module docstring).
      block: rows per block of "blocked" (default :func:`default_block_rows`).

    Returns:
      ``[tokens, H]`` float32: sum_j weights[t, j] * SwiGLU_{group_of[t, j]}(x[t]).
    """
    impl = resolve_impl(impl)
    if impl == "ragged_dot":
        rows = _ragged_dot_rows(x, group_of, w_gate, w_up, w_down, dtype)
    else:
        rows = _blocked_rows(x, group_of, w_gate, w_up, w_down, dtype, block)
    tokens, k = group_of.shape
    # Weighted sum over a token's k assignments, accumulated in float32.
    return jnp.einsum("tkh,tk->th", rows.reshape(tokens, k, -1), weights.astype(rows.dtype),
                      preferred_element_type=jnp.float32)


def dense_expert_ffn_reference(x: Array, experts: Array, weights: Array, w_gate: Array,
                               w_up: Array, w_down: Array, dtype: DType = jnp.float32) -> Array:
    """Test oracle: every expert on every token, combined with the routing's weights.

    x ``[tokens, H]``, experts / weights ``[tokens, k]``, w_gate / w_up ``[E, H, I]``,
    w_down ``[E, I, H]``. Returns ``[tokens, H]`` float32. FLOPs 6·tokens·E·H·I.
    """
    tokens = x.shape[0]
    num_experts = w_gate.shape[0]
    combine = jnp.zeros((tokens, num_experts), jnp.float32).at[
        jnp.arange(tokens)[:, None], experts].add(weights.astype(jnp.float32))
    x = x.astype(dtype)
    gate = jnp.einsum("th,ehi->tei", x, w_gate.astype(dtype))
    up = jnp.einsum("th,ehi->tei", x, w_up.astype(dtype))
    out = jnp.einsum("tei,eih->teh", jax.nn.silu(gate) * up, w_down.astype(dtype))
    return jnp.einsum("teh,te->th", out.astype(jnp.float32), combine)


# ============================================================================================
# Expert parallelism
# ============================================================================================
def _mesh_axes(logical: str, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to under `rules` (() when replicated)."""
    spec = nn.logical_to_mesh_axes((logical,), rules)
    target = None if spec is None else spec[0]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def expert_parallel_axis(num_experts: int) -> tuple[str | None, Any]:
    """(mesh axis the experts are split over, the mesh) in the current sharding context, or
    (None, mesh) when the experts are not split (no mesh, no rule, or an axis of size 1).

    Raises:
      ValueError: the experts map to several mesh axes, to an axis that does not split the
        tokens (`act_batch`), or `num_experts` is not divisible by the axis size.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None, mesh
    axes = tuple(a for a in _mesh_axes("expert", rules) if mesh.shape.get(a, 1) > 1)
    if not axes:
        return None, mesh
    if len(axes) > 1:
        raise ValueError(f"the logical axis 'expert' maps to several mesh axes {axes}; "
                         "expert parallelism supports one")
    axis = axes[0]
    if axis not in _mesh_axes("act_batch", rules):
        raise ValueError(f"the experts are split over mesh axis {axis!r}, which does not split "
                         f"the tokens (act_batch -> {_mesh_axes('act_batch', rules)}); map "
                         "'expert' to one of the batch axes")
    if num_experts % mesh.shape[axis]:
        raise ValueError(f"num_experts={num_experts} is not divisible by the {mesh.shape[axis]} "
                         f"devices of mesh axis {axis!r} the experts are split over")
    return axis, mesh


def expert_ffn(x: Array, experts: Array, weights: Array, w_gate: Array, w_up: Array,
               w_down: Array, *, dtype: DType, impl: str = "auto", block: int | None = None
               ) -> Array:
    """sum_j weights[t, j] * SwiGLU_{experts[t, j]}(x[t]), dropless, following the routing.

    Runs expert-parallel under `shard_map` when the sharding context splits the logical axis
    `expert` over a mesh axis (module docstring), locally otherwise.

    Args:
      x: ``[tokens, H]``; experts / weights: ``[tokens, k]`` (int32 / float32) from :func:`route`.
      w_gate, w_up: ``[E, H, I]``; w_down: ``[E, I, H]`` (stacked expert weights).
      dtype: compute dtype; impl, block: see :func:`local_expert_ffn`.

    Returns:
      ``[tokens, H]`` float32 (expert-parallel: the devices' partial sums are added in the
      compute dtype).
    """
    num_experts = w_gate.shape[0]
    axis, mesh = expert_parallel_axis(num_experts)
    if axis is None:
        return local_expert_ffn(x, experts, weights, w_gate, w_up, w_down, dtype=dtype,
                                impl=impl, block=block)

    rules = nn.get_logical_axis_rules()
    batch_axes = tuple(a for a in _mesh_axes("act_batch", rules) if a in mesh.shape)
    mlp_axes = tuple(a for a in _mesh_axes("expert_mlp", rules)
                     if a in mesh.shape and mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    tokens = x.shape[0]
    pad = -tokens % shards
    if pad:  # padded tokens choose expert -1: no device holds it, so they cost nothing
        x = jnp.pad(x, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=-1)
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    experts_per_device = num_experts // mesh.shape[axis]
    k = experts.shape[1]
    mlp = mlp_axes if mlp_axes else None
    rows = PartitionSpec(batch_axes, None)

    group_size = mesh.shape[axis]

    def one_source(x, experts, weights, w_gate, w_up, w_down):
        """The contributions of this device's experts to one source device's tokens."""
        local = experts - jax.lax.axis_index(axis) * experts_per_device
        here = (local >= 0) & (local < experts_per_device)
        if experts_per_device < k:
            # A token has at most E/n assignments here (top-k picks distinct experts): keep
            # those slots only, so the sorted buffer has E/n rows per token instead of k.
            keep = jnp.argsort(~here, axis=1, stable=True)[:, :experts_per_device]
            local = jnp.take_along_axis(local, keep, axis=1)
            weights = jnp.take_along_axis(weights, keep, axis=1)
            here = jnp.take_along_axis(here, keep, axis=1)
        group_of = jnp.where(here, local, experts_per_device).astype(jnp.int32)
        out = local_expert_ffn(x, group_of, jnp.where(here, weights, 0.0), w_gate, w_up, w_down,
                               dtype=dtype, impl=impl, block=block)
        return out.astype(x.dtype)

    def per_device(x, experts, weights, w_gate, w_up, w_down):
        tokens_per_device = x.shape[0]
        gathered = [jax.lax.all_gather(a, axis) for a in (x, experts, weights)]  # [n, T_local, .]
        # One source device's tokens at a time: the sorted-rows buffer is sized for T_local
        # tokens, not for the whole group's n * T_local.
        out = jax.lax.map(lambda args: one_source(*args, w_gate, w_up, w_down), tuple(gathered))
        out = out.reshape(group_size * tokens_per_device, -1)
        if mlp_axes:
            out = jax.lax.psum(out, mlp_axes)
        return jax.lax.psum_scatter(out, axis, scatter_dimension=0, tiled=True)

    out = jax.shard_map(
        per_device,
        in_specs=(rows, rows, rows, PartitionSpec(axis, None, mlp), PartitionSpec(axis, None, mlp),
                  PartitionSpec(axis, mlp, None)),
        out_specs=rows, check_vma=False,
    )(x, experts, weights, w_gate, w_up, w_down)
    out = out.astype(jnp.float32)  # summed over the devices in the compute dtype
    return out[:tokens] if pad else out


# ============================================================================================
# Router statistics and auxiliary losses
# ============================================================================================
class RouterStats(NamedTuple):
    """Masked routing statistics of one layer (sums over its real tokens), all float32.

    Attributes:
      assignments: ``[E]`` how many of the top-k choices went to each expert.
      probs: ``[E]`` the sum of each expert's router probability.
      z: ``[]`` the sum of logsumexp(logits)^2.
      tokens: ``[]`` the number of real tokens.
    """

    assignments: Array
    probs: Array
    z: Array
    tokens: Array


def router_stats(routing: Routing, token_mask: Array | None) -> RouterStats:
    """The :class:`RouterStats` of one layer; `token_mask` ``[tokens]`` (1 = real token) or None."""
    tokens, num_experts = routing.probs.shape
    mask = (jnp.ones((tokens,), jnp.float32) if token_mask is None
            else token_mask.reshape(tokens).astype(jnp.float32))
    counts = jnp.zeros((tokens, num_experts), jnp.float32).at[
        jnp.arange(tokens)[:, None], routing.experts].add(1.0)
    lse = jax.nn.logsumexp(routing.logits, axis=-1)
    return RouterStats(assignments=mask @ counts, probs=mask @ routing.probs,
                       z=jnp.sum(mask * jnp.square(lse)), tokens=jnp.sum(mask))


def collect_router_stats(stats_tree: Mapping[str, Any]) -> RouterStats | None:
    """Sums every :class:`RouterStats` sown into the ``"moe_stats"`` collection (any nesting:
    unscanned layers, scanned `[layers, ...]` stacks) into one; None when nothing was sown."""
    found: dict[str, list[Array]] = {name: [] for name in RouterStats._fields}

    def visit(node):
        if isinstance(node, RouterStats):
            for name in RouterStats._fields:
                value = getattr(node, name)
                width = 1 if name in ("assignments", "probs") else 0
                found[name].append(value.reshape((-1,) + value.shape[value.ndim - width:]).sum(0))
        elif isinstance(node, Mapping):
            for child in node.values():
                visit(child)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)

    visit(stats_tree)
    if not found["tokens"]:
        return None
    return RouterStats(*(sum(found[name]) for name in RouterStats._fields))


def load_balancing_loss(stats: RouterStats) -> Array:
    """HF's `load_balancing_loss_func` from pooled statistics (Switch Transformer eq. 4-6):

        E * sum_e f_e * P_e,   f_e = assignments_e / N,   P_e = probs_e / N,

    N = real tokens summed over the MoE layers (transformers concatenates the layers' router
    logits, so the two means pool layers and tokens). ``k`` for perfectly balanced routing
    (f_e = k/E, P_e = 1/E), larger when unbalanced; 0 without tokens.
    """
    num_experts = stats.assignments.shape[-1]
    n = jnp.maximum(stats.tokens, 1.0)
    return num_experts * jnp.sum((stats.assignments / n) * (stats.probs / n))


def router_z_loss(stats: RouterStats) -> Array:
    """ST-MoE's router z-loss: mean over real tokens (and MoE layers) of logsumexp(logits)^2."""
    return stats.z / jnp.maximum(stats.tokens, 1.0)


def router_aux_output(config: Any, stats: RouterStats | None) -> AuxOutput:
    """A MoE family's :class:`AuxOutput` from its pooled router statistics: HF's load-balancing
    loss times `config.router_aux_loss_coef` when `config.output_router_logits` (HF adds it only
    then), plus `config.router_z_loss_coef` times the router z-loss; both logged unweighted.
    `stats` None (no sparse layer) gives a zero loss and no metrics."""
    zero = jnp.zeros((), jnp.float32)
    if stats is None:
        return AuxOutput(zero, {})
    balance = load_balancing_loss(stats)
    z_loss = router_z_loss(stats)
    aux_coef = config.router_aux_loss_coef if config.output_router_logits else 0.0
    loss = aux_coef * balance + config.router_z_loss_coef * z_loss
    return AuxOutput(loss.astype(jnp.float32), {"moe/load_balancing_loss": balance,
                                                "moe/router_z_loss": z_loss})


# ============================================================================================
# The block
# ============================================================================================
class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with `intermediate_size` columns (the
    shared expert; the same parameter names and axes as a dense Qwen MLP)."""

    intermediate_size: int
    dtype: DType
    param_dtype: DType
    init_std: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = lambda features, axes, name: Linear(
            features, axes, False, self.dtype, self.param_dtype, self.init_std, name=name)
        gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(h)


class Experts(nn.Module):
    """The stacked expert weights (parameters only; :func:`expert_ffn` computes with them).

    Parameters (HF names in brackets, one tensor per expert e):
      ``gate_proj/kernel`` ``[E, H, I]`` (``experts.{e}.gate_proj.weight`` transposed),
      ``up_proj/kernel`` ``[E, H, I]``, ``down_proj/kernel`` ``[E, I, H]``; with
      `fused_gate_up`, ``gate_up_proj/kernel`` ``[E, H, 2I]`` instead of gate/up (gate in the
      first I columns: transformers' fused `experts.gate_up_proj` ``[E, 2I, H]``, transposed).
    Logical axes: (`expert`, `expert_embed`, `expert_mlp`), down (`expert`, `expert_mlp`,
    `expert_embed`).
    """

    num_experts: int
    intermediate_size: int
    hidden_size: int
    param_dtype: DType
    init_std: float
    fused_gate_up: bool = False

    @nn.compact
    def __call__(self) -> tuple[Array, Array, Array]:
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        weight = lambda name, shape, axes: Weight(
            "kernel", shape, axes, self.init_std, self.param_dtype, name=name)()
        in_axes = ("expert", "expert_embed", "expert_mlp")
        if self.fused_gate_up:
            gate_up = weight("gate_up_proj", (E, H, 2 * I), in_axes)
            gate, up = gate_up[..., :I], gate_up[..., I:]
        else:
            gate = weight("gate_proj", (E, H, I), in_axes)
            up = weight("up_proj", (E, H, I), in_axes)
        down = weight("down_proj", (E, I, H), ("expert", "expert_mlp", "expert_embed"))
        return gate, up, down


class SparseMoeBlock(nn.Module):
    """The sparse MoE feed-forward block: ``[batch, seq, H] -> [batch, seq, H]``.

    Parameters: ``gate/kernel`` ``[H, E]`` (the router, HF ``mlp.gate.weight`` transposed;
    logical axes (`embed`, `router`)), ``experts/...`` (:class:`Experts`), and with
    `shared_expert_intermediate_size` > 0 ``shared_expert/{gate,up,down}_proj/kernel`` and
    ``shared_expert_gate/kernel`` ``[H, 1]``.

    Attributes:
      num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob: HF's fields.
      dtype, param_dtype, init_std: compute / storage dtype, N(0, init_std) initialisation.
      shared_expert_intermediate_size: 0 (Qwen3-MoE) or the shared expert's width.
      fused_gate_up: store the experts' gate and up projections as one tensor.
      impl: "auto", "ragged_dot" or "blocked" (module docstring).
    """

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    dtype: DType
    param_dtype: DType
    init_std: float
    shared_expert_intermediate_size: int = 0
    fused_gate_up: bool = False
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, token_mask: Array | None = None) -> Array:
        """x ``[batch, seq, H]``; `token_mask` ``[batch, seq]`` (1 = real token) only weights the
        sown router statistics. Returns ``[batch, seq, H]`` in the compute dtype."""
        batch, seq, hidden = x.shape
        flat = x.reshape(batch * seq, hidden)
        router = Weight("kernel", (hidden, self.num_experts), ("embed", "router"), self.init_std,
                        self.param_dtype, name="gate")()
        logits = jnp.dot(flat.astype(jnp.float32), router.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        routing = route(logits, self.num_experts_per_tok, self.norm_topk_prob)
        self.sow(STATS_COLLECTION, "router",
                 router_stats(routing, None if token_mask is None else token_mask.reshape(-1)))
        w_gate, w_up, w_down = Experts(self.num_experts, self.moe_intermediate_size, hidden,
                                       self.param_dtype, self.init_std, self.fused_gate_up,
                                       name="experts")()
        out = expert_ffn(flat.astype(self.dtype), routing.experts, routing.weights, w_gate, w_up,
                         w_down, dtype=self.dtype, impl=self.impl)
        out = out.reshape(batch, seq, hidden)
        if self.shared_expert_intermediate_size:
            shared = SwiGLU(self.shared_expert_intermediate_size, self.dtype, self.param_dtype,
                            self.init_std, name="shared_expert")(x)
            gate = Linear(1, ("embed", "router"), False, self.dtype, self.param_dtype,
                          self.init_std, name="shared_expert_gate")(x)
            out = out + (jax.nn.sigmoid(gate.astype(jnp.float32))
                         * shared.astype(jnp.float32))
        return out.astype(self.dtype)
