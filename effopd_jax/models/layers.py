"""Layers shared by the model families: projections, RMSNorm, RoPE, grouped-query attention.

Dtype policy (every family follows it): parameters are stored in `param_dtype`; matmuls run in
the compute `dtype`; RMSNorm statistics, the RoPE rotation and the attention softmax are computed
in float32, as Hugging Face does. Parameters carry logical axis names
(`nn.with_logical_partitioning`) and activations are constrained with
`nn.with_logical_constraint` (:func:`constrain`); `effopd_jax.sharding` maps the names onto the
mesh. Outside `sharding.sharding_context` the constraints are no-ops.
"""
from __future__ import annotations

from typing import Any

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


def attention(q: Array, k: Array, v: Array, mask: Array, dtype: DType) -> Array:
    """Grouped-query softmax attention.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    mask: [batch, q_len, kv_len] bool (True = may attend). Query head h reads kv head
    h // (heads / kv_heads) (HF's repeat_kv). Scores and softmax in float32; fully masked rows
    give a uniform (finite) distribution, never NaN. Returns [batch, q_len, heads, head_dim].
    """
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
