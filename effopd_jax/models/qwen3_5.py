"""Qwen3.5 / Qwen3.6 dense hybrids (Gated DeltaNet + gated attention) in Flax Linen.

The network is the Hugging Face `Qwen3_5ForCausalLM` computation (and the text path of
`Qwen3_5ForConditionalGeneration`, whose language model is the same network):

    h_0 = embed_tokens[input_ids]
    for each layer i, by config.layer_types[i] (default: 3 x linear_attention, 1 x full_attention):
        a = GatedDeltaNet(Norm(h))        if linear_attention     (linear attention, recurrent state)
        a = GatedAttention(Norm(h))       if full_attention       (softmax attention, KV cache)
        h = h + a
        h = h + MLP(Norm(h))              # SwiGLU: down(silu(gate(x)) * up(x))
    logits = Norm(h) @ lm_head_weight      # lm_head/kernel, or embed_tokens.T when tied

Norms. Every `Norm` above and the attention's per-head q/k norms are *zero-centred*:
`y = x / rms(x) * (1 + w)`, statistics and the `(1 + w)` product in float32, cast to the compute
dtype last (`ZeroCenteredRMSNorm`; HF's `Qwen3_5RMSNorm`, weights initialised at 0). The Gated
DeltaNet's output norm is a plain scale and a SiLU gate: `y = (w * (x / rms(x))) * silu(z)`
(`GatedRMSNorm`; HF's `Qwen3_5RMSNormGated`, weights initialised at 1).

Gated attention (full_attention layers). `q_proj` produces, per head, `head_dim` query and
`head_dim` gate features (`[heads, 2 * head_dim]`, query first); q and k get the zero-centred
per-head norm, then RoPE on the first `rotary_dim = int(head_dim * partial_rotary_factor)`
features (the rest pass through), GQA softmax attention with scale `head_dim ** -0.5`, the output
times `sigmoid(gate)`, then `o_proj`. The multimodal RoPE of the published configs
(`mrope_section`) rotates frequency bands by the temporal / height / width position of a token;
for text the three positions are equal, so it is exactly this one-dimensional RoPE.

Gated DeltaNet (linear_attention layers), per value head with `d_k` key and `d_v` value features:

    [q | k | v] = silu(causal_depthwise_conv(in_proj_qkv(x)))     conv width K, kernel conv1d
    z = in_proj_z(x);  beta = sigmoid(in_proj_b(x));  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)
    q, k = l2_normalise(q), l2_normalise(k);  q = q / sqrt(d_k)    (key head of value head h: h // (Hv / Hk))
    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T     S: [d_k, d_v], float32
    o_t = S_t^T q_t
    out = out_proj(GatedRMSNorm(o, z))

The recurrence has a *recurrent form* (`gated_delta_rule_recurrent`, one token at a time: what a
decode step uses) and a *chunked form* (`gated_delta_rule_chunked`, chunks of 64 tokens solved
in parallel with a unit-triangular system, the state carried across chunks: what scoring,
training and prefill use); both give the same outputs and final state (tests check it).

Padding. Masked positions contribute nothing to a linear layer, whatever the padding layout:
each row runs on its real tokens moved to the front in order (`RealTokens`), masked positions
get `beta = g = 0` (no write, no decay) and a zero input (as HF zeroes padding), the conv state
handed on is the last `K - 1` *real* inputs, and the outputs go back to their positions. For
left padding (what the sampler builds) this is exactly HF's computation; for right or inner
padding it equals running the row without its padding (HF's zeroing would shift the conv
window there). Hook for packed sequences: see `RealTokens`.

Cache (`Qwen3_5Cache`): KV for the full-attention layers, the last `K - 1` conv inputs and the
float32 recurrent state for the linear layers, one write index. Prefill then decode equals one
uncached forward.

Checkpoints. `model_type: "qwen3_5_text"` is the text-only layout (`Qwen3_5ForCausalLM`, tensors
under `model.`); `model_type: "qwen3_5"` is the published multimodal layout
(`Qwen3_5ForConditionalGeneration`: the text config under `text_config`, language-model tensors
under `model.language_model.`, a vision tower `model.visual.*`, the multi-token-prediction head
`mtp.*`). The vision tower and MTP head are not used by this model: they are *carried*
(`carried_hf_prefixes`), i.e. left untouched on load and copied unchanged on export
(`save_hf(carry_from=...)`). Fields of config.json this family does not model are kept verbatim
(`hf_extra`) and written back by `to_hf`.

Parameter names follow docs/architecture.md (kernels `[in, out]`); layer `i` lives under
`layers_{i}/...`, or with `scan_layers=True` the layers are grouped by the period `p` of
`layer_types` (4 for the default pattern) and `layers/sub_{j}/...` holds layers `j, j + p, ...`
stacked on a leading axis.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from effopd_jax.models import moe
from effopd_jax.models.decoder import (
    DecoderConfig, DecoderFamily, embed_tokens, global_param_info, layer_rows,
    lm_output,
)
from effopd_jax.models.family import (
    BIAS, CONV, DECAY, MATRIX, NORM, ParamInfo, UnsupportedConfigError, read_hf_config, register_family,
)
from effopd_jax.models.layers import (
    REMAT_POLICY_FNS, AttentionMask, Linear, Weight, apply_rope, attention,
    constrain, rope_cos_sin,
)

Array = jax.Array
DType = Any

# The HF model types this family reads: the multimodal checkpoint and its text part.
MULTIMODAL_MODEL_TYPE = "qwen3_5"
TEXT_MODEL_TYPE = "qwen3_5_text"
QWEN3_5_MODEL_TYPES = (MULTIMODAL_MODEL_TYPE, TEXT_MODEL_TYPE)
LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)
# transformers' default when config.json gives neither layer_types nor full_attention_interval.
DEFAULT_FULL_ATTENTION_INTERVAL = 4
# Tokens per chunk of the chunked gated delta rule (HF and the FLA kernels use 64).
DELTA_RULE_CHUNK = 64
# The 2-D matrices of the decoder layers, in reading order.
QWEN3_5_MATRIX_MODULES = (
    "linear_attn/in_proj_qkv", "linear_attn/in_proj_z", "linear_attn/in_proj_b",
    "linear_attn/in_proj_a", "linear_attn/out_proj",
    "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj",
)
# HF tensor-name prefix of the language model in each checkpoint layout (multimodal or not).
_HF_PREFIX = {True: "model.language_model.", False: "model."}
# Tensors of a checkpoint that belong to it but not to this model (carried through unchanged).
_CARRIED_PREFIXES = {True: ("model.visual.", "mtp."), False: ("mtp.",)}
_ARCHITECTURE = {MULTIMODAL_MODEL_TYPE: "Qwen3_5ForConditionalGeneration",
                 TEXT_MODEL_TYPE: "Qwen3_5ForCausalLM"}
# config.json keys that describe the file rather than the model; not kept in hf_extra.
_FILE_KEYS = ("architectures", "model_type", "dtype", "torch_dtype", "transformers_version")
_MOE_FIELDS = ("num_experts", "num_local_experts", "moe_intermediate_size", "num_experts_per_tok",
               "shared_expert_intermediate_size")
# Text-config keys this family reads (everything else goes to hf_extra verbatim).
_MODELLED_TEXT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "layer_types", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "rms_norm_eps", "max_position_embeddings", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias",
    "attention_dropout", "rope_parameters", "rope_theta", "partial_rotary_factor", "rope_scaling",
    "tie_word_embeddings",
})


def default_layer_types(num_layers: int, interval: int = DEFAULT_FULL_ATTENTION_INTERVAL
                        ) -> tuple[str, ...]:
    """transformers' default pattern: every `interval`-th layer full attention, the rest linear."""
    return tuple(FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION
                 for i in range(num_layers))


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class Qwen3_5Config(DecoderConfig):
    """Architecture of a Qwen3.5 / Qwen3.6 dense hybrid decoder plus runtime options.

    Architecture fields use the Hugging Face (text config) names. `model_type` says which
    checkpoint layout the config reads and writes: `"qwen3_5_text"` (text-only,
    `Qwen3_5ForCausalLM`) or `"qwen3_5"` (multimodal, `Qwen3_5ForConditionalGeneration`, whose
    `vision_config` etc. live in `hf_extra`). `hf_extra` is canonical JSON of the config.json
    fields this family does not model (`{"config": top-level, "text_config": text part}`),
    written back unchanged by `to_hf`.

    Runtime fields (not part of the checkpoint): `param_dtype`, `dtype` (compute dtype),
    `scan_layers` (layers grouped by the period of `layer_types` under `nn.scan`), `remat`,
    `attention_impl` (the full-attention layers without a cache, as Qwen's).

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 256
    layer_types: tuple[str, ...] = ()
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    model_type: str = TEXT_MODEL_TYPE
    max_position_embeddings: int = 262_144
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hf_extra: str = ""
    # Runtime options.
    param_dtype: DType = jnp.float32
    dtype: DType = jnp.bfloat16
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "auto"

    # The two checkpoint layouts of the family (a subclass reading other model types sets them).
    MULTIMODAL_TYPE: ClassVar[str] = MULTIMODAL_MODEL_TYPE
    TEXT_TYPE: ClassVar[str] = TEXT_MODEL_TYPE
    # Whether each layer's feed-forward is the sparse mixture-of-experts block (Qwen3.5-MoE).
    SPARSE_MOE: ClassVar[bool] = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        self._check_decoder_fields((
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim",
            "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads"))
        if self.model_type not in (self.MULTIMODAL_TYPE, self.TEXT_TYPE):
            raise UnsupportedConfigError(
                f"{type(self).__name__}.model_type {self.model_type!r} is not supported "
                f"(supported: {(self.MULTIMODAL_TYPE, self.TEXT_TYPE)})")
        layer_types = tuple(self.layer_types) or default_layer_types(self.num_hidden_layers)
        set_("layer_types", layer_types)
        if len(layer_types) != self.num_hidden_layers:
            raise ValueError(f"Qwen3_5Config.layer_types has {len(layer_types)} entries for "
                             f"num_hidden_layers={self.num_hidden_layers}")
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedConfigError(
                f"config field layer_types: {unknown} not implemented (only {LAYER_TYPES})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"Qwen3_5Config.linear_num_value_heads ({self.linear_num_value_heads}) must be a "
                f"multiple of linear_num_key_heads ({self.linear_num_key_heads})")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError("Qwen3_5Config.partial_rotary_factor must be in (0, 1], got "
                             f"{self.partial_rotary_factor!r}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"Qwen3_5Config: rotary_dim = int(head_dim * partial_rotary_factor) = "
                f"{self.rotary_dim} must be even and >= 2")
        extra = json.loads(self.hf_extra) if self.hf_extra else {}
        if not isinstance(extra, dict) or set(extra) - {"config", "text_config"}:
            raise ValueError("Qwen3_5Config.hf_extra must be JSON of "
                             '{"config": {...}, "text_config": {...}}')
        set_("hf_extra", _canonical_json(extra) if extra else "")
        if self.is_multimodal and "vision_config" not in extra.get("config", {}):
            raise ValueError(
                f"{type(self).__name__}: model_type {self.model_type!r} (the multimodal checkpoint "
                f"layout) needs the checkpoint's vision_config in hf_extra; build it with "
                f"{type(self).__name__}.from_hf")

    @property
    def is_multimodal(self) -> bool:
        """Whether the config reads and writes the multimodal checkpoint layout."""
        return self.model_type == self.MULTIMODAL_TYPE

    # Derived sizes ---------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Features of each attention head that RoPE rotates (HF: int(head_dim * factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the depthwise conv: [q | k | v] features."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def layer_period(self) -> int:
        """The smallest p dividing num_hidden_layers with layer_types[i] == layer_types[i % p]."""
        n = self.num_hidden_layers
        for p in range(1, n + 1):
            if n % p == 0 and all(self.layer_types[i] == self.layer_types[i % p] for i in range(n)):
                return p
        return n

    def layers_of_type(self, layer_type: str) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == layer_type)

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json <-> Qwen3_5Config
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides
                ) -> "Qwen3_5Config":
        """Builds a config from a HF `config.json` (a model directory, the file, or its dict),
        multimodal (`qwen3_5`, text fields under `text_config`) or text-only (`qwen3_5_text`).

        `overrides` set any field afterwards (typically the runtime options).

        Raises:
          UnsupportedConfigError: naming the field: another model_type, mixture-of-experts
            fields, a layer type other than linear/full attention, `hidden_act` not silu,
            `attention_bias: true`, attention dropout, RoPE scaling (a rope_type other than
            default).
          ValueError: a required field is missing, or the config is not a JSON object.
        """
        hf = read_hf_config(path_or_dict)
        model_type = hf.get("model_type")
        if model_type == MULTIMODAL_MODEL_TYPE:
            text = hf.get("text_config")
            if not isinstance(text, Mapping):
                raise ValueError("config.json: model_type 'qwen3_5' needs a text_config object")
            text = dict(text)
            top_extra = {k: v for k, v in hf.items()
                         if k not in ("text_config", "tie_word_embeddings") + _FILE_KEYS}
            tie = bool(hf.get("tie_word_embeddings", False))  # what ConditionalGeneration ties by
            where = "text_config."
        elif model_type == TEXT_MODEL_TYPE:
            text, top_extra, where = dict(hf), None, ""
            tie = bool(text.get("tie_word_embeddings", False))
        else:
            raise UnsupportedConfigError(
                f"config field model_type={model_type!r} is not supported by the qwen3_5 family "
                f"(supported: {QWEN3_5_MODEL_TYPES})")
        if text.get("model_type", TEXT_MODEL_TYPE) != TEXT_MODEL_TYPE:
            raise UnsupportedConfigError(
                f"config field {where}model_type={text['model_type']!r}: expected "
                f"{TEXT_MODEL_TYPE!r}")
        for field in _MOE_FIELDS:
            if text.get(field):
                raise UnsupportedConfigError(
                    f"config field {where}{field}={text[field]!r}: mixture-of-experts is not "
                    "implemented")
        if text.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(
                f"config field {where}hidden_act={text['hidden_act']!r}: only 'silu' is implemented")
        if text.get("attention_bias", False):
            raise UnsupportedConfigError(
                f"config field {where}attention_bias=true: attention biases are not implemented")
        if text.get("attention_dropout", 0.0):
            raise UnsupportedConfigError(
                f"config field {where}attention_dropout={text['attention_dropout']!r}: dropout is "
                "not implemented")
        rope_theta, rotary_factor, rope_extra = _read_rope(text, where)

        def required(name: str) -> Any:
            if name not in text:
                raise ValueError(f"config.json is missing the required field {where}{name}")
            return text[name]

        num_layers = int(required("num_hidden_layers"))
        layer_types = text.get("layer_types")
        if layer_types is None:
            layer_types = default_layer_types(
                num_layers, int(text.get("full_attention_interval", DEFAULT_FULL_ATTENTION_INTERVAL)))
        text_extra = {k: v for k, v in text.items() if k not in _MODELLED_TEXT_KEYS and k not in _FILE_KEYS}
        if rope_extra:
            text_extra["rope_parameters"] = rope_extra
        extra: dict[str, Any] = {"text_config": text_extra} if text_extra else {}
        if top_extra is not None:
            extra["config"] = top_extra
        heads = int(required("num_attention_heads"))
        fields = dict(
            vocab_size=int(required("vocab_size")),
            hidden_size=int(required("hidden_size")),
            intermediate_size=int(required("intermediate_size")),
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or 256),
            layer_types=tuple(layer_types),
            linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
            linear_key_head_dim=int(text.get("linear_key_head_dim", 128)),
            linear_value_head_dim=int(text.get("linear_value_head_dim", 128)),
            linear_num_key_heads=int(text.get("linear_num_key_heads", 16)),
            linear_num_value_heads=int(text.get("linear_num_value_heads", 32)),
            partial_rotary_factor=rotary_factor,
            rope_theta=rope_theta,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=tie,
            model_type=model_type,
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            initializer_range=float(text.get("initializer_range", 0.02)),
            bos_token_id=text.get("bos_token_id"),
            eos_token_id=text.get("eos_token_id"),
            pad_token_id=text.get("pad_token_id"),
            hf_extra=_canonical_json(extra) if extra else "",
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict of the layout `model_type` names (without the `dtype` entry,
        which `save_hf` adds), the unmodelled fields of `hf_extra` included unchanged."""
        extra = json.loads(self.hf_extra) if self.hf_extra else {}
        text = dict(extra.get("text_config", {}))
        rope = dict(text.pop("rope_parameters", {}))
        rope.update(rope_type="default", rope_theta=self.rope_theta,
                    partial_rotary_factor=self.partial_rotary_factor)
        text.update({
            "model_type": TEXT_MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "layer_types": list(self.layer_types),
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        })
        if not self.is_multimodal:
            return {"architectures": [_ARCHITECTURE[TEXT_MODEL_TYPE]], **text}
        return {**extra.get("config", {}),
                "architectures": [_ARCHITECTURE[MULTIMODAL_MODEL_TYPE]],
                "model_type": MULTIMODAL_MODEL_TYPE,
                "tie_word_embeddings": self.tie_word_embeddings,
                "text_config": text}


