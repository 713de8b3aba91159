"""Tiny effopd_jax Qwen configs and random params for tests (no compilation needed).

    config = tiny_config(scan_layers=False)
    params = random_params(config, seed=0)      # numpy-drawn, then jnp arrays
    scanned = stack_layers(config, params)       # the scan_layers=True layout of the same weights
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax.models import qwen
from effopd_jax.models.qwen import QwenConfig


def tiny_config(**overrides) -> QwenConfig:
    """hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 24 (!= 64/4), vocab 128, fp32,
    Qwen3-style q/k norm plus q/k/v biases (every optional piece switched on)."""
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=1e4,
                  qkv_bias=True, o_proj_bias=False, qk_norm=True, dtype=jnp.float32)
    fields.update(overrides)
    return QwenConfig(**fields)


def random_params(config: QwenConfig, seed: int = 0):
    """Params of `config` drawn with numpy: kernels N(0, 1/fan_in), embeddings N(0, 0.3^2),
    biases N(0, 0.3^2), norm scales 1 + N(0, 0.2^2). Drawn in a fixed order of leaf paths, so
    the same seed gives the same weights for both layouts only via `stack_layers`."""
    rng = np.random.RandomState(seed)
    abstract = qwen.abstract_params(config)

    def draw(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            value = rng.randn(*shape) / np.sqrt(shape[-2])
        elif name == "scale":
            value = 1.0 + 0.2 * rng.randn(*shape)
        else:  # bias, embedding
            value = 0.3 * rng.randn(*shape)
        return jnp.asarray(value, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def stack_layers(config: QwenConfig, params):
    """Unscanned params -> the scanned layout (layers_i/... stacked under layers/...)."""
    layers = [params[f"layers_{i}"] for i in range(config.num_hidden_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out
