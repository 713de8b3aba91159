"""Tiny fixtures for tests, benchmarks and smoke configs, installed with the library.

Nothing here knows where a repository checkout lives: callers pass every path (output
directory, tokenizer directory) themselves.
"""

from effopd_jax.testing.checkpoints import tiny_qwen3_config, write_random_checkpoint

__all__ = ["tiny_qwen3_config", "write_random_checkpoint"]
