"""Qwen3-MoE (HF `model_type` `qwen3_moe`: Qwen3-30B-A3B, Qwen3-235B-A22B) in Flax Linen.

The network is the Hugging Face `Qwen3MoeForCausalLM` computation: the Qwen3 decoder
(`effopd_jax.models.qwen`: GQA attention with per-head q/k RMSNorm and RoPE, pre-norm residual
blocks) whose feed-forward is, per layer, either the dense SwiGLU MLP or the sparse MoE block
(`effopd_jax.models.moe.SparseMoeBlock`: router softmax, top-k, optional `norm_topk_prob`, SwiGLU
experts). Layer i is sparse when

    i not in mlp_only_layers  and  num_experts > 0  and  (i + 1) % decoder_sparse_step == 0.

Parameters follow docs/architecture.md (kernels `[in, out]`); a sparse layer's `mlp` holds
`gate/kernel [H, E]` (the router) and the stacked experts `experts/{gate,up}_proj/kernel
[E, H, I]`, `experts/down_proj/kernel [E, I, H]` (HF: one tensor per expert,
`model.layers.{i}.mlp.experts.{e}.gate_proj.weight [I, H]`, ...). With `scan_layers` every leaf
gains a leading `[layers]` axis; that needs every layer of one kind (all sparse, as in every
published Qwen3-MoE, or all dense).

The decoding cache is Qwen's `KVCache`; attention, masks and positions are exactly Qwen's.
Training a MoE student: `models.forward_with_aux` returns, besides the forward's output, the
router losses (HF's load-balancing loss times `router_aux_loss_coef` when
`output_router_logits`, plus `router_z_loss_coef` times the router z-loss), computed from the
routing statistics the MoE blocks sow into the flax collection `"moe_stats"`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax.models import moe
from effopd_jax.models.decoder import (
    DecoderConfig, DecoderFamily, embed_tokens, expert_stack_info,
    global_param_info, layer_rows, lm_output,
)
from effopd_jax.models.family import (
    BIAS, MATRIX, NORM, ParamInfo, UnsupportedConfigError, read_hf_config, register_family,
)
from effopd_jax.models.layers import (
    REMAT_POLICY_FNS, RMSNorm, constrain, rope_cos_sin,
)
from effopd_jax.models.qwen import (
    KV_CACHE_LOGICAL_AXES, MLP, Attention, KVCache, _rope_theta, cache_layer, decoder_inputs, init_cache,
    with_cache_layer,
)

Array = jax.Array
DType = Any

QWEN3_MOE_MODEL_TYPES = ("qwen3_moe",)
# Reading order of the matrix modules (tables, plots): attention, the router, the experts, and
# the dense MLP of `mlp_only_layers`.
QWEN3_MOE_MATRIX_MODULES = (
    "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate",
    "mlp/experts/gate_proj", "mlp/experts/up_proj", "mlp/experts/down_proj",
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj",
)


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(DecoderConfig):
    """Architecture of a Qwen3-MoE decoder plus runtime options (HF field names).

    Architecture: the Qwen3 fields, plus `num_experts`, `num_experts_per_tok` (top-k),
    `moe_intermediate_size` (each expert's width), `norm_topk_prob`, `decoder_sparse_step`,
    `mlp_only_layers` (the layer pattern; `intermediate_size` is the dense layers' width),
    `router_aux_loss_coef` and `output_router_logits` (HF: the load-balancing loss is added,
    times the coefficient, only when `output_router_logits`).

    Runtime (not in the checkpoint): `param_dtype`, `dtype`, `scan_layers`, `remat` as Qwen's;
    `moe_impl` (`moe.MOE_IMPLS`: how the experts run); `router_z_loss_coef` (the router z-loss
    weight in `forward_with_aux`, 0 = off); `attention_impl` as Qwen's (a forward without a cache).

    Frozen and hashable (a static `jax.jit` argument). `qkv_bias`, `o_proj_bias` (=
    `attention_bias`) and `qk_norm` (always) are properties, so Qwen's attention reads it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    model_type: str = "qwen3_moe"
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
    moe_impl: str = "auto"
    router_z_loss_coef: float = 0.0
    attention_impl: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        self._check_decoder_fields((
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "moe_intermediate_size", "decoder_sparse_step",
            "num_experts_per_tok"))
        self._check_router_fields()
        if not isinstance(self.num_experts, (int, np.integer)) or self.num_experts < 0:
            raise ValueError(f"Qwen3MoeConfig.num_experts must be an int >= 0, got {self.num_experts!r}")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"Qwen3MoeConfig.num_experts_per_tok ({self.num_experts_per_tok}) "
                             f"exceeds num_experts ({self.num_experts})")
        if self.head_dim % 2:
            raise ValueError(f"Qwen3MoeConfig.head_dim must be even for RoPE, got {self.head_dim}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"Qwen3MoeConfig.mlp_only_layers has layers {bad} outside "
                             f"[0, {self.num_hidden_layers})")
        if self.model_type not in QWEN3_MOE_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"Qwen3MoeConfig.model_type {self.model_type!r} is not supported "
                f"(supported: {QWEN3_MOE_MODEL_TYPES})")
        if self.scan_layers and len(set(self.sparse_layers)) > 1:
            raise ValueError(
                "Qwen3MoeConfig.scan_layers needs every layer of one kind, but layers "
                f"{[i for i, s in enumerate(self.sparse_layers) if not s]} are dense and the others "
                "sparse (mlp_only_layers / decoder_sparse_step); use scan_layers=False")

    # Read by Qwen's attention.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return True

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Whether each layer's feed-forward is the sparse MoE block (HF's rule)."""
        return tuple(i not in self.mlp_only_layers and self.num_experts > 0
                     and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_hidden_layers))

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json <-> Qwen3MoeConfig
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "Qwen3MoeConfig":
        """A config from a HF `config.json` (directory, file or dict); `overrides` set fields
        afterwards (typically the runtime options).

        Missing MoE fields take `Qwen3MoeConfig`'s class defaults in transformers (128 experts,
        top-8, width 768, norm_topk_prob false, decoder_sparse_step 1, router_aux_loss_coef
        0.001), as `from_pretrained` would.

        Raises:
          UnsupportedConfigError: `model_type` not qwen3_moe, sliding-window attention, RoPE
            scaling, `hidden_act` not silu, attention dropout.
          ValueError: a required field is missing, or config.json is not a JSON object.
        """
        hf = read_hf_config(path_or_dict)
        model_type = hf.get("model_type")
        if model_type not in QWEN3_MOE_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"config field model_type={model_type!r} is not supported by the Qwen3-MoE family "
                f"({QWEN3_MOE_MODEL_TYPES})")
        if hf.get("use_sliding_window", False):
            raise UnsupportedConfigError(
                "config field use_sliding_window=true: sliding-window attention is not implemented")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(
                f"config field hidden_act={hf['hidden_act']!r}: only 'silu' is implemented")
        if hf.get("attention_dropout", 0.0):
            raise UnsupportedConfigError(
                f"config field attention_dropout={hf['attention_dropout']!r}: dropout is not "
                "implemented")

        def required(name: str) -> Any:
            if name not in hf:
                raise ValueError(f"config.json is missing the required field {name!r}")
            return hf[name]

        heads = int(required("num_attention_heads"))
        num_experts = hf.get("num_experts", hf.get("num_local_experts", 128))
        fields = dict(
            vocab_size=int(required("vocab_size")),
            hidden_size=int(required("hidden_size")),
            intermediate_size=int(required("intermediate_size")),
            num_hidden_layers=int(required("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(required("hidden_size")) // heads),
            num_experts=int(num_experts),
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
            moe_intermediate_size=int(hf.get("moe_intermediate_size", 768)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            output_router_logits=bool(hf.get("output_router_logits", False)),
            rope_theta=_rope_theta(hf),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
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
        """The HF `config.json` dict (without `dtype`, which `save_hf` adds)."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers),
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "output_router_logits": self.output_router_logits,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
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