def _read_rope(text: Mapping[str, Any], where: str) -> tuple[float, float, dict[str, Any]]:
    """(rope_theta, partial_rotary_factor, unmodelled rope_parameters keys) of a text config."""
    rope_parameters = dict(text.get("rope_parameters") or {})
    rope_type = rope_parameters.pop("rope_type", rope_parameters.pop("type", "default"))
    if rope_type != "default":
        raise UnsupportedConfigError(
            f"config field {where}rope_parameters.rope_type={rope_type!r}: only 'default' RoPE is "
            "implemented")
    rope_scaling = text.get("rope_scaling")
    if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise UnsupportedConfigError(
            f"config field {where}rope_scaling={rope_scaling!r}: RoPE scaling is not implemented")
    theta = float(rope_parameters.pop("rope_theta", text.get("rope_theta", 10_000.0)))
    factor = float(rope_parameters.pop("partial_rotary_factor",
                                       text.get("partial_rotary_factor", 0.25)))
    # What is left (mrope_section, mrope_interleaved) only matters for image / video positions.
    return theta, factor, rope_parameters


# ============================================================================================
# Cache
# ============================================================================================
class Qwen3_5Cache(NamedTuple):
    """Static-shape decoding cache of every layer.

    k, v:      [full_layers, batch, max_len, kv_heads, head_dim] keys (after RoPE) and values of
               the full-attention layers, in layer order.
    conv:      [linear_layers, batch, conv_kernel - 1, conv_dim] the last conv inputs
               (`in_proj_qkv` outputs) of the linear-attention layers, oldest first.
    recurrent: [linear_layers, batch, linear_value_heads, key_head_dim, value_head_dim] float32
               state S of the gated delta rule.
    index:     int32 scalar, the next slot to write; slots `[0, index)` are filled.
    """

    k: Array
    v: Array
    conv: Array
    recurrent: Array
    index: Array


