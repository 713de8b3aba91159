"""The repository files the tests read, and tiny random Qwen3 checkpoints over them.

Paths come from this file's location (the library itself knows no repository paths).
"""

from __future__ import annotations

import os

from effopd_jax.models.qwen import QwenConfig
from effopd_jax.testing import tiny_qwen3_config, write_random_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3_TOKENIZER_DIR = os.path.join(REPO_ROOT, "third_party", "qwen3_tokenizer")
GSM8K_FILE = os.path.join(REPO_ROOT, "third_party", "gsm8k", "gsm8k_test_100.jsonl")

__all__ = ["GSM8K_FILE", "QWEN3_TOKENIZER_DIR", "REPO_ROOT", "ensure_random_checkpoint", "tiny_qwen3_config"]


def ensure_random_checkpoint(path: str, config: QwenConfig, *, seed: int,
                             tokenizer_dir: str = QWEN3_TOKENIZER_DIR) -> str:
    """:func:`effopd_jax.testing.write_random_checkpoint` with the repository's Qwen3 tokenizer files."""
    return write_random_checkpoint(path, config, seed=seed, tokenizer_dir=tokenizer_dir)