# ============================================================================================
# Layers
# ============================================================================================
class DecoderLayer(nn.Module):
    """Qwen's pre-norm block with a dense MLP or the sparse MoE block; returns
    `(hidden, layer_cache)` so it can be the body of `nn.scan`."""

    config: Qwen3MoeConfig
    sparse: bool

    @nn.compact
    def __call__(self, hidden: Array, cos: Array, sin: Array, mask: Array, token_mask: Array,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        attn_out, layer_cache = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(hidden), cos, sin, mask, layer_cache, cache_index)
        hidden = constrain(hidden + attn_out, ("act_batch", "act_length", "act_embed"))
        x = norm("post_attention_layernorm")(hidden)
        if self.sparse:
            ffn = moe.SparseMoeBlock(
                cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                cfg.norm_topk_prob, cfg.dtype, cfg.param_dtype, cfg.initializer_range,
                impl=cfg.moe_impl, name="mlp")(x, token_mask)
        else:
            ffn = MLP(cfg, name="mlp")(x)
        hidden = constrain(hidden + ffn, ("act_batch", "act_length", "act_embed"))
        return hidden, layer_cache


class Qwen3Moe(nn.Module):
    """Qwen3-MoE causal LM; the call contract is `effopd_jax.models.qwen.Qwen`'s (`qwen.decoder_inputs`)."""

    config: Qwen3MoeConfig

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array | None = None,
                 attention_mask: Array | None = None, return_hidden_states: bool = False,
                 cache: KVCache | None = None, segment_ids: Array | None = None):
        """See `effopd_jax.models.forward` (and `qwen.Qwen.__call__`, whose masks, positions,
        packed segments and cache checks `qwen.decoder_inputs` builds for both)."""
        cfg = self.config
        mask, key_valid, positions = decoder_inputs(cfg, input_ids, positions=positions,
                                                    attention_mask=attention_mask, cache=cache,
                                                    segment_ids=segment_ids)
        seq = input_ids.shape[1]
        # This call's tokens that are real (they alone enter the router statistics).
        token_mask = (key_valid if cache is None
                      else jax.lax.dynamic_slice_in_dim(key_valid, cache.index, seq, axis=1))
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
                variable_axes={"params": 0, moe.STATS_COLLECTION: 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layer_caches = None if cache is None else (cache.k, cache.v)
            hidden, layer_caches = scanned(cfg, cfg.sparse_layers[0], name="layers")(
                hidden, cos, sin, mask, token_mask, layer_caches, cache_index)
        else:
            new_k, new_v = (None, None) if cache is None else (cache.k, cache.v)
            for i, sparse in enumerate(cfg.sparse_layers):
                layer_cache = None if cache is None else cache_layer(cache, i)
                hidden, layer_cache = layer_cls(cfg, sparse, name=f"layers_{i}")(
                    hidden, cos, sin, mask, token_mask, layer_cache, cache_index)
                if cache is not None:
                    new_k, new_v = with_cache_layer(new_k, new_v, i, layer_cache)
            layer_caches = None if cache is None else (new_k, new_v)

        hidden = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(hidden)
        out = lm_output(cfg, hidden, embedding, return_hidden_states)
        if cache is None:
            return out
        return out, KVCache(k=layer_caches[0], v=layer_caches[1], index=cache.index + seq)


# ============================================================================================
# Parameters and the family
# ============================================================================================
def _param_info(config: Qwen3MoeConfig, path: tuple[str, ...]) -> ParamInfo:
    info = global_param_info(path)
    if info is not None:
        return info
    leaf = path[-1]
    layers, stack_axes, inner = layer_rows(path, config.num_hidden_layers)
    module, hf_module = "/".join(inner), ".".join(inner)
    suffix = "bias" if leaf == "bias" else "weight"
    names = tuple(f"model.layers.{layer}.{hf_module}.{suffix}" for layer in layers)
    if module.startswith("mlp/experts/"):
        info = ParamInfo(path, MATRIX, module, "mlp", layers, stack_axes, names, transpose=True,
                         extrapolate=True)
        return expert_stack_info(info, config.num_experts)
    if module == "mlp/gate":
        # The router: a matrix of its own group, not extrapolated by EffOPD by default
        # (docs/architecture.md#mixture-of-experts).
        return ParamInfo(path, MATRIX, module, "router", layers, stack_axes, names,
                         transpose=True, extrapolate=False)
    role = {"kernel": MATRIX, "bias": BIAS, "scale": NORM}[leaf]
    group = {"self_attn": "attention", "mlp": "mlp"}.get(inner[0], "norm")
    # The authors' substring rule, as for dense Qwen (qwen._param_info).
    extrapolate = group in ("attention", "mlp") or module == "post_attention_layernorm"
    return ParamInfo(path, role, module, group, layers, stack_axes, names,
                     transpose=leaf == "kernel", extrapolate=extrapolate)


class Qwen3MoeFamily(DecoderFamily):
    """Qwen3-MoE decoders (HF `model_type` `qwen3_moe`); the router losses of
    `forward_with_aux` come with `DecoderFamily`."""

    name = "qwen3_moe"
    model_types = QWEN3_MOE_MODEL_TYPES
    config_class = Qwen3MoeConfig
    module_class = Qwen3Moe
    matrix_modules = QWEN3_MOE_MATRIX_MODULES
    packing = True

    def param_info(self, config: Qwen3MoeConfig, path: tuple[str, ...]) -> ParamInfo:
        return _param_info(config, path)

    def init_cache(self, config: Qwen3MoeConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
        return init_cache(config, batch, max_len, dtype)

    def cache_logical_axes(self, config: Qwen3MoeConfig) -> KVCache:
        return KV_CACHE_LOGICAL_AXES


QWEN3_MOE = register_family(Qwen3MoeFamily())