def init_cache(config: Qwen3_5Config, batch: int, max_len: int,
               dtype: DType = jnp.bfloat16) -> Qwen3_5Cache:
    """An empty cache (zeros, index 0); the recurrent state is float32 whatever `dtype` is."""
    num_full = len(config.layers_of_type(FULL_ATTENTION))
    num_linear = len(config.layers_of_type(LINEAR_ATTENTION))
    kv = (num_full, batch, max_len, config.num_key_value_heads, config.head_dim)
    return Qwen3_5Cache(
        k=jnp.zeros(kv, dtype), v=jnp.zeros(kv, dtype),
        conv=jnp.zeros((num_linear, batch, config.linear_conv_kernel_dim - 1,
                        config.linear_conv_dim), dtype),
        recurrent=jnp.zeros((num_linear, batch, config.linear_num_value_heads,
                             config.linear_key_head_dim, config.linear_value_head_dim), jnp.float32),
        index=jnp.zeros((), jnp.int32))


# ============================================================================================
# The gated delta rule: recurrent and chunked forms
# ============================================================================================
_HIGHEST = jax.lax.Precision.HIGHEST


def gated_delta_rule_recurrent(q: Array, k: Array, v: Array, g: Array, beta: Array,
                               initial_state: Array | None = None) -> tuple[Array, Array]:
    """The gated delta rule one token at a time (the decode form).

    Per head, with `S` the `[d_k, d_v]` state:
        S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t

    Args:
      q, k: `[batch, seq, heads, d_k]` (already normalised and scaled as the layer wants).
      v: `[batch, seq, heads, d_v]`.
      g: `[batch, seq, heads]` log decay (<= 0); beta: `[batch, seq, heads]` write strength.
      initial_state: `[batch, heads, d_k, d_v]`, zeros when None.

    Returns:
      `(o [batch, seq, heads, d_v] float32, final state [batch, heads, d_k, d_v] float32)`.
    """
    batch, _, heads, d_k = q.shape
    d_v = v.shape[-1]
    state = (jnp.zeros((batch, heads, d_k, d_v), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    time_major = [jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, g, beta)]

    def step(state, xs):
        q_t, k_t, v_t, g_t, beta_t = xs
        state = state * jnp.exp(g_t)[..., None, None]
        remembered = jnp.einsum("bhkv,bhk->bhv", state, k_t, precision=_HIGHEST)
        delta = (v_t - remembered) * beta_t[..., None]
        state = state + k_t[..., :, None] * delta[..., None, :]
        return state, jnp.einsum("bhkv,bhk->bhv", state, q_t, precision=_HIGHEST)

    if q.shape[1] == 1:  # a decode step: no loop to compile
        state, out = step(state, tuple(x[0] for x in time_major))
        return out[:, None], state
    state, out = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(out, 0, 1), state


def unit_lower_triangular_inverse(a: Array) -> Array:
    """`(I + A)^{-1}` for strictly lower-triangular `A` `[..., C, C]`, by block doubling.

    With `L = I + A` split into halves, `[[L11, 0], [L21, L22]]^{-1} =
    [[L11^{-1}, 0], [-L22^{-1} L21 L11^{-1}, L22^{-1}]]`. Starting from the `1 x 1` diagonal
    blocks (all 1), each of `ceil(log2 C)` rounds joins neighbouring diagonal blocks of size `s`
    into blocks of size `2 s` with two batched matmuls, so the result is built from matmuls and
    slices only (parallel, differentiable by XLA, MXU-shaped on TPU). Every intermediate is the
    exact inverse of a diagonal block of `L`, so nothing grows beyond the entries of `T` itself.
    `C` that is not a power of two is padded with an identity block (dropped at the end).

    Why not `jax.lax.linalg.triangular_solve`: on XLA:CPU (jaxlib 0.10.2) it is the LAPACK
    custom call `lapack_strsm_ffi`, which splits its batch with `jax::ParallelBatchMap` onto
    the intra-op thread pool and blocks on a counter until those pieces finish. The backward
    pass of the chunked rule has several independent solves; when the thunk executor runs as
    many of them at once as the pool has threads (2 on a 2-core machine), every pool thread
    waits for pieces queued behind it and the program never finishes (all threads idle on a
    futex; gdb: `BlockingCounter::Wait` <- `ParallelBatchMap` <- `TriMatrixEquationSolver`).
    Reproduction: `jax.jit(jax.grad(lambda *x: (gated_delta_rule_chunked(*x)[0] ** 2).sum(),
    argnums=range(5)))` on batch 1, 128 tokens (two chunks), 8 heads of 64 features, called
    in a loop: a few calls return, then one hangs (benchmarks/qwen3_5_speed.py's
    forward+backward at 4 x 128 tokens stalled on its second call the same way).

    Args:
      a: `[..., C, C]`, zero on and above the diagonal (entries there are ignored).

    Returns:
      `[..., C, C]` unit lower-triangular `T` with `T (I + A) = I`.
    """
    size = a.shape[-1]
    batch = a.shape[:-2]
    full = 1 << max(size - 1, 0).bit_length()   # next power of two
    a = jnp.tril(a, -1)
    if full != size:
        a = jnp.pad(a, [(0, 0)] * len(batch) + [(0, full - size)] * 2)
    inverse = jnp.ones(batch + (full, 1, 1), a.dtype)    # inverses of the diagonal blocks
    block = 1
    while block < full:
        pairs = full // (2 * block)
        # L21 of every pair: rows of its second block, columns of its first one.
        tiles = a.reshape(batch + (pairs, 2, block, pairs, 2, block))[..., :, 1, :, :, 0, :]
        lower_left = jnp.moveaxis(jnp.diagonal(tiles, axis1=-4, axis2=-2), -1, -3)
        first, second = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        joined_lower = -jnp.matmul(second, jnp.matmul(lower_left, first, precision=_HIGHEST),
                                   precision=_HIGHEST)
        inverse = jnp.concatenate([
            jnp.concatenate([first, jnp.zeros_like(first)], axis=-1),
            jnp.concatenate([joined_lower, second], axis=-1)], axis=-2)
        block *= 2
    return inverse[..., 0, :size, :size]


def gated_delta_rule_chunked(q: Array, k: Array, v: Array, g: Array, beta: Array,
                             initial_state: Array | None = None,
                             chunk_size: int = DELTA_RULE_CHUNK) -> tuple[Array, Array]:
    """The gated delta rule in chunks of `chunk_size` tokens (the scoring / training form).

    Same arguments and results as :func:`gated_delta_rule_recurrent`. Within a chunk, with
    `G_t` the cumulative log decay from the chunk's start through token t, the state before the
    chunk `S_0` and `u_t = beta_t (v_t - ...)` the vectors the delta rule writes:

        S_t = e^{G_t} S_0 + sum_{j<=t} e^{G_t - G_j} k_j u_j^T
        (I + A) U = beta V - beta e^{G} K S_0,   A_tj = beta_t e^{G_t - G_j} k_t.k_j  (j < t)
        o_t = e^{G_t} S_0^T q_t + sum_{j<=t} e^{G_t - G_j} (q_t.k_j) u_j

    `U = T (beta V) - T (beta e^G K) S_0` with `T = (I + A)^{-1}` from one unit lower-triangular
    inverse per chunk (in parallel over chunks); only the `S_0 -> S_C` hand-off is sequential
    (`lax.scan` over chunks); `T` is built by `unit_lower_triangular_inverse` (matmuls, no
    LAPACK call). Every exponent is of a non-positive number (`G_t - G_j` for
    `j <= t`), so nothing overflows. Positions added to fill the last chunk have `g = beta = 0`
    and leave the state unchanged.
    """
    batch, seq, heads, d_k = q.shape
    d_v = v.shape[-1]
    size = chunk_size
    pad = (-seq) % size
    q, k, v, g, beta = (jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                        for x in (q, k, v, g, beta))
    n = (seq + pad) // size

    def chunked(x):  # [b, n*C, h, ...] -> [b, h, n, C, ...]
        x = x.reshape((batch, n, size, heads) + x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    q, k, v, g, beta = (chunked(x) for x in (q, k, v, g, beta))
    cum = jnp.cumsum(g, axis=-1)                                    # G: [b, h, n, C]
    causal = jnp.tril(jnp.ones((size, size), bool))                 # j <= t
    strict = jnp.tril(jnp.ones((size, size), bool), -1)             # j < t
    gap = cum[..., :, None] - cum[..., None, :]                     # G_t - G_j
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, gap, 0.0)), 0.0)
    einsum = lambda spec, a, b: jnp.einsum(spec, a, b, precision=_HIGHEST)  # noqa: E731
    a = jnp.where(strict, beta[..., :, None] * einsum("...td,...jd->...tj", k, k) * decay, 0.0)
    rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(cum))[..., None] * k], axis=-1)
    # T = (I + A)^{-1} by matmuls only, not `lax.linalg.triangular_solve`: see
    # `unit_lower_triangular_inverse` for the XLA:CPU deadlock that call hits.
    solved = einsum("...tj,...jd->...td", unit_lower_triangular_inverse(a), rhs)
    u_part, w = solved[..., :d_v], solved[..., d_v:]                # T beta V, T beta e^G K
    scores = einsum("...td,...jd->...tj", q, k) * decay             # causal, incl. the diagonal
    q_decayed = q * jnp.exp(cum)[..., None]
    k_to_end = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = jnp.exp(cum[..., -1])                             # [b, h, n]

    state = (jnp.zeros((batch, heads, d_k, d_v), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))

    def step(state, xs):
        u_part, w, q_decayed, k_to_end, scores, chunk_decay = xs
        u = u_part - einsum("bhtk,bhkv->bhtv", w, state)
        out = einsum("bhtk,bhkv->bhtv", q_decayed, state) + einsum("bhtj,bhjv->bhtv", scores, u)
        state = state * chunk_decay[..., None, None] + einsum("bhtk,bhtv->bhkv", k_to_end, u)
        return state, out

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u_part, w, q_decayed, k_to_end, scores, chunk_decay))
    if n == 1:  # one chunk (short sequences): no loop to compile
        state, out = step(state, tuple(x[0] for x in xs))
        out = out[None]
    else:
        state, out = jax.lax.scan(step, state, xs)                  # out: [n, b, h, C, d_v]
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, n * size, d_v)[:, :, :seq]
    return jnp.moveaxis(out, 1, 2), state


