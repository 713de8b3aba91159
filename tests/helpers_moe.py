"""Tiny random Hugging Face mixture-of-experts checkpoints for tests (transformers is the reference).

    path = make_tiny_moe_checkpoint(tmp_path, "mixed")            # a saved Qwen3MoeForCausalLM
    path = make_tiny_qwen3_5_moe_checkpoint(tmp_path, multimodal=True)   # Qwen3.5-MoE
    config, params = models.load_hf(path, compute_dtype="float32")

Weights are redrawn by `helpers_hf.randomize_` (transformers' N(0, 0.02) init makes every logit
~0 and a parity test vacuous); the router is drawn like every weight, N(0, 1/fan_in), so its
logits are O(1) and the top-k is decided by real margins.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from helpers_hf import randomize_

__all__ = ["MOE_SIZES", "MOE_VARIANTS", "QWEN3_5_MOE_TEXT", "QWEN3_5_MOE_VISION", "make_tiny_moe_checkpoint",
           "make_tiny_moe_hf_config", "make_tiny_qwen3_5_moe_checkpoint", "randomize_"]

MOE_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=32, max_position_embeddings=256, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6)

# name -> overrides: a dense/sparse mix, a sparse-step pattern with tied embeddings and
# normalised top-k, and an all-sparse model (scannable) with attention biases.
MOE_VARIANTS: dict[str, dict[str, Any]] = {
    "mixed": dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False),
    "step2_tied": dict(num_hidden_layers=2, decoder_sparse_step=2, norm_topk_prob=True,
                       tie_word_embeddings=True),
    "sparse_bias": dict(num_hidden_layers=2, norm_topk_prob=True, attention_bias=True),
}

# Qwen3.5-MoE: 8 experts, top-2, a shared expert; 3 linear-attention layers and 1 full.
QWEN3_5_MOE_TEXT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4,
                        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                        linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=16, shared_expert_intermediate_size=24)
QWEN3_5_MOE_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                          patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                          num_position_embeddings=16)
# Stand-ins for a published checkpoint's multi-token-prediction head (carried, never used).
QWEN3_5_MOE_MTP = {"mtp.fc.weight": (32, 64), "mtp.norm.weight": (32,)}


def make_tiny_moe_hf_config(variant: str = "mixed", **overrides: Any) -> transformers.Qwen3MoeConfig:
    """The `Qwen3MoeConfig` of a test variant (8 experts, top-2, hidden 64)."""
    fields = dict(MOE_SIZES, **MOE_VARIANTS[variant])
    fields.update(overrides)
    return transformers.Qwen3MoeConfig(**fields)


def make_tiny_moe_checkpoint(tmp_path: str | os.PathLike, variant: str = "mixed", seed: int = 0,
                             **overrides: Any) -> Path:
    """A random tiny `Qwen3MoeForCausalLM` saved with `save_pretrained` under
    `tmp_path/qwen3_moe_<variant>_s<seed>`; returns the directory."""
    config = make_tiny_moe_hf_config(variant, **overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).to(torch.float32)
    randomize_(model, seed)
    path = Path(tmp_path) / f"qwen3_moe_{variant}_s{seed}"
    model.save_pretrained(path)
    return path


def make_tiny_qwen3_5_moe_checkpoint(tmp_path: str | os.PathLike, multimodal: bool = False,
                                     seed: int = 0, **overrides: Any) -> Path:
    """A random tiny Qwen3.5-MoE saved with `save_pretrained` under
    `tmp_path/qwen3_5_moe_{text,multimodal}_s<seed>`: `Qwen3_5MoeForCausalLM`, or with
    `multimodal` a `Qwen3_5MoeForConditionalGeneration` (vision tower) plus `mtp.*` tensors
    added to its file, as the published checkpoints have. Returns the directory."""
    text = dict(QWEN3_5_MOE_TEXT, **overrides)
    torch.manual_seed(seed)
    if multimodal:
        config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=QWEN3_5_MOE_VISION)
        model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    else:
        model = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**text))
    model = model.to(torch.float32)
    randomize_(model, seed)
    path = Path(tmp_path) / f"qwen3_5_moe_{'multimodal' if multimodal else 'text'}_s{seed}"
    model.save_pretrained(path)
    if multimodal:
        from safetensors.numpy import load_file, save_file  # noqa: PLC0415

        file = path / "model.safetensors"
        rng = np.random.RandomState(seed)
        mtp = {name: rng.randn(*shape).astype(np.float32) for name, shape in QWEN3_5_MOE_MTP.items()}
        save_file({**load_file(file), **mtp}, file, metadata={"format": "pt"})
    return path
