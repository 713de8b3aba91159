"""Layers shared by the model families: projections, RMSNorm, RoPE, grouped-query attention.

Dtype policy (every family follows it): parameters are stored in `param_dtype`; matmuls run in
the compute `dtype`; RMSNorm statistics, the RoPE rotation and the attention softmax are computed
in float32, as Hugging Face does. Parameters carry logical axis names
(`nn.with_logical_partitioning`) and activations are constrained with
`nn.with_logical_constraint` (:func:`constrain`); `effopd_jax.sharding` maps the names onto the
mesh. Outside `sharding.sharding_context` the constraints are no-ops.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """`x` constrained to the mesh axes its logical axis `names` map to (no-op off a mesh)."""
    return nn.with_logical_constraint(x, names)


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel `[in, out]`, computed in `dtype`."""

    features: int
    kernel_axes: tuple[str, str]
    use_bias: bool
    dtype: DType
    param_dtype: DType
    init_std: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes),
            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:]),
                (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """scale * x / sqrt(mean(x^2, -1) + eps), statistics in float32 (as HF), result in `dtype`."""

    eps: float
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin tables `[batch, seq, head_dim]` (float32) for integer `positions [batch, seq]`.

    inv_freq_j = theta^(-2j / head_dim), j < head_dim/2; angle = position * inv_freq, duplicated
    over both halves (HF's `cat((freqs, freqs))` layout).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `x [batch, seq, heads, head_dim]` with HF's rotate_half convention:
    x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]; computed in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
# How the self-attention of a forward without a cache is computed (a model runtime option):
#   direct     scores [batch, heads, seq, seq] float32 materialised (the reference; quadratic memory)
#   blockwise  plain JAX, online softmax over key blocks with a custom VJP: memory linear in seq,
#              any backend, equal to `direct` up to float reassociation
#   cudnn      jax.nn.dot_product_attention's cuDNN fused kernel (GPU, 16-bit compute dtypes,
#              no segment ids)
#   splash     the Pallas splash-attention kernel (TPU)
#   auto       cudnn on GPU for 16-bit compute dtypes without segment ids, blockwise otherwise
# Decoding with a cache always uses the direct form (one query row per step).
ATTENTION_IMPLS = ("auto", "direct", "blockwise", "cudnn", "splash")
# Query / key positions per block of the blockwise form (balanced down for shorter sequences).
ATTENTION_BLOCK_SIZE = 512


class AttentionMask(NamedTuple):
    """The mask of causal self-attention over a forward's own tokens, kept as per-token vectors
    so that no `[seq, seq]` array needs to exist.

    Query `i` may attend to key `j` iff `j <= i`, `kv_valid[b, j]` and, with segment ids,
    `segment_ids[b, i] == segment_ids[b, j]` (packed rows: no attention across segments).

    Attributes:
      kv_valid: `[batch, seq]` bool, True for real tokens.
      segment_ids: `[batch, seq]` int32, or None (one segment per row).
    """

    kv_valid: Array
    segment_ids: Array | None = None

    def dense(self) -> Array:
        """The `[batch, seq, seq]` bool mask (what the direct form reads)."""
        seq = self.kv_valid.shape[1]
        causal = jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None]
        mask = causal[None] & self.kv_valid[:, None, :]
        if self.segment_ids is not None:
            mask = mask & (self.segment_ids[:, :, None] == self.segment_ids[:, None, :])
        return mask


def attention(q: Array, k: Array, v: Array, mask: Array | AttentionMask, dtype: DType, *,
              impl: str = "direct", block_size: int = ATTENTION_BLOCK_SIZE) -> Array:
    """Grouped-query softmax attention.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]. Query head h
    reads kv head h // (heads / kv_heads) (HF's repeat_kv). `mask` is either a dense
    [batch, q_len, kv_len] bool array (True = may attend; the cached decoding path, always
    computed directly) or an :class:`AttentionMask` of causal self-attention (q_len == kv_len),
    computed by `impl` (one of `ATTENTION_IMPLS`). Scores and softmax in float32. Returns
    [batch, q_len, heads, head_dim] in `dtype`.

    Rows with no key to attend to (padding queries) are finite but unspecified: the direct form
    averages every value, the blockwise form returns 0; no real token ever reads them.
    """
    if not isinstance(mask, AttentionMask):
        if q.shape[1] == 1:  # one query per row: a cached decode step
            return decode_attention(q, k, v, mask, dtype)
        return direct_attention(q, k, v, mask, dtype)
    impl = resolve_attention_impl(impl, dtype, has_segments=mask.segment_ids is not None)
    if impl == "direct":
        return direct_attention(q, k, v, mask.dense(), dtype)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask.kv_valid, mask.segment_ids, dtype=dtype,
                                   block_size=block_size)
    if impl == "cudnn":
        return sequence_length_attention(q, k, v, mask.kv_valid, mask.segment_ids, dtype=dtype,
                                         implementation="cudnn")
    return splash_attention(q, k, v, mask.kv_valid, mask.segment_ids, dtype=dtype)