def causal_depthwise_conv(x: Array, kernel: Array, state: Array | None,
                          lengths: Array | None = None) -> tuple[Array, Array]:
    """out_t = sum_j kernel[j] * x_{t - (K-1) + j} per channel (HF's causal conv1d, no bias).

    x: `[batch, seq, channels]`; kernel: `[K, channels]`; state: `[batch, K - 1, channels]`, the
    `K - 1` inputs before `x` (zeros when None); lengths: `[batch]`, how many leading positions
    of each row are real (None: all). Returns `(out [batch, seq, channels], new state: the last
    K - 1 inputs up to each row's length)`.
    """
    width = kernel.shape[0]
    batch, seq, channels = x.shape
    if state is None:
        state = jnp.zeros((batch, width - 1, channels), x.dtype)
    window = jnp.concatenate([state.astype(x.dtype), x], axis=1)    # [b, K-1+s, c]
    out = sum(window[:, j:j + seq] * kernel[j].astype(x.dtype) for j in range(width))
    if lengths is None:
        return out, window[:, seq:]
    last = lengths[:, None] + jnp.arange(width - 1)[None, :]         # window slots of the state
    return out, jnp.take_along_axis(window, last[..., None], axis=1)


def l2_normalise(x: Array, eps: float = 1e-6) -> Array:
    """x * rsqrt(sum(x^2) + eps) over the last axis, float32 (HF / FLA's l2norm)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


# ============================================================================================
# Layers
# ============================================================================================
class ZeroCenteredRMSNorm(nn.Module):
    """x / rms(x) * (1 + centered_scale): HF's Qwen3_5RMSNorm. Statistics and the product in
    float32, the result cast to `dtype` last; `centered_scale` is HF's `weight` (init 0)."""

    eps: float
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("centered_scale",
                            nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)


