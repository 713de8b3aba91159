"""Tiny random Hugging Face Qwen3-MoE checkpoints for tests (transformers is the reference).

    path = make_tiny_moe_checkpoint(tmp_path, "mixed")     # a saved Qwen3MoeForCausalLM
    config, params = models.load_hf(path, compute_dtype="float32")

Weights are redrawn after construction (transformers' N(0, 0.02) init makes every logit ~0 and a
parity test vacuous): embeddings ~ N(0, 0.3^2), every weight ~ N(0, 1/fan_in) (the router too,
so its logits are O(1) and the top-k is decided by real margins), biases ~ N(0, 0.3^2), RMSNorm
weights ~ 1 + N(0, 0.2^2).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

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


def make_tiny_moe_hf_config(variant: str = "mixed", **overrides: Any) -> transformers.Qwen3MoeConfig:
    """The `Qwen3MoeConfig` of a test variant (8 experts, top-2, hidden 64)."""
    fields = dict(MOE_SIZES, **MOE_VARIANTS[variant])
    fields.update(overrides)
    return transformers.Qwen3MoeConfig(**fields)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = param.shape
            if "embed_tokens" in name:
                value = 0.3 * torch.randn(shape, generator=generator)
            elif "norm" in name:
                value = 1.0 + 0.2 * torch.randn(shape, generator=generator)
            elif name.endswith(".bias"):
                value = 0.3 * torch.randn(shape, generator=generator)
            else:  # weights [..., out, in] (the stacked experts included)
                value = torch.randn(shape, generator=generator) / np.sqrt(shape[-1])
            param.copy_(value)


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
