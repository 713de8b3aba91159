"""Causal GQA self-attention through the Pallas splash-attention kernel (TPU).

`splash_attention` is `layers.attention`'s `attention_impl="splash"`: the kernel of
`jax.experimental.pallas.ops.tpu.splash_attention` (block-sparse flash attention, with its own
backward kernels) per row and KV head, the query heads of a group sharing their key/value head
(the kernel's multi-query form). Padding and packed segments are both segment ids: real tokens
keep theirs (1 without packing) and padding gets -1, so no real token reads padding and every
query row has at least itself to attend to (the kernel needs no empty row). Under a mesh the
kernel runs inside `jax.shard_map`, rows split over the batch axes and KV heads over `tensor`,
since a Pallas call has no automatic partitioning.

Imported on use: nothing here loads unless a config asks for `"splash"`. The kernel compiles for
TPU only; `interpret=True` runs the same kernel through the Pallas interpreter on any backend (the
CPU tests check its numbers that way).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

Array = jax.Array
# The kernel's tile: sequences are padded to a multiple of it.
SPLASH_BLOCK = 512
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def splash_attention(q: Array, k: Array, v: Array, kv_valid: Array, segment_ids: Array | None = None,
                     *, dtype: Any, interpret: bool = False, block: int = SPLASH_BLOCK) -> Array:
    """q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; kv_valid:
    [batch, seq] bool; segment_ids: [batch, seq] int or None. Returns [batch, seq, heads,
    head_dim] in `dtype`; padding queries attend to padding (finite, unspecified)."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    block = min(block, -(-seq // 128) * 128)
    padded = -(-seq // block) * block
    segments = jnp.ones((batch, seq), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    segments = jnp.where(kv_valid.astype(bool), segments, -1)
    # The kernel does not scale the scores.
    q = (q.astype(jnp.float32) * head_dim ** -0.5).astype(q.dtype)
    if padded != seq:
        pad = lambda x, value: jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2),
                                       constant_values=value)
        q, k, v, segments = pad(q, 0), pad(k, 0), pad(v, 0), pad(segments, -1)
    # [batch, kv_heads, groups, seq, d] queries; [batch, kv_heads, seq, d] keys and values.
    q = jnp.moveaxis(q.reshape(batch, padded, kv_heads, groups, head_dim), 1, 3)
    k, v = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)
    run = functools.partial(_per_row_and_head, groups=groups, seq=padded, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and all(axis in mesh.axis_names for axis in _BATCH_AXES + (_HEAD_AXIS,)):
        heads_spec = P(_BATCH_AXES, _HEAD_AXIS)
        run = jax.shard_map(run, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, P(_BATCH_AXES)),
                            out_specs=heads_spec, check_vma=False)
    out = run(q, k, v, segments)                                   # [batch, kv_heads, groups, seq, d]
    out = jnp.moveaxis(out, 3, 1).reshape(batch, padded, heads, head_dim)
    return out[:, :seq].astype(dtype)


def _per_row_and_head(q, k, v, segments, *, groups: int, seq: int, block: int, interpret: bool):
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq, seq))] * groups)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    kernel = splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)

    def one(q_group, k_head, v_head, row_segments):
        return kernel(q_group, k_head, v_head, splash.SegmentIds(q=row_segments, kv=row_segments))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))           # over KV heads
    return jax.vmap(per_head, in_axes=(0, 0, 0, 0))(q, k, v, segments)  # over rows
