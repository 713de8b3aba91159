"""What every decoder family shares: config plumbing, the family boilerplate, global layout entries.

A family file (`qwen.py`, `qwen3_moe.py`, `qwen3_5.py`, `qwen3_5_moe.py`) keeps only what is its
own: its config fields and HF conversion, its Linen modules, its cache and the layout entries of
its decoder layers. The rest is here:

* :class:`DecoderConfig`, a mixin of the frozen config dataclasses: `to_dict` / `from_dict`
  (the plain-JSON form orbax checkpoints store) and :func:`canonical_dtype`;
* :class:`DecoderFamily`, a :class:`~effopd_jax.models.family.ModelFamily` whose params come from
  one Linen module `module_class(config)` called as `module(input_ids, ...)`: config parsing,
  `apply`, `init_params`, `abstract_params`, `param_logical_axes`, `lm_head_weight`, the router
  losses of a mixture of experts (`apply_with_aux`) and `layout` from a per-leaf `param_info`;
* the layout entries every decoder has (:func:`global_param_info`: the embedding, the final norm,
  the LM head) and the decoder-layer rows of a leaf (:func:`layer_rows`).

The params tree convention (docs/architecture.md): `embed_tokens/embedding [vocab, hidden]`,
`norm/...`, `lm_head/kernel [hidden, vocab]` (absent when tied), and the decoder layers under
`layers_{i}/...`, or with `scan_layers` under `layers/...` (one stack) or `layers/sub_{j}/...`
(layers grouped by a period, Qwen3.5).
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax.models import moe
from effopd_jax.models.family import (
    EMBEDDING, LM_HEAD, NORM, AuxOutput, FusedHF, ModelFamily, ModelLayout, ParamInfo,
)
from effopd_jax.models.layers import ATTENTION_IMPLS, REMAT_POLICIES, Weight, constrain

Array = jax.Array


def canonical_dtype(value: Any, owner: str, field: str) -> jnp.dtype:
    """`value` as a floating `jnp.dtype`; ValueError naming `owner.field` otherwise."""
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"{owner}.{field}: {value!r} is not a dtype") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{owner}.{field} must be a floating dtype, got {dtype}")
    return dtype


class DecoderConfig:
    """Mixin of the family config dataclasses: their plain-JSON form and the checks every
    decoder config shares (called from the dataclass's `__post_init__`)."""

    def _check_decoder_fields(self, positive: tuple[str, ...]) -> None:
        """Canonicalises `param_dtype` / `dtype` and `eos_token_id` (a list becomes a tuple) and
        checks the fields every decoder has: `positive` ints > 0, query heads a multiple of the
        KV heads, `remat` and `attention_impl` known; ValueError naming the field otherwise."""
        owner = type(self).__name__
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("param_dtype", canonical_dtype(self.param_dtype, owner, "param_dtype"))
        set_("dtype", canonical_dtype(self.dtype, owner, "dtype"))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{owner}.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"{owner}.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"{owner}.attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")

    def _check_router_fields(self) -> None:
        """A mixture of experts' runtime fields: `moe_impl` known, `router_aux_loss_coef` and
        `router_z_loss_coef` finite and >= 0."""
        owner = type(self).__name__
        if self.moe_impl not in moe.MOE_IMPLS:
            raise ValueError(f"{owner}.moe_impl must be one of {moe.MOE_IMPLS}, got {self.moe_impl!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or not np.isfinite(value):
                raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-serialisable values (dtypes by name, tuples as lists)."""
        out = dataclasses.asdict(self)
        for name, value in out.items():
            if name in ("param_dtype", "dtype"):
                out[name] = jnp.dtype(value).name
            elif isinstance(value, tuple):
                out[name] = list(value)
        return out

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], **overrides):
        """Inverse of `to_dict`; unknown keys raise a ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}")
        return cls(**{**fields, **overrides})


# ============================================================================================
# The ends of the network (called inside a family module's `nn.compact` method, so the
# parameters they declare belong to that module)
# ============================================================================================
def embed_tokens(cfg: Any, input_ids: Array) -> tuple[Array, Array]:
    """Declares `embed_tokens/embedding [vocab, hidden]`; returns it and the embedded tokens
    `[batch, seq, hidden]` in the compute dtype."""
    embedding = Weight("embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                       cfg.initializer_range, cfg.param_dtype, name="embed_tokens")()
    hidden = jnp.take(embedding, input_ids, axis=0).astype(cfg.dtype)
    return embedding, constrain(hidden, ("act_batch", "act_length", "act_embed"))


def lm_output(cfg: Any, hidden: Array, embedding: Array, return_hidden_states: bool) -> Array:
    """The final-normed hidden states `[batch, seq, hidden]` -> logits `[batch, seq, vocab]`
    float32 through `lm_head/kernel` (declared here, even when only the hidden states are
    returned, so `init` builds the whole tree) or the tied embedding; or the hidden states
    themselves with `return_hidden_states`."""
    hidden = constrain(hidden, ("act_batch", "act_length", "act_embed"))
    head = (embedding.T if cfg.tie_word_embeddings else
            Weight("kernel", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                   cfg.initializer_range, cfg.param_dtype, name="lm_head")())
    if return_hidden_states:
        return hidden
    logits = jnp.einsum("bsh,hv->bsv", hidden, head.astype(cfg.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))


# ============================================================================================
# Layout entries
# ============================================================================================
def global_param_info(path: tuple[str, ...], prefix: str = "model.") -> ParamInfo | None:
    """The entry of a leaf outside the decoder layers (embedding, final norm, LM head; none of
    them extrapolated by EffOPD), or None for a decoder-layer leaf. `prefix` is the HF name
    prefix of the language model (`model.`, or `model.language_model.` in a multimodal
    checkpoint); the head is `lm_head.weight` in both."""
    head = path[0]
    if head == "embed_tokens":
        return ParamInfo(path, EMBEDDING, "embed_tokens", "embedding", (), (),
                         (f"{prefix}embed_tokens.weight",), False, extrapolate=False)
    if head == "lm_head":
        return ParamInfo(path, LM_HEAD, "lm_head", "head", (), (), ("lm_head.weight",), True,
                         extrapolate=False)
    if head == "norm":
        return ParamInfo(path, NORM, "norm", "norm", (), (), (f"{prefix}norm.weight",), False,
                         extrapolate=False)
    return None


def layer_rows(path: tuple[str, ...], num_layers: int, period: int = 0
               ) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """`(layers, stack_axes, module path)` of a decoder-layer leaf: `layers_{i}/<module>/<leaf>`
    (one layer, no stack), `layers/<module>/<leaf>` (all layers stacked), or with `period` > 0
    `layers/sub_{j}/<module>/<leaf>` (layers j, j + period, ... stacked).

    Raises:
      ValueError: the path is not a decoder-layer leaf.
    """
    head = path[0]
    if head == "layers" and period:
        j = int(path[1].removeprefix("sub_"))
        return tuple(range(j, num_layers, period)), ("layers",), path[2:-1]
    if head == "layers":
        return tuple(range(num_layers)), ("layers",), path[1:-1]
    if head.startswith("layers_"):
        return (int(head.removeprefix("layers_")),), (), path[1:-1]
    raise ValueError(f"no layout entry for the parameter {'/'.join(path)}")


def expert_stack_info(info: ParamInfo, num_experts: int, fused: bool = False) -> ParamInfo:
    """A layer's `mlp/experts/<proj>` entry as the stack of `num_experts` HF tensors, one per
    expert (`...mlp.experts.{e}.<proj>.weight`, the `experts` axis after any `layers` one).

    With `fused`, checkpoints may instead hold one tensor per layer for all experts
    (`ParamInfo.hf_fused`): `...mlp.experts.gate_up_proj [E, 2I, H]` (gate rows, then up rows,
    as transformers' experts forward chunks it) and `...mlp.experts.down_proj [E, H, I]`."""
    proj = info.path[-2]
    prefix = info.hf_names[0][:info.hf_names[0].index(f"layers.{info.layers[0]}.")]
    names = tuple(f"{prefix}layers.{layer}.mlp.experts.{e}.{proj}.weight"
                  for layer in info.layers for e in range(num_experts))
    hf_fused = None
    if fused:
        fused_proj, part, parts = {"gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2),
                                   "down_proj": ("down_proj", 0, 1)}[proj]
        hf_fused = FusedHF(tuple(f"{prefix}layers.{layer}.mlp.experts.{fused_proj}" for layer in info.layers),
                           part, parts)
    return dataclasses.replace(info, stack_axes=info.stack_axes + ("experts",), hf_names=names,
                               experts=num_experts, hf_fused=hf_fused)


# ============================================================================================
# The family
# ============================================================================================
class DecoderFamily(ModelFamily):
    """A decoder family whose params are those of `module_class(config)`.

    Subclasses set `name`, `model_types`, `config_class`, `module_class`, `matrix_modules`
    (the layout's reading order) and `packing` (whether the module takes `segment_ids`), and
    implement `param_info`, the cache methods, and whatever else is their own.
    """

    config_class: ClassVar[type]
    module_class: ClassVar[type[nn.Module]]
    matrix_modules: ClassVar[tuple[str, ...]] = ()
    packing: ClassVar[bool] = False

    # -- configs -------------------------------------------------------------------------------
    def config_from_hf(self, hf: Mapping[str, Any], **runtime: Any) -> Any:
        return self.config_class.from_hf(hf, **runtime)

    def config_from_dict(self, fields: Mapping[str, Any], **overrides: Any) -> Any:
        return self.config_class.from_dict(fields, **overrides)

    # -- the network ---------------------------------------------------------------------------
    def apply(self, config: Any, params: Any, input_ids: Array, **kwargs: Any) -> Any:
        """`module_class(config)` on the params; keyword arguments as `models.forward`'s
        (`segment_ids` only for a family with `packing`)."""
        return self.module_class(config).apply({"params": params}, input_ids, **kwargs)

    @property
    def supports_packing(self) -> bool:
        return self.packing

    def apply_with_aux(self, config: Any, params: Any, input_ids: Array, *,
                       positions: Array | None = None, attention_mask: Array | None = None,
                       return_hidden_states: bool = False) -> tuple[Any, AuxOutput]:
        """The forward with the MoE blocks' router statistics collected (`moe_stats`) and turned
        into the router losses (`moe.router_aux_output`); a config without `num_experts` (a
        dense family) gets the default zero loss."""
        if not hasattr(config, "num_experts"):
            return super().apply_with_aux(config, params, input_ids, positions=positions,
                                          attention_mask=attention_mask,
                                          return_hidden_states=return_hidden_states)
        out, variables = self.module_class(config).apply(
            {"params": params}, input_ids, positions=positions, attention_mask=attention_mask,
            return_hidden_states=return_hidden_states, mutable=[moe.STATS_COLLECTION])
        stats = moe.collect_router_stats(variables.get(moe.STATS_COLLECTION, {}))
        return out, moe.router_aux_output(config, stats)

    # -- parameters ----------------------------------------------------------------------------
    def init_variables(self, config: Any, rng: Array) -> dict[str, Any]:
        """The module's boxed variables (logical axes attached), from a `[1, 1]` dummy input."""
        return self.module_class(config).init(rng, jnp.zeros((1, 1), jnp.int32))

    def init_params(self, config: Any, rng: Array) -> Any:
        return nn.unbox(self.init_variables(config, rng))["params"]

    def abstract_params(self, config: Any) -> Any:
        """`jax.ShapeDtypeStruct` leaves of the (unboxed) params tree, without allocating."""
        abstract = jax.eval_shape(lambda key: self.init_variables(config, key), jax.random.key(0))
        return nn.unbox(abstract)["params"]

    def param_logical_axes(self, config: Any) -> Any:
        abstract = jax.eval_shape(lambda key: self.init_variables(config, key), jax.random.key(0))
        return nn.get_partition_spec(abstract)["params"]

    def lm_head_weight(self, config: Any, params: Mapping[str, Any]) -> Array:
        """`lm_head/kernel [hidden, vocab]`, or `embed_tokens/embedding.T` when tied."""
        if config.tie_word_embeddings:
            return params["embed_tokens"]["embedding"].T
        return params["lm_head"]["kernel"]

    @abc.abstractmethod
    def param_info(self, config: Any, path: tuple[str, ...]) -> ParamInfo:
        """The layout entry of the leaf at `path` (key names)."""

    def layout(self, config: Any) -> ModelLayout:
        flat, _ = jax.tree_util.tree_flatten_with_path(self.abstract_params(config))
        return ModelLayout(tuple(self.param_info(config, tuple(k.key for k in key_path))
                                 for key_path, _ in flat), module_order=self.matrix_modules)
