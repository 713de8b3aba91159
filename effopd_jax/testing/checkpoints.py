"""Tiny random Qwen3 checkpoints for smoke runs on CPU (smoke configs, tests, benchmarks).

They are real Hugging Face checkpoints (``config.json`` + safetensors, plus the tokenizer files
of a given tokenizer directory), written by ``models.save_hf`` from our own initialisation,
deterministic for a seed, and cached: a directory that already holds the same architecture and
seed is reused.
"""

from __future__ import annotations

import json
import os
import shutil

import jax

from effopd_jax import models
from effopd_jax.models.qwen import QwenConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_MARKER = "effopd_tiny.json"


def tiny_qwen3_config(*, vocab_size: int = 151936, hidden_size: int = 32, num_layers: int = 2,
                      num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                      intermediate_size: int = 64, eos_token_id: int = 151645,
                      pad_token_id: int = 151643) -> QwenConfig:
    """A Qwen3-architecture config small enough for CPU tests (defaults: Qwen3's vocabulary)."""
    return QwenConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=True,
        model_type="qwen3",
        max_position_embeddings=4096,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=pad_token_id,
    )


def write_random_checkpoint(path: str, config: QwenConfig, *, seed: int,
                            tokenizer_dir: str | None = None) -> str:
    """Writes (or reuses) a random-init HF checkpoint of ``config`` at ``path``; returns ``path``.

    When ``tokenizer_dir`` is given, its tokenizer files (``tokenizer.json``,
    ``tokenizer_config.json``) are copied next to the weights so the directory works as
    ``config.student.path`` / ``config.tokenizer`` on its own; the caller names the tokenizer
    (Qwen3's for the default 151,936-token vocabulary), the library ships none.
    """
    marker = {"seed": seed, "config": config.to_hf()}
    if tokenizer_dir is None:
        # Recorded so that a later call asking for the tokenizer files does not reuse this one.
        marker["tokenizer"] = None
    marker_path = os.path.join(path, _MARKER)
    if os.path.exists(marker_path):
        with open(marker_path) as f:
            if json.load(f) == json.loads(json.dumps(marker)):
                return path
    os.makedirs(path, exist_ok=True)
    params = jax.device_get(models.init_params(config, jax.random.key(seed)))
    models.save_hf(config, params, path)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))
    with open(marker_path, "w") as f:  # written last: a half-written directory is redone
        json.dump(marker, f)
    return path
