"""Tiny random Hugging Face Qwen2 / Qwen3 checkpoints and torch reference forwards for tests.

    path = make_tiny_hf_checkpoint(tmp_path, model_type="qwen3", tie=False, num_kv_heads=2)
    logits = torch_logits(path, input_ids, attention_mask=mask)      # numpy float32

Weights are redrawn after construction (not transformers' N(0, 0.02) init, which makes every
logit ~0 and a parity test vacuous): embeddings ~ N(0, 0.3^2), Linear weights ~ N(0, 1/fan_in),
biases ~ N(0, 0.3^2), RMSNorm weights ~ 1 + N(0, 0.2^2), so logits are O(1)-O(10).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

TINY_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)


def make_tiny_hf_config(model_type: str = "qwen3", tie: bool = False, num_kv_heads: int = 2,
                        attention_bias: bool | None = None, **overrides: Any):
    """A `Qwen2Config` / `Qwen3Config` of the tiny test size.

    `attention_bias` is Qwen3's flag (q/k/v and o_proj biases); Qwen2 always has q/k/v biases,
    so it must stay None for qwen2. Qwen3 defaults to head_dim=24 (independent of
    hidden/heads=16) and rope_theta=1e6; Qwen2 to rope_theta=1e4.
    """
    fields = dict(TINY_SIZES, num_key_value_heads=num_kv_heads, tie_word_embeddings=tie)
    if model_type == "qwen3":
        fields.update(head_dim=24, rope_theta=1_000_000.0,
                      attention_bias=bool(attention_bias) if attention_bias is not None else False)
        fields.update(overrides)
        return transformers.Qwen3Config(**fields)
    if model_type == "qwen2":
        if attention_bias is not None:
            raise ValueError("qwen2 always has q/k/v biases; leave attention_bias=None")
        fields.update(rope_theta=10_000.0)
        fields.update(overrides)
        return transformers.Qwen2Config(**fields)
    raise ValueError(f"model_type must be 'qwen2' or 'qwen3', got {model_type!r}")


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter of a transformers model in place (see the module docstring);
    weights `[..., out, in]` (stacked experts included) ~ N(0, 1/fan_in)."""
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
            else:
                value = torch.randn(shape, generator=generator) / np.sqrt(shape[-1])
            param.copy_(value)


def make_tiny_hf_checkpoint(tmp_path: str | os.PathLike, model_type: str = "qwen3",
                            tie: bool = False, num_kv_heads: int = 2,
                            attention_bias: bool | None = None, seed: int = 0,
                            max_shard_size: str | int | None = None,
                            dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """Builds a random tiny `Qwen2ForCausalLM` / `Qwen3ForCausalLM`, saves it with
    `save_pretrained` (safetensors in `dtype`; index-sharded when `max_shard_size` is given,
    e.g. "20KB") under `tmp_path/<name>` and returns that directory. The weights depend only on
    the config and `seed`, so two calls differing in `max_shard_size` / `dtype` hold the same
    (up to rounding) weights."""
    config = make_tiny_hf_config(model_type, tie, num_kv_heads, attention_bias, **overrides)
    torch.manual_seed(seed)
    model_cls = (transformers.Qwen3ForCausalLM if model_type == "qwen3"
                 else transformers.Qwen2ForCausalLM)
    model = model_cls(config).to(torch.float32)
    randomize_(model, seed)
    model = model.to(dtype)
    if tie:  # the head shares storage with the embedding; keep it that way
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    name = f"{model_type}_tie{int(tie)}_kv{num_kv_heads}_bias{attention_bias}_s{seed}"
    if max_shard_size is not None:
        name += f"_shard{max_shard_size}"
    if dtype != torch.float32:
        name += f"_{str(dtype).removeprefix('torch.')}"
    path = Path(tmp_path) / name
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def load_torch_model(path: str | os.PathLike) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained` in float32 with eager attention, eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def torch_logits(path_or_model: str | os.PathLike | torch.nn.Module, input_ids: np.ndarray,
                 attention_mask: np.ndarray | None = None,
                 position_ids: np.ndarray | None = None) -> np.ndarray:
    """Reference logits `[batch, seq, vocab]` (float32 numpy) from transformers/torch.

    With a mask and no positions, positions are `cumsum(mask) - 1` clipped at 0 (what
    `generate` uses for left padding, and what effopd_jax.models.qwen uses by default).
    """
    model = (path_or_model if isinstance(path_or_model, torch.nn.Module)
             else load_torch_model(path_or_model))
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        mask = np.asarray(attention_mask).astype(np.int64)
        kwargs["attention_mask"] = torch.as_tensor(mask)
        if position_ids is None:
            position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float().numpy()