def resolve_attention_impl(impl: str, dtype: DType, *, has_segments: bool) -> str:
    """`impl` with "auto" resolved for the default backend; ValueError for unknown names."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and not has_segments:
        return "cudnn"
    return "blockwise"


def direct_attention(q: Array, k: Array, v: Array, mask: Array, dtype: DType) -> Array:
    """The reference: scores `[batch, kv_heads, groups, q_len, kv_len]` in float32, masked,
    softmax, weighted values. Fully masked rows give a uniform (finite) distribution."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)


def decode_attention(q: Array, k: Array, v: Array, mask: Array, dtype: DType) -> Array:
    """:func:`direct_attention` for one query per row (a decode step), as multiply-reduce.

    With ``q_len == 1`` the two attention contractions are matrix-vector products per
    (row, kv head): they are bound by reading the cached keys and values once, not by FLOPs.
    Written as broadcast products summed over ``head_dim`` and over the cache slots, XLA fuses
    each into one pass over the cache in its stored ``[batch, kv_len, kv_heads, head_dim]``
    layout; the einsum of :func:`direct_attention` instead becomes a batched dot whose batch axes
    (batch, kv head) must lead, i.e. a transposed copy of the layer's whole cache every step.

      scores[b, t, k, g] = sum_d q[b, k, g, d] * keys[b, t, k, d] / sqrt(head_dim)   (float32)
      probs = softmax over t of scores (masked slots: float32 min, as direct_attention)
      out[b, k, g, d] = sum_t probs[b, t, k, g] * values[b, t, k, d]

    q: [batch, 1, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]; mask
    [batch, 1, kv_len] bool. Returns [batch, 1, heads, head_dim] in `dtype`; equal to
    :func:`direct_attention` up to float rounding.
    """
    batch, q_len, heads, head_dim = q.shape
    if q_len != 1:
        raise ValueError(f"decode_attention takes one query per row, got q_len={q_len}")
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q = q.reshape(batch, 1, kv_heads, groups, head_dim).astype(jnp.float32) * (head_dim ** -0.5)
    scores = jnp.sum(q * k.astype(jnp.float32)[:, :, :, None, :], axis=-1)       # [b, t, k, g]
    scores = jnp.where(mask[:, 0, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=1).astype(dtype)
    out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(dtype), axis=1, dtype=jnp.float32)
    return out.reshape(batch, 1, heads, head_dim).astype(dtype)


