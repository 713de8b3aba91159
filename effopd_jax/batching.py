"""Micro-batches and packed sequences: how one step's rows are laid out for memory-bounded passes.

**Micro-batches** (``config.micro_batch_size = m``, rows per micro-batch across all devices).
The step's ``R`` rows split into ``K = R / m`` micro-batches; teacher scoring maps over them and
the update accumulates their gradients (``trainer.update_step``). A micro-batch keeps the mesh's
batch split: with ``S`` batch shards (``data * fsdp``) holding ``R / S`` consecutive rows each,
micro-batch ``k`` takes rows ``[k * m/S, (k+1) * m/S)`` of every shard, so re-laying out never
moves a row to another device::

    [R, ...] -> [S, K, m/S, ...] -> [K, S, m/S, ...] -> [K, m, ...]     (split_micro_batches)

**Packed sequences** (``config.pack_sequences``). A row of a step is ``prompt (left-padded to P)
+ response (right-padded to T)``; its real tokens are one contiguous run of ``L = p + r``
tokens. Packing places the real tokens of several rows one after the other in *packed rows* of
length ``C = P + T`` (so any single sequence fits), each sequence a segment with its own ids and
positions from 0 (``models.forward(..., segment_ids=, positions=)``: no attention across
segments), so the forward's compute follows the real tokens, not ``R * (P + T)``.

The plan (:func:`plan_packing`, host-side numpy from the sequence lengths) runs first-fit
decreasing per batch shard: each shard's rows (those with a response; the others contribute
nothing) go into the first packed row with room, longest first, and only within their shard, so
no token changes device. Packed rows are grouped ``m/S`` per shard into packed micro-batches of
``m`` rows. The shapes are static: ``[S, K, m/S, C]`` with ``K = R / m``, the worst case (every
row alone in its packed row); the plan says how many micro-batches are in use
(``num_micro_batches``) and the passes loop over those only, so a step compiles once and its
compute is ``num_micro_batches * m * C`` tokens. Capacity rule: every step fits (a row of at
most ``P + T`` tokens always fits an empty packed row, and there are as many packed rows as
rows).

Every packed position ``c`` holding a token of row ``i`` whose next token is response token ``t``
of the same row has ``target = t``: the hidden state there predicts it, exactly as position
``P - 1 + t`` does in the padded layout. Per-token inputs (teacher log-probs, weights, ...) are
gathered to packed positions by ``(row, target)`` (:func:`packed_rows`) and per-token outputs
scattered back to ``[R, T]`` (:func:`scatter_targets`).

All device functions are pure and jit-able; the plan is an argument (arrays), so it changes
every step without recompiling. The abstract plan of a shape (for ahead-of-time compilation) is
:func:`abstract_packing_plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax.models.layers import constrain

PyTree = Any
BATCH_AXES = ("data", "fsdp")  # sharding.BATCH_AXES (not imported: sharding imports the models)


def batch_shards() -> int:
    """The batch shards (``data * fsdp``) of the mesh set by ``sharding.sharding_context`` (or
    ``jax.set_mesh``); 1 without one. Read at trace time."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.axis_names)


def check_micro_batch_size(rows: int, micro_batch_size: int, shards: int) -> int:
    """The number of micro-batches of ``rows`` rows (1 for ``micro_batch_size`` 0).

    Raises:
      ValueError: ``micro_batch_size`` does not divide ``rows`` or is not a multiple of
        ``shards`` (the batch shards it is split over).
    """
    if micro_batch_size == 0:
        return 1
    if micro_batch_size < 0 or rows % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} must divide the step's {rows} rows")
    if micro_batch_size % shards:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be a multiple of the mesh's "
                         f"{shards} batch shards (data * fsdp), so every device takes part in every micro-batch")
    return rows // micro_batch_size


# ---------------------------------------------------------------------------------------------
# Micro-batches of whole rows
# ---------------------------------------------------------------------------------------------


def split_micro_batches(x: jax.Array, micro_batch_size: int, shards: int) -> jax.Array:
    """``[R, ...] -> [K, m, ...]``, micro-batch ``k`` holding rows ``k * m/S ..`` of every shard."""
    rows = x.shape[0]
    per_shard = micro_batch_size // shards
    x = x.reshape((shards, rows // micro_batch_size, per_shard) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1).reshape((rows // micro_batch_size, micro_batch_size) + x.shape[3:])
    return constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))