class GatedRMSNorm(nn.Module):
    """(scale * (x / rms(x))) * silu(gate) over the last axis: HF's Qwen3_5RMSNormGated (norm
    before gate; the normalised x is cast to `dtype` before the scale, the gate in float32)."""

    eps: float
    dtype: DType
    param_dtype: DType

    @nn.compact
    def __call__(self, x: Array, gate: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scaled = scale.astype(self.dtype) * normed.astype(self.dtype)
        return (scaled.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(self.dtype)


def _log_uniform_init(low: float, high: float):
    """log(U(low, high)): HF's A_log initialisation (decay rates spread over [low, high])."""
    def init(key, shape, dtype):
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)
    return init


def _dense(cfg: Qwen3_5Config, features: int, axes: tuple[str, str], name: str) -> Linear:
    return Linear(features, axes, False, cfg.dtype, cfg.param_dtype, cfg.initializer_range, name=name)


class RealTokens(NamedTuple):
    """Where a call's real (unmasked) tokens are, for the linear-attention layers.

    A linear layer runs each row on its real tokens moved to the front, in order (`order`
    gathers them, `inverse` puts the outputs back), so a masked position contributes nothing
    whatever the padding layout: no conv tap reads it, the recurrent state does not change
    there, and the state handed on is that after the row's last real token.

    order, inverse: [batch, seq] int32 permutations of the positions; lengths: [batch] int32
    real tokens per row; mask: [batch, seq] bool, `arange(seq) < lengths` (in compacted order).

    Hook for packed sequences: several segments per row need the recurrent state reset at each
    segment start (no decay from, and no write into, the previous segment: the chunked form's
    decays restarted at the boundary) and conv taps masked across it; `segment_ids` would be
    gathered by `order` like the inputs and applied in `GatedDeltaNet` next to `beta` / `g`.
    """

    order: Array
    inverse: Array
    lengths: Array
    mask: Array

    @classmethod
    def of(cls, token_mask: Array) -> "RealTokens":
        order = jnp.argsort(~token_mask, axis=1, stable=True).astype(jnp.int32)
        lengths = jnp.sum(token_mask, axis=1, dtype=jnp.int32)
        mask = jnp.arange(token_mask.shape[1])[None, :] < lengths[:, None]
        return cls(order, jnp.argsort(order, axis=1).astype(jnp.int32), lengths, mask)


def _gather_rows(x: Array, index: Array) -> Array:
    """x[b, index[b, t]] for x [batch, seq, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule (HF's Qwen3_5GatedDeltaNet); see the module
    docstring. Returns `(out [batch, seq, hidden], layer_cache)`, `layer_cache = (conv state,
    recurrent state)` when a cache is given."""

    config: Qwen3_5Config

    @nn.compact
    def __call__(self, x: Array, real: RealTokens | None,
                 layer_cache: tuple[Array, Array] | None):
        cfg = self.config
        batch, seq, _ = x.shape
        key_heads, value_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        d_k, d_v = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        if real is not None:  # real tokens first; masked ones (zeroed, as HF does) after them
            x = jnp.where(real.mask[..., None], _gather_rows(x, real.order), 0)
        mixed = _dense(cfg, cfg.linear_conv_dim, ("embed", "linear_qkv"), "in_proj_qkv")(x)
        z = _dense(cfg, cfg.linear_value_dim, ("embed", "linear_value"), "in_proj_z")(x)
        b = _dense(cfg, value_heads, ("embed", "linear_heads"), "in_proj_b")(x)
        a = _dense(cfg, value_heads, ("embed", "linear_heads"), "in_proj_a")(x)
        # Flax's depthwise Conv layout [width, in / groups = 1, channels] (HF: [channels, 1, width]).
        conv_kernel = Weight("kernel", (cfg.linear_conv_kernel_dim, 1, cfg.linear_conv_dim),
                             (None, None, "linear_qkv"), cfg.initializer_range, cfg.param_dtype,
                             name="conv1d")()
        a_log = self.param("A_log", nn.with_logical_partitioning(
            _log_uniform_init(0.01, 16.0), ("linear_heads",)), (value_heads,), cfg.param_dtype)
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(
            nn.initializers.ones, ("linear_heads",)), (value_heads,), cfg.param_dtype)

        conv_state, recurrent_state = (None, None) if layer_cache is None else layer_cache
        mixed, new_conv_state = causal_depthwise_conv(
            mixed, conv_kernel[:, 0, :], conv_state, None if real is None else real.lengths)
        mixed = jax.nn.silu(mixed)
        q, k, v = jnp.split(mixed, [cfg.linear_key_dim, 2 * cfg.linear_key_dim], axis=-1)
        group = value_heads // key_heads  # value head h reads key head h // group (repeat_interleave)
        q = jnp.repeat(l2_normalise(q.reshape(batch, seq, key_heads, d_k)), group, axis=2)
        k = jnp.repeat(l2_normalise(k.reshape(batch, seq, key_heads, d_k)), group, axis=2)
        q = q * (d_k ** -0.5)
        v = v.reshape(batch, seq, value_heads, d_v)
        heads_axes = ("act_batch", "act_length", "act_linear_heads", None)
        q, k, v = (constrain(t, heads_axes) for t in (q, k, v))
        beta = jax.nn.sigmoid(b).astype(jnp.float32)
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        if real is not None:  # no write, no decay: the state passes masked positions unchanged
            beta = jnp.where(real.mask[..., None], beta, 0.0)
            g = jnp.where(real.mask[..., None], g, 0.0)

        if layer_cache is not None and seq == 1:
            out, new_state = gated_delta_rule_recurrent(q, k, v, g, beta, recurrent_state)
        else:
            out, new_state = gated_delta_rule_chunked(
                q, k, v, g, beta, recurrent_state, chunk_size=min(DELTA_RULE_CHUNK, _round_up(seq, 8)))
        out = constrain(out.astype(cfg.dtype), heads_axes)
        out = GatedRMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(
            out, z.reshape(batch, seq, value_heads, d_v))
        out = _dense(cfg, cfg.hidden_size, ("linear_value", "embed"), "out_proj")(
            out.reshape(batch, seq, cfg.linear_value_dim))
        if real is not None:
            out = _gather_rows(out, real.inverse)
        if layer_cache is None:
            return out, None
        return out, (new_conv_state.astype(conv_state.dtype), new_state)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _apply_partial_rope(x: Array, cos: Array, sin: Array, rotary_dim: int) -> Array:
    """RoPE on the first `rotary_dim` features of each head; the rest pass through."""
    if rotary_dim == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return jnp.concatenate([apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], axis=-1)


