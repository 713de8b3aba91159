"""Qwen2 / Qwen2.5 / Qwen3 dense decoders in Flax Linen, with a static KV cache.

The network is the Hugging Face `Qwen2ForCausalLM` / `Qwen3ForCausalLM` computation:

    h_0 = embed_tokens[input_ids]
    for each layer:
        a   = Attention(RMSNorm(h))            # GQA, RoPE, optional q/k/v bias, Qwen3 q/k norm
        h   = h + a
        h   = h + MLP(RMSNorm(h))              # SwiGLU: down(silu(gate(x)) * up(x))
    logits = RMSNorm(h) @ lm_head_weight        # lm_head/kernel, or embed_tokens.T when tied

Parameter names and layouts follow docs/architecture.md: every kernel is stored `[in, out]`
(the transpose of the HF `weight`), layer `i` lives under `layers_{i}/...`, or under `layers/...`
with a leading `[num_layers]` axis when `scan_layers=True`.

Dtype policy: parameters are stored in `config.param_dtype`; every matmul runs in
`config.dtype` (the compute dtype); RMSNorm statistics, RoPE rotation and the attention softmax
are computed in float32 (as HF does); logits are always float32.

Sharding: every parameter carries logical axis names (`nn.with_logical_partitioning`) and the main
activations are constrained with `nn.with_logical_constraint`; `effopd_jax.sharding` maps the
names onto the mesh axes `data`, `fsdp`, `tensor`. Outside a `sharding.sharding_context` the
constraints are no-ops.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effopd_jax.models.decoder import (
    DecoderConfig, DecoderFamily, embed_tokens, global_param_info, layer_rows,
    lm_output,
)
from effopd_jax.models.family import (
    BIAS, MATRIX, NORM, ParamInfo, UnsupportedConfigError, read_hf_config, register_family,
)
from effopd_jax.models.layers import (
    REMAT_POLICIES, REMAT_POLICY_FNS, AttentionMask, Linear, RMSNorm,
    apply_rope, attention, constrain, rope_cos_sin,
)
from effopd_jax.models import paged

Array = jax.Array
DType = Any

# The HF model types this family reads.
QWEN_MODEL_TYPES = ("qwen2", "qwen3")
# The 2-D matrices of a decoder layer, in reading order (the authors' svd.py analyses these).
QWEN_MATRIX_MODULES = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                       "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
# Fields of a HF config.json that announce a mixture-of-experts model.
_MOE_FIELDS = ("num_experts", "num_local_experts", "moe_intermediate_size", "num_experts_per_tok")


@dataclasses.dataclass(frozen=True)
class QwenConfig(DecoderConfig):
    """Architecture of a Qwen2/2.5/3 dense decoder plus runtime options.

    Architecture fields use the Hugging Face names. The structural flags `qkv_bias`,
    `o_proj_bias` and `qk_norm` are derived from the HF `model_type` by `from_hf`:
    qwen2 -> (True, False, False); qwen3 -> (attention_bias, attention_bias, True).

    Runtime fields (not part of the checkpoint): `param_dtype` (storage dtype of parameters),
    `dtype` (compute dtype), `scan_layers` (layers under `nn.scan`, params under `layers/` with a
    leading layer axis), `remat` (activation checkpointing policy, one of `REMAT_POLICIES`),
    `attention_impl` (how a forward without a cache computes attention, one of
    `layers.ATTENTION_IMPLS`; decoding with a cache is always direct).

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = True
    model_type: str = "qwen3"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime options.
    param_dtype: DType = jnp.float32
    dtype: DType = jnp.bfloat16
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self):
        self._check_decoder_fields(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim"))
        if self.head_dim % 2:
            raise ValueError(f"QwenConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.model_type not in QWEN_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"QwenConfig.model_type {self.model_type!r} is not supported "
                f"(supported: {QWEN_MODEL_TYPES})")

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json <-> QwenConfig
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "QwenConfig":
        """Builds a config from a HF `config.json` (a model directory, the file, or its dict).

        `overrides` set any field afterwards (typically the runtime options `dtype`,
        `param_dtype`, `scan_layers`, `remat`).

        Raises:
          UnsupportedConfigError: `model_type` not qwen2/qwen3 (MoE variants included), MoE
            fields, `use_sliding_window: true` or sliding layers in `layer_types`, a
            `rope_scaling` / `rope_parameters.rope_type` other than default, `hidden_act` not silu.
          ValueError: a required field is missing, or config.json is not a JSON object.
        """
        hf = read_hf_config(path_or_dict)
        model_type = hf.get("model_type")
        if model_type not in QWEN_MODEL_TYPES:
            hint = " (mixture-of-experts models are not implemented)" if "moe" in str(model_type) else ""
            raise UnsupportedConfigError(
                f"config field model_type={model_type!r} is not supported{hint}; "
                f"supported: {QWEN_MODEL_TYPES}")
        for field in _MOE_FIELDS:
            if hf.get(field):
                raise UnsupportedConfigError(
                    f"config field {field}={hf[field]!r}: mixture-of-experts is not implemented")
        if hf.get("use_sliding_window", False):
            raise UnsupportedConfigError(
                "config field use_sliding_window=true: sliding-window attention is not implemented")
        layer_types = hf.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise UnsupportedConfigError(
                f"config field layer_types={layer_types!r}: only 'full_attention' layers are "
                "implemented")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(
                f"config field hidden_act={hf['hidden_act']!r}: only 'silu' is implemented")
        if hf.get("attention_dropout", 0.0):
            raise UnsupportedConfigError(
                f"config field attention_dropout={hf['attention_dropout']!r}: dropout is not "
                "implemented")
        rope_theta = _rope_theta(hf)

        def required(name: str) -> Any:
            if name not in hf:
                raise ValueError(f"config.json is missing the required field {name!r}")
            return hf[name]

        hidden = int(required("hidden_size"))
        heads = int(required("num_attention_heads"))
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        if model_type == "qwen3":
            # Qwen3Config's class default is 128 and LlamaAttention reads it as is.
            head_dim = int(hf.get("head_dim") or 128)
            attention_bias = bool(hf.get("attention_bias", False))
            qkv_bias, o_proj_bias, qk_norm = attention_bias, attention_bias, True
        else:
            if hf.get("head_dim"):
                head_dim = int(hf["head_dim"])
            elif hidden % heads:
                raise ValueError(
                    f"config: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                    "and head_dim is not given")
            else:
                head_dim = hidden // heads
            # transformers' Qwen2Attention always has q/k/v biases and no o_proj bias.
            qkv_bias, o_proj_bias, qk_norm = True, False, False
        fields = dict(
            vocab_size=int(required("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(required("intermediate_size")),
            num_hidden_layers=int(required("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=o_proj_bias,
            qk_norm=qk_norm,
            model_type=model_type,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict (without the `dtype` entry, which `convert.save_hf` adds).

        Raises:
          UnsupportedConfigError: the structural flags cannot be expressed by this `model_type`
            (qwen2 needs qkv_bias and no o_proj_bias / qk_norm; qwen3 needs qk_norm and
            qkv_bias == o_proj_bias).
        """
        if self.model_type == "qwen2":
            if not self.qkv_bias or self.o_proj_bias or self.qk_norm:
                raise UnsupportedConfigError(
                    "model_type 'qwen2' implies qkv_bias=True, o_proj_bias=False, qk_norm=False; "
                    f"got qkv_bias={self.qkv_bias}, o_proj_bias={self.o_proj_bias}, "
                    f"qk_norm={self.qk_norm}")
            architecture = "Qwen2ForCausalLM"
        else:
            if not self.qk_norm or self.qkv_bias != self.o_proj_bias:
                raise UnsupportedConfigError(
                    "model_type 'qwen3' implies qk_norm=True and qkv_bias == o_proj_bias "
                    f"(attention_bias); got qk_norm={self.qk_norm}, qkv_bias={self.qkv_bias}, "
                    f"o_proj_bias={self.o_proj_bias}")
            architecture = "Qwen3ForCausalLM"
        hf = {
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            # Both spellings: transformers>=5 reads rope_parameters, older readers rope_theta.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "qwen3":
            hf["attention_bias"] = self.qkv_bias
        return hf


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE base from either `rope_parameters` (transformers>=5) or `rope_theta`/`rope_scaling`."""
    rope_parameters = hf.get("rope_parameters")
    if rope_parameters is not None:
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedConfigError(
                f"config field rope_parameters.rope_type={rope_type!r}: only 'default' RoPE is "
                "implemented")
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rope_type != "default":
            raise UnsupportedConfigError(
                f"config field rope_scaling.type={rope_type!r}: only default RoPE (no scaling) is "
                "implemented")
    if rope_parameters is not None and "rope_theta" in rope_parameters:
        return float(rope_parameters["rope_theta"])
    # transformers' default when a config names no base.
    return float(hf.get("rope_theta", 10000.0))


# ============================================================================================
# KV cache
# ============================================================================================
class KVCache(NamedTuple):
    """Static-shape key/value cache for all layers.

    k, v:  [layers, batch, max_len, kv_heads, head_dim] keys (after RoPE) and values; or, the
      per-layer form (`split_cache_layers`, unrolled layers only), tuples of `layers` arrays
      [batch, max_len, kv_heads, head_dim].
    index: int32 scalar, the next slot to write; slots `[0, index)` are filled.

    The per-layer form is what a decode loop should carry: each layer's buffer is then a
    separate loop value that `dynamic_update_slice` updates in place. With one stacked buffer a
    layer must read its `[layer]` slice and write it back, and XLA copies the whole stack to
    keep the old one alive for the read (measured in the compiled HLO of `sampling`).
    """

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]
    index: Array


# The logical axes of a `KVCache` (families whose cache it is share them).
KV_CACHE_LOGICAL_AXES = KVCache(k=("layers", "act_batch", "act_length", "act_kv_heads", None),
                                v=("layers", "act_batch", "act_length", "act_kv_heads", None), index=())


def split_cache_layers(cache: KVCache) -> KVCache:
    """The per-layer form of a stacked cache (tuples of `[batch, max_len, kv_heads, head_dim]`)."""
    if isinstance(cache.k, tuple):
        return cache
    layers = cache.k.shape[0]
    return cache._replace(k=tuple(cache.k[i] for i in range(layers)),
                          v=tuple(cache.v[i] for i in range(layers)))


def stack_cache_layers(cache: KVCache) -> KVCache:
    """The stacked form (`[layers, ...]`) of a per-layer cache; a stacked one passes through."""
    if not isinstance(cache.k, tuple):
        return cache
    return cache._replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v))


def cache_layer(cache: KVCache, i: int) -> tuple[Array, Array]:
    """Layer `i`'s `(keys, values)` `[batch, max_len, kv_heads, head_dim]` of either form."""
    return cache.k[i], cache.v[i]


def with_cache_layer(k: Array | tuple[Array, ...], v: Array | tuple[Array, ...], i: int,
                     layer_cache: tuple[Array, Array]) -> tuple[Any, Any]:
    """`(k, v)` (either form) with layer `i` replaced by `layer_cache`."""
    if isinstance(k, tuple):
        return k[:i] + (layer_cache[0],) + k[i + 1:], v[:i] + (layer_cache[1],) + v[i + 1:]
    return k.at[i].set(layer_cache[0]), v.at[i].set(layer_cache[1])


def init_cache(config: QwenConfig, batch: int, max_len: int, dtype: DType = jnp.bfloat16) -> KVCache:
    """An empty cache: zeros of `[layers, batch, max_len, kv_heads, head_dim]`, index 0."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   index=jnp.zeros((), jnp.int32))


class PagedKVCache(NamedTuple):
    """A paged key/value cache for all layers (see `effopd_jax.models.paged`).

    k, v: [shards, layers, pages_per_shard, page_size, kv_heads, head_dim] keys (after RoPE) and
    values (the batch shard leads: see `effopd_jax.models.paged`); which rows own which pages is
    the caller's page table, not part of the cache.
    """

    k: Array
    v: Array


def init_paged_cache(config: QwenConfig, *, shards: int, pages_per_shard: int, page_size: int,
                     dtype: DType = jnp.bfloat16) -> PagedKVCache:
    """An empty paged cache: zeros of `[shards, layers, pages_per_shard, page_size, kv_heads,
    head_dim]` (page 0 of each shard is the null page)."""
    shape = (shards, config.num_hidden_layers, pages_per_shard, page_size, config.num_key_value_heads,
             config.head_dim)
    return PagedKVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


# ============================================================================================
# Layers
# ============================================================================================
class Attention(nn.Module):
    """Self-attention: q/k/v projections (+ bias if `qkv_bias`), Qwen3 per-head q/k RMSNorm,
    RoPE, GQA softmax attention, o_proj (+ bias if `o_proj_bias`: only a Qwen3 checkpoint with
    `attention_bias: true` has one, a `layers_{i}/self_attn/o_proj/bias [hidden]` param beyond
    the table in docs/architecture.md). Returns `(out [batch, seq, hidden], layer_cache)`."""

    config: QwenConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None):
        cfg = self.config
        batch, seq, _ = x.shape
        dense = lambda features, axes, bias, name: Linear(
            features, axes, bias, cfg.dtype, cfg.param_dtype, cfg.initializer_range, name=name)
        q = dense(cfg.num_attention_heads * cfg.head_dim, ("embed", "q_heads"), cfg.qkv_bias, "q_proj")(x)
        k = dense(cfg.num_key_value_heads * cfg.head_dim, ("embed", "kv_heads"), cfg.qkv_bias, "k_proj")(x)
        v = dense(cfg.num_key_value_heads * cfg.head_dim, ("embed", "kv_heads"), cfg.qkv_bias, "v_proj")(x)
        q = q.reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE.
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))

        if isinstance(cache_index, paged.PAGED_INDEXES):  # a paged cache (QwenPaged)
            out, new_cache = paged.cached_attention(q, k, v, mask, layer_cache, cache_index,
                                                    attention=attention, dtype=cfg.dtype)
            out = out.reshape(batch, seq, cfg.num_attention_heads * cfg.head_dim)
            return dense(cfg.hidden_size, ("q_heads", "embed"), cfg.o_proj_bias, "o_proj")(out), new_cache

        new_cache = None
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            start = (0, cache_index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            new_cache = (k_cache, v_cache)
            k, v = k_cache.astype(cfg.dtype), v_cache.astype(cfg.dtype)

        out = attention(q, k, v, mask, cfg.dtype, impl=cfg.attention_impl)
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        out = out.reshape(batch, seq, cfg.num_attention_heads * cfg.head_dim)
        out = dense(cfg.hidden_size, ("q_heads", "embed"), cfg.o_proj_bias, "o_proj")(out)
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), [batch, seq, hidden] -> same."""

    config: QwenConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = lambda features, axes, name: Linear(
            features, axes, False, cfg.dtype, cfg.param_dtype, cfg.initializer_range, name=name)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)


class DecoderLayer(nn.Module):
    """Pre-norm block; returns `(hidden, layer_cache)` so it can be the body of `nn.scan`."""

    config: QwenConfig

    @nn.compact
    def __call__(self, hidden: Array, cos: Array, sin: Array, mask: Array,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        attn_out, layer_cache = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(hidden), cos, sin, mask, layer_cache, cache_index)
        hidden = constrain(hidden + attn_out, ("act_batch", "act_length", "act_embed"))
        hidden = hidden + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(hidden))
        hidden = constrain(hidden, ("act_batch", "act_length", "act_embed"))
        return hidden, layer_cache


class DecoderInputs(NamedTuple):
    """What a Qwen-family decoder's layers read besides the hidden states.

    mask: without a cache, the per-token `AttentionMask` (so `attention_impl` need not
      materialise [seq, seq]); with a cache, the dense [batch, seq, max_len] bool mask.
    key_valid: [batch, kv_len] bool, the keys that may be attended to (real tokens, or valid
      cache slots; packed padding excluded).
    positions: [batch, seq] int RoPE positions.
    """

    mask: Array | AttentionMask
    key_valid: Array
    positions: Array


def decoder_inputs(cfg: Any, input_ids: Array, *, positions: Array | None, attention_mask: Array | None,
                   cache: Any, segment_ids: Array | None) -> DecoderInputs:
    """Checks a forward's arguments and builds its attention mask and positions (the contract of
    `Qwen.__call__`, shared by the families built on Qwen's attention, e.g. Qwen3-MoE). `cache`
    is a `KVCache` (`k [layers, batch, max_len, ...]`, `index`) or None."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    batch, seq = input_ids.shape
    if positions is not None and positions.shape != (batch, seq):
        raise ValueError(f"positions must have shape {(batch, seq)}, got {positions.shape}")
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("segment_ids (packed sequences) are for a forward without a cache")
        if segment_ids.shape != (batch, seq):
            raise ValueError(f"segment_ids must have shape {(batch, seq)}, got {segment_ids.shape}")

    if cache is None:
        if attention_mask is not None and attention_mask.shape != (batch, seq):
            raise ValueError(
                f"attention_mask must have shape {(batch, seq)}, got {attention_mask.shape}")
        q_slots = jnp.arange(seq)
        kv_len = seq
    else:
        if isinstance(cache.k, tuple):  # the per-layer form
            if len(cache.k) != cfg.num_hidden_layers or cache.k[0].shape[0] != batch:
                raise ValueError(
                    f"cache.k holds {len(cache.k)} layers of shape {cache.k[0].shape}; expected "
                    f"{cfg.num_hidden_layers} of [batch={batch}, max_len, kv_heads, head_dim]")
            if cfg.scan_layers:
                raise ValueError("a per-layer cache (split_cache_layers) needs scan_layers=False")
            kv_len = cache.k[0].shape[1]
        else:
            if cache.k.shape[:2] != (cfg.num_hidden_layers, batch):
                raise ValueError(
                    f"cache.k has shape {cache.k.shape}; expected [layers={cfg.num_hidden_layers},"
                    f" batch={batch}, max_len, kv_heads, head_dim]")
            kv_len = cache.k.shape[2]
        if attention_mask is not None and attention_mask.shape != (batch, kv_len):
            raise ValueError(
                f"with a cache, attention_mask must be [batch, max_len] = {(batch, kv_len)}, "
                f"got {attention_mask.shape}")
        q_slots = cache.index + jnp.arange(seq)

    key_valid = (jnp.ones((batch, kv_len), bool) if attention_mask is None
                 else attention_mask.astype(bool))
    causal = jnp.arange(kv_len)[None, :] <= q_slots[:, None]                # [seq, kv_len]
    mask = causal[None, :, :] & key_valid[:, None, :]                       # [batch, seq, kv_len]
    if cache is None:
        # Without a cache the mask stays per-token vectors, so `attention_impl` need not
        # materialise [seq, seq] (the dense mask above is then unused and compiled away).
        if segment_ids is not None:
            key_valid = key_valid & (segment_ids != 0)
        mask = AttentionMask(key_valid, segment_ids)
    if positions is None and segment_ids is not None:
        positions = _segment_positions(segment_ids)

    if positions is None:
        if attention_mask is None:
            positions = jnp.broadcast_to(q_slots[None, :], (batch, seq))
        else:
            running = jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - 1
            if cache is not None:
                running = jax.lax.dynamic_slice_in_dim(running, cache.index, seq, axis=1)
            positions = jnp.maximum(running, 0)
    return DecoderInputs(mask, key_valid, positions)


class Qwen(nn.Module):
    """Qwen2/2.5/3 causal LM. See the module docstring and docs/architecture.md."""

    config: QwenConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array | None = None,
                 attention_mask: Array | None = None, return_hidden_states: bool = False,
                 cache: KVCache | None = None, segment_ids: Array | None = None):
        """Forward pass.

        Args:
          input_ids: [batch, seq] int token ids.
          positions: [batch, seq] int RoPE positions. Default: `cumsum(mask) - 1` clipped at 0
            (correct for left padding), or `arange(seq)` (+ `cache.index`) without a mask.
          attention_mask: without a cache, [batch, seq] (1/True = real token); with a cache,
            [batch, max_len] valid cache slots, including the `seq` slots written by this call.
            Attention is causal over slots and never attends to masked keys.
          return_hidden_states: return the final-normed hidden states `[batch, seq, hidden]`
            (compute dtype) instead of logits, so a loss can chunk the vocabulary projection.
          cache: a `KVCache`; this call writes the new keys/values at slots
            `[index, index + seq)` and attends from slot s to slots j <= s.
          segment_ids: [batch, seq] int (no cache): packed rows, each segment a contiguous run
            of one sequence; tokens attend only within their segment, 0 marks padding (never
            attended to). Default positions restart at 0 in every segment.

        Returns:
          logits [batch, seq, vocab] float32 (or hidden states); with a cache, the pair
          `(logits_or_hidden, new_cache)` with `new_cache.index = index + seq`.
        """
        cfg = self.config
        mask, _, positions = decoder_inputs(cfg, input_ids, positions=positions, attention_mask=attention_mask,
                                            cache=cache, segment_ids=segment_ids)
        seq = input_ids.shape[1]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        embedding, hidden = embed_tokens(cfg, input_ids)

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICY_FNS[cfg.remat],
                                 prevent_cse=not cfg.scan_layers)
        cache_index = None if cache is None else cache.index
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layer_caches = None if cache is None else (cache.k, cache.v)
            hidden, layer_caches = scanned(cfg, name="layers")(
                hidden, cos, sin, mask, layer_caches, cache_index)
        else:
            new_k, new_v = (None, None) if cache is None else (cache.k, cache.v)
            for i in range(cfg.num_hidden_layers):
                layer_cache = None if cache is None else cache_layer(cache, i)
                hidden, layer_cache = layer_cls(cfg, name=f"layers_{i}")(
                    hidden, cos, sin, mask, layer_cache, cache_index)
                if cache is not None:
                    new_k, new_v = with_cache_layer(new_k, new_v, i, layer_cache)
            layer_caches = None if cache is None else (new_k, new_v)

        hidden = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(hidden)
        out = lm_output(cfg, hidden, embedding, return_hidden_states)
        if cache is None:
            return out
        return out, KVCache(k=layer_caches[0], v=layer_caches[1], index=cache.index + seq)


class QwenPaged(nn.Module):
    """The Qwen forward over a paged cache (`PagedKVCache`), for continuous batching.

    The same network and parameters as :class:`Qwen` (apply it to the same `params`); only the
    cache differs: each row writes its tokens at its own positions into the pages of its page
    table and attends through them (`effopd_jax.models.paged`), so rows of one batch may be at
    different lengths and a finished row's slot can take a new prompt.
    """

    config: QwenConfig

    @nn.compact
    def __call__(self, input_ids: Array, index: paged.PagedPrefill | paged.PagedDecode,
                 cache: PagedKVCache, return_hidden_states: bool = False):
        """Forward pass.

        Args:
          input_ids: [batch, seq] int token ids.
          index: where the tokens go and what they read (`paged.PagedPrefill` for rows that
            start empty, `paged.PagedDecode` for rows that continue); `index.positions` are the
            RoPE positions too.
          cache: the `PagedKVCache`.
          return_hidden_states: return final-normed hidden states instead of logits.

        Returns:
          `(logits [batch, seq, vocab] float32 or hidden states [batch, seq, hidden], new_cache)`.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        batch, seq = input_ids.shape
        if index.positions.shape != (batch, seq) or index.valid.shape != (batch, seq):
            raise ValueError(f"index.positions and index.valid must be {(batch, seq)}, got "
                             f"{index.positions.shape} and {index.valid.shape}")
        if cache.k.ndim != 6 or cache.k.shape[1] != cfg.num_hidden_layers:
            raise ValueError(f"cache.k has shape {cache.k.shape}; expected [shards, layers={cfg.num_hidden_layers}, "
                             "pages_per_shard, page_size, kv_heads, head_dim]")
        mask = paged.prefill_mask(index) if isinstance(index, paged.PagedPrefill) else None
        cos, sin = rope_cos_sin(jnp.maximum(index.positions, 0), cfg.head_dim, cfg.rope_theta)

        embedding, hidden = embed_tokens(cfg, input_ids)
        if cfg.scan_layers:
            scanned = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 1, nn.broadcast),  # the cache's layer axis
                out_axes=1,
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            hidden, (new_k, new_v) = scanned(cfg, name="layers")(hidden, cos, sin, mask, (cache.k, cache.v), index)
        else:
            # Every layer gets the whole pool and writes its own `[i, ...]` part in place
            # (`index.layer`), so no layer's pages are copied out and back.
            new_k, new_v = cache.k, cache.v
            for i in range(cfg.num_hidden_layers):
                hidden, (new_k, new_v) = DecoderLayer(cfg, name=f"layers_{i}")(
                    hidden, cos, sin, mask, (new_k, new_v), index.replace(layer=i))

        hidden = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(hidden)
        out = lm_output(cfg, hidden, embedding, return_hidden_states)
        return out, PagedKVCache(k=new_k, v=new_v)


def _segment_positions(segment_ids: Array) -> Array:
    """Positions that restart at 0 at the start of every run of equal segment ids: [batch, seq]."""
    seq = segment_ids.shape[1]
    index = jnp.arange(seq)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


# ============================================================================================
# The family: registry entry, HF tensor names, layout
# ============================================================================================
def _param_info(config: QwenConfig, path: tuple[str, ...]) -> ParamInfo:
    info = global_param_info(path)
    if info is not None:
        return info
    leaf = path[-1]
    layers, stack_axes, inner = layer_rows(path, config.num_hidden_layers)
    module = "/".join(inner)
    role = {"kernel": MATRIX, "bias": BIAS, "scale": NORM}[leaf]
    group = {"self_attn": "attention", "mlp": "mlp"}.get(inner[0], "norm")
    suffix = "bias" if leaf == "bias" else "weight"
    names = tuple(f"model.layers.{layer}.{'.'.join(inner)}.{suffix}" for layer in layers)
    # The authors' filter is a substring match on the torch name (attn, attention, mlp and the
    # projection names), so besides every attention / MLP leaf it also catches
    # `post_attention_layernorm` (it contains "attention"), but not `input_layernorm`.
    extrapolate = group in ("attention", "mlp") or module == "post_attention_layernorm"
    return ParamInfo(path, role, module, group, layers, stack_axes, names,
                     transpose=leaf == "kernel", extrapolate=extrapolate)


class QwenFamily(DecoderFamily):
    """Qwen2 / Qwen2.5 / Qwen3 dense decoders (HF `model_type` `qwen2`, `qwen3`)."""

    name = "qwen"
    model_types = QWEN_MODEL_TYPES
    config_class = QwenConfig
    module_class = Qwen
    matrix_modules = QWEN_MATRIX_MODULES
    packing = True

    def param_info(self, config: QwenConfig, path: tuple[str, ...]) -> ParamInfo:
        return _param_info(config, path)

    def init_cache(self, config: QwenConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
        return init_cache(config, batch, max_len, dtype)

    def cache_logical_axes(self, config: QwenConfig) -> KVCache:
        return KV_CACHE_LOGICAL_AXES

    def init_paged_cache(self, config: QwenConfig, *, shards: int, pages_per_shard: int, page_size: int,
                         dtype: Any) -> PagedKVCache:
        return init_paged_cache(config, shards=shards, pages_per_shard=pages_per_shard,
                                page_size=page_size, dtype=dtype)

    def paged_cache_logical_axes(self, config: QwenConfig) -> PagedKVCache:
        kv = ("act_batch", "layers", None, None, "act_kv_heads", None)
        return PagedKVCache(k=kv, v=kv)

    def apply_paged(self, config: QwenConfig, params: Any, input_ids: Array, *,
                    index: paged.PagedPrefill | paged.PagedDecode, cache: PagedKVCache,
                    return_hidden_states: bool = False) -> tuple[Array, PagedKVCache]:
        return QwenPaged(config).apply({"params": params}, input_ids, index, cache,
                                       return_hidden_states=return_hidden_states)


QWEN = register_family(QwenFamily())


# Module-level forms of the family's parameter functions (callers predating the registry).
def lm_head_weight(config: QwenConfig, params: Mapping[str, Any]) -> Array:
    """The output projection `[hidden, vocab]` (param dtype): `lm_head/kernel`, or
    `embed_tokens/embedding.T` when tied; `hidden @ lm_head_weight` gives the logits."""
    return QWEN.lm_head_weight(config, params)


def param_logical_axes(config: QwenConfig) -> Any:
    """A pytree like the params of `PartitionSpec`s of logical axis names (nothing allocated)."""
    return QWEN.param_logical_axes(config)


def abstract_params(config: QwenConfig) -> Any:
    """`jax.ShapeDtypeStruct` leaves of the (unboxed) params tree, without allocating."""
    return QWEN.abstract_params(config)


def init_params(config: QwenConfig, rng: Array, shardings: Any = None) -> Any:
    """Randomly initialised params (plain arrays): kernels and embeddings ~ N(0,
    initializer_range), biases 0, norm scales 1; created directly in `shardings` (a pytree like
    `sharding.param_shardings(config, mesh)`) by a jitted init."""
    return jax.jit(lambda key: QWEN.init_params(config, key), out_shardings=shardings)(rng)