def merge_micro_batches(x: jax.Array, shards: int) -> jax.Array:
    """The inverse of :func:`split_micro_batches`: ``[K, m, ...] -> [R, ...]``."""
    num, micro_batch_size = x.shape[:2]
    x = x.reshape((num, shards, micro_batch_size // shards) + x.shape[2:])
    x = jnp.swapaxes(x, 0, 1).reshape((num * micro_batch_size,) + x.shape[3:])
    return constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))


def map_micro_batches(fn: Callable[[PyTree], PyTree], rows: PyTree, micro_batch_size: int) -> PyTree:
    """``fn`` over the rows of ``rows`` (a pytree of ``[R, ...]`` arrays), one micro-batch at a
    time (``lax.map``), outputs (``[rows, ...]`` leaves) back in row order. ``micro_batch_size``
    0 (or ``R``): one call."""
    num_rows = jax.tree.leaves(rows)[0].shape[0]
    shards = batch_shards()
    if check_micro_batch_size(num_rows, micro_batch_size, shards) == 1:
        return fn(rows)
    split = jax.tree.map(lambda x: split_micro_batches(x, micro_batch_size, shards), rows)
    return jax.tree.map(lambda y: merge_micro_batches(y, shards), jax.lax.map(fn, split))


# ---------------------------------------------------------------------------------------------
# Packed sequences: the plan (host)
# ---------------------------------------------------------------------------------------------


class PackingPlan(NamedTuple):
    """Where every real token of a step sits in packed rows (see the module docstring).

    Every array is ``[shards, micro_batches, rows_per_shard, length]`` int32 with ``micro_batches
    = R / m``, ``rows_per_shard = m / S`` packed rows of each shard per micro-batch and
    ``length = P + T``; padding positions have segment 0 and target -1.

    Attributes:
      source_row: the token's row, counted within its shard (``[0, R / S)``).
      source_position: its position in the row's ``prompt + response`` (``[0, P + T)``).
      segment_ids: 1, 2, ... for the sequences of a packed row; 0 for padding.
      positions: its position within its sequence (the RoPE position of the padded layout).
      target: ``t`` when the hidden state here predicts response token ``t`` of the row, else -1.
      num_micro_batches: int32 scalar, the packed micro-batches in use (the rest are padding).
    """

    source_row: Any
    source_position: Any
    segment_ids: Any
    positions: Any
    target: Any
    num_micro_batches: Any


def packed_shape(rows: int, prompt_length: int, max_new_tokens: int, micro_batch_size: int,
                 shards: int) -> tuple[int, int, int, int]:
    """The static ``[shards, micro_batches, rows_per_shard, length]`` of a step's plan."""
    check_micro_batch_size(rows, micro_batch_size, shards)
    if micro_batch_size == 0:
        raise ValueError("packed sequences need micro_batch_size > 0 (packed rows per micro-batch)")
    return shards, rows // micro_batch_size, micro_batch_size // shards, prompt_length + max_new_tokens


def abstract_packing_plan(rows: int, prompt_length: int, max_new_tokens: int, micro_batch_size: int,
                          shards: int, sharding: Any = None) -> PackingPlan:
    """The plan as ``jax.ShapeDtypeStruct``s (optionally with ``sharding`` on the arrays, e.g.
    ``sharding.batch_sharding(mesh, 4)``): the abstract argument of the packed update and
    teacher scoring."""
    shape = packed_shape(rows, prompt_length, max_new_tokens, micro_batch_size, shards)
    array = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)
    return PackingPlan(array, array, array, array, array, jax.ShapeDtypeStruct((), jnp.int32))