class GatedAttention(nn.Module):
    """Softmax attention with an output gate (HF's Qwen3_5Attention); see the module docstring.
    Returns `(out [batch, seq, hidden], layer_cache)`."""

    config: Qwen3_5Config

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None):
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_and_gate = _dense(cfg, heads * head_dim * 2, ("embed", "q_heads"), "q_proj")(x)
        q_and_gate = q_and_gate.reshape(batch, seq, heads, 2 * head_dim)
        q, gate = q_and_gate[..., :head_dim], q_and_gate[..., head_dim:]
        k = _dense(cfg, kv_heads * head_dim, ("embed", "kv_heads"), "k_proj")(x)
        v = _dense(cfg, kv_heads * head_dim, ("embed", "kv_heads"), "v_proj")(x)
        k = k.reshape(batch, seq, kv_heads, head_dim)
        v = v.reshape(batch, seq, kv_heads, head_dim)
        q = ZeroCenteredRMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="q_norm")(q)
        k = ZeroCenteredRMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="k_norm")(k)
        q = _apply_partial_rope(q, cos, sin, cfg.rotary_dim)
        k = _apply_partial_rope(k, cos, sin, cfg.rotary_dim)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))

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
        out = out.reshape(batch, seq, heads * head_dim) * jax.nn.sigmoid(
            gate.reshape(batch, seq, heads * head_dim))
        return _dense(cfg, cfg.hidden_size, ("q_heads", "embed"), "o_proj")(out), new_cache


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    config: Qwen3_5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)


