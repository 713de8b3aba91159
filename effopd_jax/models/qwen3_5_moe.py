"""Qwen3.5-MoE hybrids (HF `model_type` `qwen3_5_moe`, `qwen3_5_moe_text`: Qwen3.5-35B-A3B,
Qwen3.5-122B-A10B) in Flax Linen.

The network is the Hugging Face `Qwen3_5MoeForCausalLM` computation (and the text path of
`Qwen3_5MoeForConditionalGeneration`): the Qwen3.5 hybrid decoder of
`effopd_jax.models.qwen3_5` (Gated DeltaNet and gated-attention layers by `layer_types`,
zero-centred norms, its cache) whose feed-forward is, in *every* layer, the sparse MoE block of
`effopd_jax.models.moe` with a shared expert:

    p = softmax(x @ W_router);  idx, w = top_k(p, k);  w = w / sum(w)    (always normalised)
    y = sum_j w_j * SwiGLU_{idx_j}(x) + sigmoid(x @ W_sg) * SwiGLU_shared(x)

`intermediate_size` is the shared expert's width (HF `shared_expert_intermediate_size`; the
family has no dense MLP), `moe_intermediate_size` each routed expert's.

Parameters: a layer's `mlp` holds `gate/kernel [H, E]` (the router), the stacked experts
`experts/{gate,up}_proj/kernel [E, H, I]`, `experts/down_proj/kernel [E, I, H]` (logical axis
`expert`), `shared_expert/{gate,up,down}_proj/kernel` and `shared_expert_gate/kernel [H, 1]`.
HF names (what transformers 5.x `save_pretrained` writes for both classes): one tensor per
expert, `{prefix}layers.{i}.mlp.experts.{e}.gate_proj.weight [I, H]`, ..., with `{prefix}` =
`model.` (text-only) or `model.language_model.` (multimodal, whose vision tower `model.visual.*`
and MTP head `mtp.*` are carried through untouched, as for Qwen3.5). The published checkpoints
store the experts fused per layer instead (`{prefix}layers.{i}.mlp.experts.gate_up_proj
[E, 2I, H]`, gate rows then up rows as transformers' experts forward chunks it, and
`...mlp.experts.down_proj [E, H, I]`): the layout describes that form too
(`ParamInfo.hf_fused`), so `load_hf` reads either and `save_hf(carry_from=source)` writes the
source's form.

Training a MoE student: `models.forward_with_aux` adds the router losses as for Qwen3-MoE
(`moe.router_aux_output`).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from effopd_jax.models import qwen3_5
from effopd_jax.models.decoder import expert_stack_info
from effopd_jax.models.family import ParamInfo, UnsupportedConfigError, read_hf_config, register_family

MULTIMODAL_MODEL_TYPE = "qwen3_5_moe"
TEXT_MODEL_TYPE = "qwen3_5_moe_text"
QWEN3_5_MOE_MODEL_TYPES = (MULTIMODAL_MODEL_TYPE, TEXT_MODEL_TYPE)
_ARCHITECTURE = {True: "Qwen3_5MoeForConditionalGeneration", False: "Qwen3_5MoeForCausalLM"}
# The text-config fields of a mixture of experts, with transformers' Qwen3_5MoeTextConfig
# defaults (what from_pretrained fills in for a missing field).
_MOE_DEFAULTS = dict(num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                     router_aux_loss_coef=0.001, output_router_logits=False)
# Reading order of the matrix modules: the mixers, the router, the experts, the shared expert.
QWEN3_5_MOE_MATRIX_MODULES = tuple(m for m in qwen3_5.QWEN3_5_MATRIX_MODULES if not m.startswith("mlp/")) + (
    "mlp/gate", "mlp/experts/gate_proj", "mlp/experts/up_proj", "mlp/experts/down_proj",
    "mlp/shared_expert_gate", "mlp/shared_expert/gate_proj", "mlp/shared_expert/up_proj",
    "mlp/shared_expert/down_proj",
)


@dataclasses.dataclass(frozen=True)
class Qwen3_5MoeConfig(qwen3_5.Qwen3_5Config):
    """A Qwen3.5-MoE hybrid: `Qwen3_5Config`'s fields (`intermediate_size` = the shared
    expert's width) plus the mixture of experts (HF names): `num_experts`,
    `num_experts_per_tok` (top-k), `moe_intermediate_size`, `router_aux_loss_coef`,
    `output_router_logits`; runtime: `moe_impl` (`moe.MOE_IMPLS`) and `router_z_loss_coef`
    (0 = off), as Qwen3-MoE's. `model_type` `qwen3_5_moe_text` (text-only layout) or
    `qwen3_5_moe` (multimodal). Top-k weights are always renormalised (HF's router)."""

    model_type: str = TEXT_MODEL_TYPE
    num_experts: int = 256
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    moe_impl: str = "auto"
    router_z_loss_coef: float = 0.0

    MULTIMODAL_TYPE: ClassVar[str] = MULTIMODAL_MODEL_TYPE
    TEXT_TYPE: ClassVar[str] = TEXT_MODEL_TYPE
    SPARSE_MOE: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"Qwen3_5MoeConfig.{name} must be a positive int, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"Qwen3_5MoeConfig.num_experts_per_tok ({self.num_experts_per_tok}) "
                             f"exceeds num_experts ({self.num_experts})")
        self._check_router_fields()

    @property
    def shared_expert_intermediate_size(self) -> int:
        """The shared expert's width (stored as `intermediate_size`)."""
        return self.intermediate_size

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides
                ) -> "Qwen3_5MoeConfig":
        """A config from a HF `config.json` (directory, file or dict), multimodal (`qwen3_5_moe`,
        text fields under `text_config`) or text-only (`qwen3_5_moe_text`); `overrides` set
        fields afterwards. Missing MoE fields take transformers' defaults (256 experts, top-8,
        width 512). The dense Qwen3.5 fields are read by `Qwen3_5Config.from_hf`, so they are
        checked and kept (`hf_extra`) the same way.

        Raises:
          UnsupportedConfigError: another model_type, a missing or zero
            `shared_expert_intermediate_size`, or what `Qwen3_5Config.from_hf` refuses.
          ValueError: a required field is missing, or the config is not a JSON object.
        """
        hf = dict(read_hf_config(path_or_dict))
        model_type = hf.get("model_type")
        if model_type not in QWEN3_5_MOE_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"config field model_type={model_type!r} is not supported by the qwen3_5_moe "
                f"family (supported: {QWEN3_5_MOE_MODEL_TYPES})")
        multimodal = model_type == MULTIMODAL_MODEL_TYPE
        text = dict(hf.get("text_config") or {}) if multimodal else hf
        where = "text_config." if multimodal else ""
        if text.get("model_type", TEXT_MODEL_TYPE) != TEXT_MODEL_TYPE:
            raise UnsupportedConfigError(f"config field {where}model_type={text['model_type']!r}: "
                                         f"expected {TEXT_MODEL_TYPE!r}")
        shared = text.pop("shared_expert_intermediate_size", 512)
        if not shared:
            raise UnsupportedConfigError(
                f"config field {where}shared_expert_intermediate_size={shared!r}: a Qwen3.5-MoE "
                "layer without a shared expert is not implemented")
        moe_fields = {name: text.pop(name, default) for name, default in _MOE_DEFAULTS.items()}
        text.pop("num_local_experts", None)
        # The rest is a dense Qwen3.5 text config whose SwiGLU width is the shared expert's.
        text.update(model_type=qwen3_5.TEXT_MODEL_TYPE, intermediate_size=shared)
        dense = (dict(hf, model_type=qwen3_5.MULTIMODAL_MODEL_TYPE, text_config=text) if multimodal
                 else text)
        fields = dict(model_type=model_type, num_experts=int(moe_fields["num_experts"]),
                      num_experts_per_tok=int(moe_fields["num_experts_per_tok"]),
                      moe_intermediate_size=int(moe_fields["moe_intermediate_size"]),
                      router_aux_loss_coef=float(moe_fields["router_aux_loss_coef"]),
                      output_router_logits=bool(moe_fields["output_router_logits"]))
        return super().from_hf(dense, **{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict of the layout `model_type` names (without `dtype`)."""
        out = super().to_hf()
        text = out["text_config"] if self.is_multimodal else out
        text.pop("intermediate_size")
        text.update(model_type=TEXT_MODEL_TYPE,
                    shared_expert_intermediate_size=self.intermediate_size,
                    num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                    moe_intermediate_size=self.moe_intermediate_size,
                    router_aux_loss_coef=self.router_aux_loss_coef,
                    output_router_logits=self.output_router_logits)
        out["architectures"] = [_ARCHITECTURE[self.is_multimodal]]
        if self.is_multimodal:
            out["model_type"] = MULTIMODAL_MODEL_TYPE
        return out


def _param_info(config: Qwen3_5MoeConfig, path: tuple[str, ...]) -> ParamInfo:
    """Qwen3.5's entry, with the MoE block's leaves: per-expert HF names for the expert stacks
    and the two gates in the `router` group."""
    info = qwen3_5._param_info(config, path)
    if info.module.startswith("mlp/experts/"):
        return expert_stack_info(info, config.num_experts, fused=True)
    if info.module in ("mlp/gate", "mlp/shared_expert_gate"):
        # The router and the shared expert's sigmoid gate mix experts: not extrapolated by EffOPD
        # by default (docs/architecture.md#mixture-of-experts).
        return dataclasses.replace(info, group="router", extrapolate=False)
    return info


class Qwen3_5MoeFamily(qwen3_5.Qwen3_5Family):
    """Qwen3.5-MoE hybrids (HF `model_type` `qwen3_5_moe`, `qwen3_5_moe_text`): Qwen3.5's
    network, cache and checkpoint layouts with the sparse MoE block in every layer (the router
    losses of `forward_with_aux` come with `DecoderFamily`)."""

    name = "qwen3_5_moe"
    model_types = QWEN3_5_MOE_MODEL_TYPES
    config_class = Qwen3_5MoeConfig
    matrix_modules = QWEN3_5_MOE_MATRIX_MODULES

    def param_info(self, config: Qwen3_5MoeConfig, path: tuple[str, ...]) -> ParamInfo:
        return _param_info(config, path)


QWEN3_5_MOE = register_family(Qwen3_5MoeFamily())