def sequence_lengths(prompt_mask: jax.Array, response_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(prompt_lengths [R], response_lengths [R], contiguous)`` of a rollout; ``contiguous``
    (a bool scalar) says every prompt mask is a suffix and every response mask a prefix, the
    layout packing relies on. Jit-able."""
    prompt_mask, response_mask = prompt_mask.astype(bool), response_mask.astype(bool)
    prompt_lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
    response_lengths = response_mask.sum(axis=1).astype(jnp.int32)
    prompt_len, new_tokens = prompt_mask.shape[1], response_mask.shape[1]
    suffix = jnp.arange(prompt_len)[None, :] >= prompt_len - prompt_lengths[:, None]
    prefix = jnp.arange(new_tokens)[None, :] < response_lengths[:, None]
    contiguous = jnp.all(suffix == prompt_mask) & jnp.all(prefix == response_mask)
    return prompt_lengths, response_lengths, contiguous


def plan_packing(prompt_lengths: np.ndarray, response_lengths: np.ndarray, *, prompt_length: int,
                 max_new_tokens: int, micro_batch_size: int, shards: int) -> PackingPlan:
    """First-fit-decreasing packing of a step's sequences, per batch shard (numpy).

    Args:
      prompt_lengths, response_lengths: ``[R]`` real tokens of each row's prompt / response
        (the prompt a suffix of its ``P`` slots, the response a prefix of its ``T``).
      prompt_length, max_new_tokens: ``P`` and ``T``.
      micro_batch_size: packed rows per micro-batch, across the ``shards``.
      shards: the mesh's batch shards; rows ``[s R/S, (s+1) R/S)`` belong to shard ``s``.

    Returns:
      The :class:`PackingPlan` (numpy arrays).

    Raises:
      ValueError: a row has response tokens but no prompt token (nothing predicts its first
        token), or lengths beyond ``P`` / ``T``.
    """
    prompt_lengths = np.asarray(prompt_lengths, np.int64)
    response_lengths = np.asarray(response_lengths, np.int64)
    rows = prompt_lengths.shape[0]
    _, num_micro, per_shard, length = packed_shape(rows, prompt_length, max_new_tokens, micro_batch_size, shards)
    if np.any(prompt_lengths > prompt_length) or np.any(response_lengths > max_new_tokens) or \
            np.any(prompt_lengths < 0) or np.any(response_lengths < 0):
        raise ValueError(f"sequence lengths must lie in [0, P={prompt_length}] and [0, T={max_new_tokens}]")
    orphans = np.flatnonzero((response_lengths > 0) & (prompt_lengths == 0))
    if orphans.size:
        raise ValueError(f"packed sequences: rows {orphans[:8].tolist()} have a response but an empty prompt, "
                         "so no token predicts their first response token")
    packed_rows = num_micro * per_shard             # per shard: enough for every row alone
    shape = (shards, packed_rows, length)
    source_row, source_position = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    target = np.full(shape, -1, np.int32)
    rows_per_shard = rows // shards
    used = 0
    for shard in range(shards):
        local_p = prompt_lengths[shard * rows_per_shard:(shard + 1) * rows_per_shard]
        local_r = response_lengths[shard * rows_per_shard:(shard + 1) * rows_per_shard]
        totals = local_p + local_r
        fill = np.zeros(packed_rows, np.int64)        # tokens placed in each packed row
        count = np.zeros(packed_rows, np.int64)       # sequences placed in each packed row
        opened = 0
        # Longest first; ties by row, so the plan is deterministic.
        for row in sorted(np.flatnonzero(local_r > 0), key=lambda i: (-totals[i], i)):
            size = int(totals[row])
            fits = np.flatnonzero(fill[:opened] + size <= length)
            slot = int(fits[0]) if fits.size else opened
            opened = max(opened, slot + 1)
            start, p, r = int(fill[slot]), int(local_p[row]), int(local_r[row])
            span = slice(start, start + size)
            count[slot] += 1
            source_row[shard, slot, span] = row
            source_position[shard, slot, span] = np.arange(prompt_length - p, prompt_length + r)
            segment_ids[shard, slot, span] = count[slot]
            positions[shard, slot, span] = np.arange(size)
            # Sequence position j predicts position j + 1 when that is a response token.
            target[shard, slot, start + p - 1:start + size - 1] = np.arange(r)
            fill[slot] += size
        used = max(used, -(-opened // per_shard))
    to_plan = lambda a: a.reshape(shards, num_micro, per_shard, length)
    return PackingPlan(to_plan(source_row), to_plan(source_position), to_plan(segment_ids),
                       to_plan(positions), to_plan(target), np.asarray(used, np.int32))


def packing_efficiency(plan: PackingPlan) -> float:
    """Real tokens over the token slots of the micro-batches in use (host)."""
    segments = np.asarray(plan.segment_ids)
    used = int(plan.num_micro_batches)
    slots = segments[:, :used].size
    return float((segments[:, :used] > 0).sum() / slots) if slots else 1.0


# ---------------------------------------------------------------------------------------------
# Packed sequences: the re-layout (device)
# ---------------------------------------------------------------------------------------------


class PackedRows(NamedTuple):
    """One packed micro-batch, ``[m, P + T]`` each.

    Attributes:
      input_ids: the tokens.
      positions: their positions within their sequences.
      segment_ids: 1, 2, ... per sequence; 0 padding.
      target_ids: the response token each position's hidden state predicts (0 where none).
      target_mask: bool, True where there is one.
      fields: the per-response-token inputs gathered to the positions that predict them (0 where
        none), by name.
    """

    input_ids: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    target_ids: jax.Array
    target_mask: jax.Array
    fields: dict[str, jax.Array]


def _micro_batch(plan: PackingPlan, index) -> PackingPlan:
    """The ``[S, m/S, C]`` slices of micro-batch ``index``."""
    take = lambda a: jax.lax.dynamic_index_in_dim(a, index, axis=1, keepdims=False)
    return PackingPlan(*(take(a) for a in plan[:5]), plan.num_micro_batches)


def _by_shard(x: jax.Array, shards: int) -> jax.Array:
    return x.reshape((shards, x.shape[0] // shards) + x.shape[1:])


def _gather(x: jax.Array, rows: jax.Array, columns: jax.Array) -> jax.Array:
    """``x [R, L, ...]`` at ``(rows, columns) [S, m/S, C]`` within each shard -> ``[m, C, ...]``."""
    shards = rows.shape[0]
    picked = jax.vmap(lambda xs, r, c: xs[r, c])(_by_shard(x, shards), rows, columns)
    picked = picked.reshape((-1,) + picked.shape[2:])
    return constrain(picked, ("act_batch",) + (None,) * (picked.ndim - 1))


def packed_rows(prompt_ids: jax.Array, response_ids: jax.Array, plan: PackingPlan, index,
                fields: dict[str, jax.Array]) -> PackedRows:
    """Micro-batch ``index`` of ``plan`` as packed rows.

    Args:
      prompt_ids: ``[R, P]``; response_ids: ``[R, T]`` (the step's rows, batch-sharded).
      plan: the step's :class:`PackingPlan` (device arrays).
      index: the micro-batch (a traced int).
      fields: per-response-token inputs ``[R, T, ...]`` to gather (teacher log-probs, weights).
    """
    part = _micro_batch(plan, index)
    tokens = jnp.concatenate([prompt_ids, response_ids], axis=1)
    has_target = part.target >= 0
    target = jnp.maximum(part.target, 0)
    merge = lambda a: a.reshape((-1,) + a.shape[2:])

    def gather_target(x):
        picked = _gather(x, part.source_row, target)
        mask = merge(has_target).reshape(merge(has_target).shape + (1,) * (picked.ndim - 2))
        return jnp.where(mask, picked, jnp.zeros((), picked.dtype))

    return PackedRows(
        input_ids=_gather(tokens, part.source_row, part.source_position),
        positions=merge(part.positions),
        segment_ids=merge(part.segment_ids),
        target_ids=gather_target(response_ids),
        target_mask=merge(has_target),
        fields={name: gather_target(x) for name, x in fields.items()},
    )


def scatter_targets(buffer: jax.Array, values: jax.Array, plan: PackingPlan, index) -> jax.Array:
    """``buffer [R, T, ...]`` with the packed per-position ``values [m, P + T, ...]`` of
    micro-batch ``index`` written to the response tokens they predict (positions without a target
    are dropped)."""
    part = _micro_batch(plan, index)
    shards, per_shard, length = part.target.shape
    new_tokens = buffer.shape[1]
    target = jnp.where(part.target >= 0, part.target, new_tokens)   # out of range: dropped
    values = values.reshape((shards, per_shard, length) + values.shape[2:]).astype(buffer.dtype)
    written = jax.vmap(lambda b, v, r, t: b.at[r, t].set(v, mode="drop"))(
        _by_shard(buffer, shards), values, part.source_row, target)
    return constrain(written.reshape(buffer.shape), ("act_batch",) + (None,) * (buffer.ndim - 1))


def loop_packed(plan: PackingPlan, body: Callable[[jax.Array, Any], Any], init: Any) -> Any:
    """``body(index, carry)`` for the packed micro-batches in use, in order (a ``while`` loop:
    the count is data)."""
    return jax.lax.fori_loop(0, plan.num_micro_batches, body, init)