class DecoderLayer(nn.Module):
    """One pre-norm block whose token mixer is `layer_type`'s; returns `(hidden, layer_cache)`."""

    config: Qwen3_5Config
    layer_type: str

    @nn.compact
    def __call__(self, hidden: Array, cos: Array, sin: Array, mask: Array,
                 real: RealTokens | None, layer_cache: Any, cache_index: Array | None):
        cfg = self.config
        norm = lambda name: ZeroCenteredRMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype,  # noqa: E731
                                                name=name)
        mixer_in = norm("input_layernorm")(hidden)
        if self.layer_type == LINEAR_ATTENTION:
            out, layer_cache = GatedDeltaNet(cfg, name="linear_attn")(mixer_in, real, layer_cache)
        else:
            out, layer_cache = GatedAttention(cfg, name="self_attn")(
                mixer_in, cos, sin, mask, layer_cache, cache_index)
        hidden = constrain(hidden + out, ("act_batch", "act_length", "act_embed"))
        ffn_in = norm("post_attention_layernorm")(hidden)
        if cfg.SPARSE_MOE:  # Qwen3.5-MoE: routed experts plus the gated shared expert
            token_mask = None if real is None else _gather_rows(real.mask, real.inverse)
            ffn_out = moe.SparseMoeBlock(
                cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, True,
                cfg.dtype, cfg.param_dtype, cfg.initializer_range,
                shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                impl=cfg.moe_impl, name="mlp")(ffn_in, token_mask)
        else:
            ffn_out = MLP(cfg, name="mlp")(ffn_in)
        return constrain(hidden + ffn_out, ("act_batch", "act_length", "act_embed")), layer_cache


def _layer_class(cfg: Qwen3_5Config):
    if cfg.remat == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=REMAT_POLICY_FNS[cfg.remat], prevent_cse=not cfg.scan_layers)


class LayerBlock(nn.Module):
    """One period of `layer_types` (the body of the scan over layers): sublayers `sub_{j}`.

    block_cache: `(k, v, conv, recurrent)` with the period's full / linear layers on the leading
    axis (or None)."""

    config: Qwen3_5Config

    @nn.compact
    def __call__(self, hidden, cos, sin, mask, real, block_cache, cache_index):
        cfg = self.config
        layer_cls = _layer_class(cfg)
        new = {FULL_ATTENTION: [], LINEAR_ATTENTION: []}
        for j, layer_type in enumerate(cfg.layer_types[:cfg.layer_period]):
            layer_cache = None
            if block_cache is not None:
                r = len(new[layer_type])
                k, v, conv, recurrent = block_cache
                layer_cache = (k[r], v[r]) if layer_type == FULL_ATTENTION else (conv[r], recurrent[r])
            hidden, layer_cache = layer_cls(cfg, layer_type, name=f"sub_{j}")(
                hidden, cos, sin, mask, real, layer_cache, cache_index)
            new[layer_type].append(layer_cache)
        if block_cache is None:
            return hidden, None
        return hidden, _stack_layer_caches(block_cache, new)


def _stack_layer_caches(like: tuple, new: dict[str, list]) -> tuple:
    """(k, v, conv, recurrent) from per-layer caches (each type's in layer order); a type with
    no layer keeps `like`'s (empty) arrays."""
    k, v, conv, recurrent = like
    if new[FULL_ATTENTION]:
        k = jnp.stack([c[0] for c in new[FULL_ATTENTION]])
        v = jnp.stack([c[1] for c in new[FULL_ATTENTION]])
    if new[LINEAR_ATTENTION]:
        conv = jnp.stack([c[0] for c in new[LINEAR_ATTENTION]])
        recurrent = jnp.stack([c[1] for c in new[LINEAR_ATTENTION]])
    return k, v, conv, recurrent