def _balanced_block(seq: int, block_size: int) -> int:
    """The block of `ceil(seq / block_size)` equal blocks covering `seq` (rounded up to a
    multiple of 8 when above 8), so a sequence just over a block is not padded to two."""
    blocks = -(-seq // block_size)
    block = -(-seq // blocks)
    return block if block <= 8 else -(-block // 8) * 8


def blockwise_attention(q: Array, k: Array, v: Array, kv_valid: Array,
                        segment_ids: Array | None = None, *, dtype: DType,
                        block_size: int = ATTENTION_BLOCK_SIZE) -> Array:
    """Causal GQA self-attention, one `[block, block]` tile of scores at a time.

    Forward (FlashAttention's online softmax): for each query block, a loop over the key blocks
    it may see (causality skips the later ones; a tile with no allowed (query, key) pair, e.g.
    left padding or other segments, is skipped) keeps the running maximum `m`, normaliser `l` and
    unnormalised output; the result is `acc / l` and the saved statistic `lse = m + log l`.
    Backward (a custom VJP): each tile's probabilities are recomputed from `lse`,
    `p = exp(s - lse)`, and `ds = p * (dO.V^T - rowsum(dO * O))` gives dq, dk, dv. Only
    `[batch, heads, block, block]` scores exist at a time, forward and backward, so memory is
    linear in the sequence. Equal to :func:`direct_attention` (values and gradients) on every
    query that has a key to attend to; query rows with none give 0.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
      kv_valid: [batch, seq] bool (real tokens).
      segment_ids: [batch, seq] int, or None; attention stays within a segment.
      dtype: the output dtype (matmul inputs keep theirs; scores and softmax are float32).
      block_size: at most this many positions per block (static).

    Returns:
      [batch, seq, heads, head_dim] in `dtype`.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if k.shape[1] != seq:
        raise ValueError(f"blockwise_attention is self-attention: q has {seq} positions, k {k.shape[1]}")
    block = _balanced_block(seq, block_size)
    padded = -(-seq // block) * block
    segments = (jnp.zeros((batch, seq), jnp.int32) if segment_ids is None
                else segment_ids.astype(jnp.int32))
    kv_valid = kv_valid.astype(bool)
    if padded != seq:
        pad = lambda x, value: jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2),
                                       constant_values=value)
        q, k, v, kv_valid, segments = pad(q, 0), pad(k, 0), pad(v, 0), pad(kv_valid, False), pad(segments, 0)
    q = q.reshape(batch, padded, kv_heads, heads // kv_heads, head_dim)
    out = _flash(q, k, v, kv_valid, segments, block)
    return out[:, :seq].reshape(batch, seq, heads, head_dim).astype(dtype)


def _tile_mask(block: int, i, j, kv_valid, segments):
    """Allowed (query, key) pairs of query block i and key block j: [batch, block, block]."""
    q_slots = i * block + jnp.arange(block)
    k_slots = j * block + jnp.arange(block)
    valid = jax.lax.dynamic_slice_in_dim(kv_valid, j * block, block, axis=1)
    seg_q = jax.lax.dynamic_slice_in_dim(segments, i * block, block, axis=1)
    seg_k = jax.lax.dynamic_slice_in_dim(segments, j * block, block, axis=1)
    causal = k_slots[None, :] <= q_slots[:, None]
    return causal[None] & valid[:, None, :] & (seg_q[:, :, None] == seg_k[:, None, :])


def _tile_scores(q_tile, k_tile, allowed):
    """Masked scaled scores [batch, kv_heads, groups, block_q, block_k] in float32 (-inf where
    not allowed)."""
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q_tile, k_tile, preferred_element_type=jnp.float32)
    scores = scores * (q_tile.shape[-1] ** -0.5)
    return jnp.where(allowed[:, None, None], scores, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, kv_valid, segments, block):
    return _flash_forward(q, k, v, kv_valid, segments, block)[0]


def _flash_forward(q, k, v, kv_valid, segments, block):
    batch, seq, kv_heads, groups, head_dim = q.shape
    num_blocks = seq // block
    slice_seq = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)

    def query_block(i):
        q_tile = slice_seq(q, i * block)

        def key_block(j, carry):
            allowed = _tile_mask(block, i, j, kv_valid, segments)

            def update(carry):
                m, l, acc = carry
                scores = _tile_scores(q_tile, slice_seq(k, j * block), allowed)
                m_new = jnp.maximum(m, scores.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                correction = jnp.exp(m - m_safe)
                p = jnp.exp(scores - m_safe[..., None])
                l = l * correction + p.sum(-1)
                acc = acc * correction[..., None] + jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(v.dtype), slice_seq(v, j * block),
                    preferred_element_type=jnp.float32)
                return m_new, l, acc

            return jax.lax.cond(allowed.any(), update, lambda c: c, carry)

        stats_shape = (batch, kv_heads, groups, block)
        init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
                jnp.zeros(stats_shape + (head_dim,), jnp.float32))
        # Causality: query block i sees key blocks 0..i only.
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        has_keys = l > 0
        out = acc / jnp.where(has_keys, l, 1.0)[..., None]
        lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), jnp.inf)
        return out, lse

    out, lse = jax.lax.map(query_block, jnp.arange(num_blocks))
    # [blocks, batch, kv_heads, groups, block, d] -> [batch, seq, kv_heads, groups, d]
    out = jnp.moveaxis(out, 4, 1).reshape(num_blocks, block, batch, kv_heads, groups, head_dim)
    out = jnp.moveaxis(out, 2, 0).reshape(batch, seq, kv_heads, groups, head_dim)
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, kv_heads, groups, seq)
    return out, (q, k, v, kv_valid, segments, out, lse)


def _flash_backward(block, residuals, d_out):
    q, k, v, kv_valid, segments, out, lse = residuals
    batch, seq, kv_heads, groups, head_dim = q.shape
    num_blocks = seq // block
    scale = head_dim ** -0.5
    slice_seq = lambda x, start, axis=1: jax.lax.dynamic_slice_in_dim(x, start, block, axis=axis)
    d_out = d_out.astype(jnp.float32)
    # rowsum(dO * O) [batch, kv_heads, groups, seq]: the softmax Jacobian's correction term.
    delta = jnp.moveaxis(jnp.sum(d_out * out, axis=-1), 1, 3)
    d_out = d_out.astype(q.dtype)

    def key_block(j, carry):
        dq, dk, dv = carry
        k_tile, v_tile = slice_seq(k, j * block), slice_seq(v, j * block)

        def query_block(i, inner):
            allowed = _tile_mask(block, i, j, kv_valid, segments)

            def update(inner):
                dq, dk_tile, dv_tile = inner
                q_tile, do_tile = slice_seq(q, i * block), slice_seq(d_out, i * block)
                scores = _tile_scores(q_tile, k_tile, allowed)
                p = jnp.exp(scores - slice_seq(lse, i * block, axis=3)[..., None])
                dv_tile = dv_tile + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(q.dtype), do_tile,
                                               preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", do_tile, v_tile, preferred_element_type=jnp.float32)
                ds = (p * (dp - slice_seq(delta, i * block, axis=3)[..., None])).astype(q.dtype)
                dq_tile = jnp.einsum("bkgqs,bskd->bqkgd", ds, k_tile,
                                     preferred_element_type=jnp.float32) * scale
                dk_tile = dk_tile + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_tile,
                                               preferred_element_type=jnp.float32) * scale
                dq = jax.lax.dynamic_update_slice_in_dim(
                    dq, slice_seq(dq, i * block) + dq_tile, i * block, axis=1)
                return dq, dk_tile, dv_tile

            return jax.lax.cond(allowed.any(), update, lambda c: c, inner)

        zeros = jnp.zeros((batch, block, kv_heads, head_dim), jnp.float32)
        # Causality: key block j is seen by query blocks j..end only.
        dq, dk_tile, dv_tile = jax.lax.fori_loop(j, num_blocks, query_block, (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_tile, j * block, axis=1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_tile, j * block, axis=1)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, num_blocks, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_forward, _flash_backward)


def sequence_length_attention(q: Array, k: Array, v: Array, kv_valid: Array,
                              segment_ids: Array | None = None, *, dtype: DType,
                              implementation: str = "cudnn") -> Array:
    """Causal GQA self-attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel
    with `implementation="cudnn"`), for rows whose real tokens are one contiguous run.

    The fused kernels take right padding only (per-row sequence lengths), so each row is rotated
    to start at its first real token, attended with `is_causal=True` and its length, and rotated
    back. Rotation does not change the result because RoPE was applied before.

    Raises:
      ValueError: with segment ids (packed rows), or (cuDNN) a compute dtype other than
        bfloat16 / float16; use the blockwise form for those.
    """
    if segment_ids is not None:
        raise ValueError("attention_impl='cudnn' does not take segment ids (packed sequences); "
                         "use attention_impl='blockwise' (or 'auto')")
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs a bfloat16 / float16 compute dtype, got {q.dtype}; "
                         "use attention_impl='blockwise' (or 'auto')")
    seq = q.shape[1]
    kv_valid = kv_valid.astype(bool)
    start = jnp.argmax(kv_valid, axis=1)
    lengths = kv_valid.sum(axis=1).astype(jnp.int32)
    rotate = lambda x, shift: jnp.take_along_axis(
        x, ((jnp.arange(seq)[None, :] + shift[:, None]) % seq)[:, :, None, None], axis=1)
    out = jax.nn.dot_product_attention(
        rotate(q, start), rotate(k, start), rotate(v, start), is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
    return rotate(out, -start).astype(dtype)


def splash_attention(q: Array, k: Array, v: Array, kv_valid: Array,
                     segment_ids: Array | None = None, *, dtype: DType) -> Array:
    """The Pallas splash-attention kernel (TPU only); see `effopd_jax.models.tpu_attention`."""
    from effopd_jax.models import tpu_attention  # noqa: PLC0415  (Pallas TPU, imported on use)

    return tpu_attention.splash_attention(q, k, v, kv_valid, segment_ids, dtype=dtype)


class Weight(nn.Module):
    """Holds one parameter `param_name` of `shape` with logical `axes`, initialised
    N(0, init_std), and returns it: the embedding table (`embedding [vocab, hidden]`, whose
    lookup and tying are the model's) and the untied output head (`kernel [hidden, vocab]`)."""

    param_name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init_std: float
    param_dtype: DType

    @nn.compact
    def __call__(self) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes)
        return self.param(self.param_name, init, self.shape, self.param_dtype)


# jax.checkpoint policies behind the `remat` names ("none" = no rematerialisation).
REMAT_POLICY_FNS = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