class Qwen3_5(nn.Module):
    """Qwen3.5 / Qwen3.6 causal LM (text). See the module docstring and docs/architecture.md."""

    config: Qwen3_5Config

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array | None = None,
                 attention_mask: Array | None = None, return_hidden_states: bool = False,
                 cache: Qwen3_5Cache | None = None):
        """Forward pass; the contract of `effopd_jax.models.forward`.

        Args:
          input_ids: [batch, seq] int token ids.
          positions: [batch, seq] int RoPE positions. Default: `cumsum(mask) - 1` clipped at 0,
            or `arange(seq)` (+ `cache.index`) without a mask.
          attention_mask: without a cache [batch, seq] (1/True = real token); with a cache
            [batch, max_len], the valid slots including this call's. Attention layers never
            attend to masked keys; linear layers skip masked positions (see the module doc).
          return_hidden_states: return the final-normed hidden states instead of logits.
          cache: a `Qwen3_5Cache`; this call appends its `seq` tokens at slot `cache.index`.

        Returns:
          logits [batch, seq, vocab] float32 (or hidden states); with a cache, the pair
          `(logits_or_hidden, new_cache)`.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        batch, seq = input_ids.shape
        if positions is not None and positions.shape != (batch, seq):
            raise ValueError(f"positions must have shape {(batch, seq)}, got {positions.shape}")
        if cache is None:
            if attention_mask is not None and attention_mask.shape != (batch, seq):
                raise ValueError(
                    f"attention_mask must have shape {(batch, seq)}, got {attention_mask.shape}")
            q_slots = jnp.arange(seq)
            kv_len = seq
        else:
            kv_len = cache.k.shape[2]
            expected = jax.eval_shape(lambda: init_cache(cfg, batch, kv_len))
            for name in ("k", "conv", "recurrent"):
                if getattr(cache, name).shape != getattr(expected, name).shape:
                    raise ValueError(
                        f"cache.{name} has shape {getattr(cache, name).shape}; this config and "
                        f"batch {batch} need {getattr(expected, name).shape} (models.init_cache)")
            if attention_mask is not None and attention_mask.shape != (batch, kv_len):
                raise ValueError(
                    f"with a cache, attention_mask must be [batch, max_len] = {(batch, kv_len)}, "
                    f"got {attention_mask.shape}")
            q_slots = cache.index + jnp.arange(seq)

        key_valid = (jnp.ones((batch, kv_len), bool) if attention_mask is None
                     else attention_mask.astype(bool))
        causal = jnp.arange(kv_len)[None, :] <= q_slots[:, None]
        mask = causal[None, :, :] & key_valid[:, None, :]               # [batch, seq, kv_len]
        if cache is None:
            # Per-token vectors, so `attention_impl` need not materialise [seq, seq].
            mask = AttentionMask(key_valid)
        real = None
        if attention_mask is not None:
            real = RealTokens.of(key_valid if cache is None else
                                 jax.lax.dynamic_slice_in_dim(key_valid, cache.index, seq, axis=1))
        if positions is None:
            if attention_mask is None:
                positions = jnp.broadcast_to(q_slots[None, :], (batch, seq))
            else:
                running = jnp.cumsum(key_valid.astype(jnp.int32), axis=1) - 1
                if cache is not None:
                    running = jax.lax.dynamic_slice_in_dim(running, cache.index, seq, axis=1)
                positions = jnp.maximum(running, 0)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta)

        embedding, hidden = embed_tokens(cfg, input_ids)
        cache_index = None if cache is None else cache.index
        caches = None if cache is None else (cache.k, cache.v, cache.conv, cache.recurrent)

        if cfg.scan_layers:
            period = cfg.layer_period
            blocks = cfg.num_hidden_layers // period
            if caches is not None:  # [layers of a type, ...] -> [blocks, per block, ...]
                caches = tuple(x.reshape((blocks, x.shape[0] // blocks) + x.shape[1:]) for x in caches)
            scanned = nn.scan(
                LayerBlock,
                variable_axes={"params": 0, moe.STATS_COLLECTION: 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=blocks,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            hidden, caches = scanned(cfg, name="layers")(
                hidden, cos, sin, mask, real, caches, cache_index)
            if caches is not None:
                caches = tuple(x.reshape((-1,) + x.shape[2:]) for x in caches)
        else:
            layer_cls = _layer_class(cfg)
            new = {FULL_ATTENTION: [], LINEAR_ATTENTION: []}
            for i, layer_type in enumerate(cfg.layer_types):
                layer_cache = None
                if caches is not None:
                    r = len(new[layer_type])
                    layer_cache = ((caches[0][r], caches[1][r]) if layer_type == FULL_ATTENTION
                                   else (caches[2][r], caches[3][r]))
                hidden, layer_cache = layer_cls(cfg, layer_type, name=f"layers_{i}")(
                    hidden, cos, sin, mask, real, layer_cache, cache_index)
                new[layer_type].append(layer_cache)
            if caches is not None:
                caches = _stack_layer_caches(caches, new)

        hidden = ZeroCenteredRMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(hidden)
        out = lm_output(cfg, hidden, embedding, return_hidden_states)
        if cache is None:
            return out
        k, v, conv, recurrent = caches
        return out, Qwen3_5Cache(k=k, v=v, conv=conv, recurrent=recurrent, index=cache.index + seq)


# ============================================================================================
# The family: registry entry, HF tensor names, layout
# ============================================================================================
# HF tensor suffix of each leaf name.
_HF_LEAF_SUFFIX = {"kernel": "weight", "scale": "weight", "centered_scale": "weight",
                   "A_log": "A_log", "dt_bias": "dt_bias"}


def _param_info(config: Qwen3_5Config, path: tuple[str, ...]) -> ParamInfo:
    prefix = _HF_PREFIX[config.is_multimodal]
    info = global_param_info(path, prefix)
    if info is not None:
        return info
    leaf = path[-1]
    # Scanned: layers/sub_{j}/... holds layers j, j + period, ...
    layers, stack_axes, inner = layer_rows(path, config.num_hidden_layers, config.layer_period)
    module = "/".join(inner + ((leaf,) if leaf in ("A_log", "dt_bias") else ()))
    hf_module = ".".join(inner)
    names = tuple(f"{prefix}layers.{i}.{hf_module}.{_HF_LEAF_SUFFIX[leaf]}" for i in layers)
    group = {"self_attn": "attention", "linear_attn": "linear_attention", "mlp": "mlp"}.get(
        inner[0], "norm")
    if leaf == "kernel":
        role = CONV if module == "linear_attn/conv1d" else MATRIX
    elif leaf in ("scale", "centered_scale"):
        role = NORM
    elif leaf == "A_log":
        role = DECAY
    elif leaf == "dt_bias":
        role = BIAS
    else:
        raise ValueError(f"no layout entry for the Qwen3.5 parameter {'/'.join(path)}")
    # EffOPD default: the authors' substring filter on the HF names (attention / linear attention
    # / MLP weights and their norms, post_attention_layernorm) except the decay parameters A_log
    # and dt_bias -- docs/effopd_rule.md#qwen35-hybrids.
    extrapolate = (group in ("attention", "linear_attention", "mlp")
                   or module == "post_attention_layernorm") and leaf not in ("A_log", "dt_bias")
    return ParamInfo(path, role, module, group, layers, stack_axes, names,
                     transpose=leaf == "kernel", extrapolate=extrapolate)


class Qwen3_5Family(DecoderFamily):
    """Qwen3.5 / Qwen3.6 dense hybrids (HF `model_type` `qwen3_5`, `qwen3_5_text`)."""

    name = "qwen3_5"
    model_types = QWEN3_5_MODEL_TYPES
    config_class = Qwen3_5Config
    module_class = Qwen3_5
    matrix_modules = QWEN3_5_MATRIX_MODULES

    def param_info(self, config: Qwen3_5Config, path: tuple[str, ...]) -> ParamInfo:
        return _param_info(config, path)

    def init_cache(self, config: Qwen3_5Config, batch: int, max_len: int, dtype: Any) -> Qwen3_5Cache:
        return init_cache(config, batch, max_len, dtype)

    def cache_logical_axes(self, config: Qwen3_5Config) -> Qwen3_5Cache:
        kv = ("layers", "act_batch", "act_length", "act_kv_heads", None)
        return Qwen3_5Cache(k=kv, v=kv, conv=("layers", "act_batch", None, None),
                            recurrent=("layers", "act_batch", "act_linear_heads", None, None),
                            index=())

    def carried_hf_prefixes(self, config: Qwen3_5Config) -> tuple[str, ...]:
        # The vision tower and the multi-token-prediction head: part of the published
        # checkpoints, not of this (text, next-token) model.
        return _CARRIED_PREFIXES[config.is_multimodal]


QWEN3_5 = register_family(Qwen3_5Family())
