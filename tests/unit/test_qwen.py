"""Model-level tests of effopd_jax.models.qwen (no checkpoints: HF parity is in test_convert.py).

References used: numpy re-implementations (RoPE), the same model on unpadded inputs (padding),
the unscanned model (scan / remat), the uncached forward (KV cache), and transformers' own
config classes (published configs).
"""
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax.models import qwen
from effopd_jax.models.qwen import (KVCache, Qwen, QwenConfig, UnsupportedConfigError,
                                    init_cache, init_params, lm_head_weight, split_cache_layers)
from helpers_qwen import random_params, stack_layers, tiny_config
from helpers_tiny import REPO_ROOT

QWEN_CONFIGS = Path(REPO_ROOT) / "third_party" / "qwen_configs" / "qwen_configs.json"


@pytest.fixture(scope="module")
def model_and_params():
    config = tiny_config()
    return config, random_params(config)


@functools.partial(jax.jit, static_argnames=("config", "return_hidden_states"))
def forward(config, params, ids, positions=None, attention_mask=None, return_hidden_states=False):
    """Jitted uncached forward; compilations are shared between tests with equal shapes."""
    return Qwen(config).apply({"params": params}, ids, positions=positions,
                              attention_mask=attention_mask,
                              return_hidden_states=return_hidden_states)


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------
def test_rope_matches_numpy_rotate_half():
    rng = np.random.RandomState(0)
    head_dim, theta = 8, 500.0
    x = rng.randn(2, 5, 3, head_dim).astype(np.float32)
    positions = rng.randint(0, 100, (2, 5))
    cos, sin = qwen.rope_cos_sin(jnp.asarray(positions), head_dim, theta)
    got = np.asarray(qwen.apply_rope(jnp.asarray(x), cos, sin))
    # Reference: pair dimension j with j + d/2 and rotate by position * theta^(-2j/d).
    half = head_dim // 2
    freq = theta ** (-np.arange(half) * 2.0 / head_dim)
    angle = positions[..., None, None] * freq  # [b, s, 1, half]
    x1, x2 = x[..., :half], x[..., half:]
    want = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.RandomState(1)
    q, k = (jnp.asarray(rng.randn(1, 1, 1, 16).astype(np.float32)) for _ in range(2))

    def score(pq, pk):
        rq = qwen.apply_rope(q, *qwen.rope_cos_sin(jnp.array([[pq]]), 16, 1e4))
        rk = qwen.apply_rope(k, *qwen.rope_cos_sin(jnp.array([[pk]]), 16, 1e4))
        return float(jnp.sum(rq * rk))

    assert abs(score(7, 3) - score(104, 100)) < 1e-4
    assert abs(score(7, 3) - score(3, 7)) > 1e-3  # and it does depend on the offset


def test_rmsnorm_matches_numpy():
    x = np.random.RandomState(2).randn(3, 10).astype(np.float32) * 5
    scale = np.linspace(0.5, 1.5, 10).astype(np.float32)
    module = qwen.RMSNorm(1e-6, jnp.float32, jnp.float32)
    got = module.apply({"params": {"scale": scale}}, jnp.asarray(x))
    want = scale * x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_attention_matches_numpy_gqa():
    rng = np.random.RandomState(3)
    b, s, t, heads, kv, d = 2, 3, 5, 4, 2, 8
    q = rng.randn(b, s, heads, d).astype(np.float32)
    k = rng.randn(b, t, kv, d).astype(np.float32)
    v = rng.randn(b, t, kv, d).astype(np.float32)
    mask = rng.rand(b, s, t) > 0.3
    mask[..., 0] = True
    got = np.asarray(qwen.attention(*map(jnp.asarray, (q, k, v, mask)), jnp.float32))
    want = np.zeros_like(got)
    for h in range(heads):
        g = h // (heads // kv)  # HF repeat_kv: query head h uses kv head h // groups
        scores = np.einsum("bsd,btd->bst", q[:, :, h], k[:, :, g]) / np.sqrt(d)
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want[:, :, h] = np.einsum("bst,btd->bsd", p, v[:, :, g])
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Parameter tree
# ---------------------------------------------------------------------------------------------
def test_param_tree_matches_architecture_doc():
    config = tiny_config(o_proj_bias=True)
    shapes = jax.tree.map(lambda x: x.shape, qwen.abstract_params(config))
    layer = shapes["layers_1"]
    assert shapes["embed_tokens"]["embedding"] == (128, 64)
    assert shapes["lm_head"]["kernel"] == (64, 128)
    assert shapes["norm"]["scale"] == (64,)
    assert layer["self_attn"]["q_proj"] == {"kernel": (64, 96), "bias": (96,)}
    assert layer["self_attn"]["k_proj"] == {"kernel": (64, 48), "bias": (48,)}
    assert layer["self_attn"]["o_proj"] == {"kernel": (96, 64), "bias": (64,)}
    assert layer["self_attn"]["q_norm"]["scale"] == (24,)
    assert layer["mlp"]["down_proj"]["kernel"] == (96, 64)
    tied = qwen.abstract_params(tiny_config(tie_word_embeddings=True, qkv_bias=False,
                                            qk_norm=False, scan_layers=True))
    assert "lm_head" not in tied and "q_norm" not in tied["layers"]["self_attn"]
    assert "bias" not in tied["layers"]["self_attn"]["q_proj"]
    assert tied["layers"]["mlp"]["gate_proj"]["kernel"].shape == (2, 64, 96)


def test_every_param_has_logical_axes():
    for scan in (False, True):
        specs = qwen.param_logical_axes(tiny_config(scan_layers=scan))
        shapes = qwen.abstract_params(tiny_config(scan_layers=scan))
        for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
                x, jax.sharding.PartitionSpec)), jax.tree.leaves(shapes)):
            assert len(spec) == len(shape.shape) and all(name is not None for name in spec)
        if scan:
            assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
                "layers", "embed", "q_heads")


def test_published_configs_build_with_expected_param_counts():
    published = json.loads(QWEN_CONFIGS.read_text())
    for name in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-7B"):
        hf = published[name]
        config = QwenConfig.from_hf(hf, scan_layers=True)
        count = sum(np.prod(x.shape) for x in jax.tree.leaves(qwen.abstract_params(config)))
        h, i, v, L = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
        d = hf.get("head_dim", h // hf["num_attention_heads"])
        q, kv = hf["num_attention_heads"] * d, hf["num_key_value_heads"] * d
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) if hf["model_type"] == "qwen2" else 2 * d
        want = v * h * (1 if hf["tie_word_embeddings"] else 2) + h + L * (attn + 3 * h * i + 2 * h)
        assert count == want, name
    assert QwenConfig.from_hf(published["Qwen/Qwen3-4B"]).head_dim == 128  # != 2560 / 32


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def test_config_from_hf_to_hf_round_trip():
    published = json.loads(QWEN_CONFIGS.read_text())
    for name, hf in published.items():
        config = QwenConfig.from_hf(hf)
        again = QwenConfig.from_hf(config.to_hf())
        assert again == config, name
        assert QwenConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    qwen2 = QwenConfig.from_hf(published["Qwen/Qwen2.5-1.5B"])
    assert (qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.qk_norm, qwen2.head_dim) == (True, False, False, 128)
    qwen3 = QwenConfig.from_hf(published["Qwen/Qwen3-1.7B"])
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.rope_theta) == (False, True, 1e6)


def test_config_reads_both_rope_spellings():
    base = dict(model_type="qwen3", vocab_size=8, hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=2, head_dim=4)
    assert QwenConfig.from_hf({**base, "rope_theta": 123.0}).rope_theta == 123.0
    assert QwenConfig.from_hf({**base, "rope_parameters": {"rope_type": "default",
                                                           "rope_theta": 7.0}}).rope_theta == 7.0


@pytest.mark.parametrize("change, field", [
    ({"model_type": "qwen3_moe"}, "model_type"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_experts": 8}, "num_experts"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_raise_naming_the_field(change, field):
    hf = dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8,
              num_hidden_layers=2, num_attention_heads=2, rope_theta=1e4)
    with pytest.raises(UnsupportedConfigError, match=field):
        QwenConfig.from_hf({**hf, **change})


def test_config_validation_errors_name_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="remat"):
        tiny_config(remat="sometimes")
    with pytest.raises(ValueError, match="dtype"):
        tiny_config(dtype=jnp.int32)
    with pytest.raises(UnsupportedConfigError, match="qk_norm"):
        tiny_config(model_type="qwen2").to_hf()  # qwen2 has no q/k norm


# ---------------------------------------------------------------------------------------------
# Forward semantics
# ---------------------------------------------------------------------------------------------
def test_left_and_right_padding_match_unpadded(model_and_params):
    config, params = model_and_params
    ids = jax.random.randint(jax.random.key(1), (1, 5), 0, config.vocab_size)
    # Unpadded reference rows: plain positions, a uniform shift of 3, and a gap after token 2.
    positions = jnp.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [0, 1, 2, 10, 11]])
    unpadded = forward(config, params, jnp.repeat(ids, 3, 0), positions=positions)
    want = unpadded[0]
    np.testing.assert_allclose(unpadded[1], want, atol=1e-4)       # RoPE is relative...
    assert float(jnp.max(jnp.abs(unpadded[2, 3:] - want[3:]))) > 1e-2  # ...and positions matter
    # Left- and right-padded rows with default (mask-derived) positions.
    pad = jnp.full((1, 2), 5, jnp.int32)
    padded = jnp.concatenate([jnp.concatenate([pad, ids], 1), jnp.concatenate([ids, pad], 1)])
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    out = forward(config, params, padded, attention_mask=mask)
    np.testing.assert_allclose(out[0, 2:], want, atol=1e-4)
    np.testing.assert_allclose(out[1, :5], want, atol=1e-4)
    assert not np.any(np.isnan(np.asarray(out)))  # padded query rows stay finite


def test_hidden_states_times_lm_head_equals_logits(model_and_params):
    config, params = model_and_params
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
    for cfg in (config, dataclasses.replace(config, tie_word_embeddings=True)):
        p = dict(params)
        if cfg.tie_word_embeddings:
            p.pop("lm_head")
        logits = forward(cfg, p, ids)
        hidden = forward(cfg, p, ids, return_hidden_states=True)
        assert hidden.shape == (2, 7, cfg.hidden_size)
        np.testing.assert_allclose(hidden @ lm_head_weight(cfg, p), logits, atol=1e-4)
    np.testing.assert_array_equal(
        lm_head_weight(dataclasses.replace(config, tie_word_embeddings=True), params),
        params["embed_tokens"]["embedding"].T)


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scan_layers_match_unscanned(model_and_params, remat):
    config, params = model_and_params
    scanned = dataclasses.replace(config, scan_layers=True, remat=remat)
    ids = jax.random.randint(jax.random.key(3), (2, 7), 0, config.vocab_size)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    np.testing.assert_allclose(forward(scanned, stack_layers(config, params), ids,
                                       attention_mask=mask),
                               forward(config, params, ids, attention_mask=mask), atol=1e-5)


def test_remat_scan_gradients_match_plain_gradients(model_and_params):
    config, params = model_and_params
    ids = jax.random.randint(jax.random.key(3), (2, 7), 0, config.vocab_size)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])

    def grad(cfg, p):
        loss = lambda p: jnp.mean(Qwen(cfg).apply({"params": p}, ids, attention_mask=mask) ** 2)
        return jax.jit(jax.grad(loss))(p)

    plain = stack_layers(config, grad(config, params))
    remat = grad(dataclasses.replace(config, scan_layers=True, remat="full"),
                 stack_layers(config, params))
    assert float(jnp.max(jnp.abs(remat["layers"]["self_attn"]["q_proj"]["bias"]))) > 1e-4
    for path_a, b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(path_a[1], b, atol=1e-5, err_msg=str(path_a[0]))


def test_bf16_params_and_compute_give_fp32_logits_close_to_fp32(model_and_params):
    config, params = model_and_params
    ids = jax.random.randint(jax.random.key(2), (2, 7), 0, config.vocab_size)
    config16 = dataclasses.replace(config, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    logits16 = forward(config16, params16, ids)
    # Reference: the same bf16-rounded weights, computed in fp32.
    logits32 = forward(config, jax.tree.map(lambda x: x.astype(jnp.float32), params16), ids)
    assert logits16.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(logits32)))
    error = float(jnp.max(jnp.abs(logits16 - logits32)))
    assert 0 < error < 0.05 * scale  # bf16 rounding is visible but small
    hidden16 = jax.eval_shape(lambda p: Qwen(config16).apply(
        {"params": p}, ids, return_hidden_states=True), params16)
    assert hidden16.dtype == jnp.bfloat16


def test_init_params_draws_the_documented_distributions():
    config = tiny_config(param_dtype=jnp.bfloat16, initializer_range=0.05, scan_layers=True)
    params = init_params(config, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    attn = params["layers"]["self_attn"]
    np.testing.assert_array_equal(attn["q_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(attn["q_proj"]["bias"], 0.0)
    embedding = np.asarray(params["embed_tokens"]["embedding"], np.float32)
    assert abs(embedding.std() - 0.05) < 0.005 and abs(embedding.mean()) < 0.005
    # Different layers get different draws (nn.scan splits the params rng).
    assert not np.array_equal(attn["q_proj"]["kernel"][0], attn["q_proj"]["kernel"][1])


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_prefill_and_decode_match_full_forward(model_and_params, scan_layers):
    base, params = model_and_params
    config = dataclasses.replace(base, scan_layers=scan_layers)
    if scan_layers:
        params = stack_layers(base, params)
    prompt_len, new_tokens, batch = 5, 4, 3
    total = prompt_len + new_tokens
    rng = np.random.RandomState(5)
    ids = jnp.asarray(rng.randint(0, config.vocab_size, (batch, total)))
    # Left-padded prompts of lengths 5, 3 and 1.
    prompt_mask = np.ones((batch, prompt_len), np.int32)
    prompt_mask[1, :2] = 0
    prompt_mask[2, :4] = 0
    full_mask = jnp.asarray(np.concatenate([prompt_mask, np.ones((batch, new_tokens), np.int32)], 1))
    want = forward(config, params, ids, attention_mask=full_mask)

    @jax.jit
    def step(p, tokens, cache, key_mask):
        return Qwen(config).apply({"params": p}, tokens, attention_mask=key_mask, cache=cache)

    # The sampler's pattern: the key mask marks future slots as valid too; causality hides them.
    cache = init_cache(config, batch, total, dtype=jnp.float32)
    logits, cache = step(params, ids[:, :prompt_len], cache, full_mask)
    assert isinstance(cache, KVCache) and int(cache.index) == prompt_len
    got = [logits]
    for t in range(prompt_len, total):
        logits, cache = step(params, ids[:, t:t + 1], cache, full_mask)
        got.append(logits)
    assert int(cache.index) == total
    got = jnp.concatenate(got, axis=1)
    real = np.asarray(full_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4)

    if scan_layers:
        return
    # The per-layer form of the cache (the sampler's decode loop) gives the same logits and
    # stays per-layer.
    cache = split_cache_layers(init_cache(config, batch, total, dtype=jnp.float32))
    logits, cache = step(params, ids[:, :prompt_len], cache, full_mask)
    per_layer = [logits]
    for t in range(prompt_len, total):
        logits, cache = step(params, ids[:, t:t + 1], cache, full_mask)
        per_layer.append(logits)
    assert isinstance(cache.k, tuple) and len(cache.k) == config.num_hidden_layers
    np.testing.assert_allclose(np.asarray(jnp.concatenate(per_layer, axis=1)), np.asarray(got), atol=1e-6)

    # Explicit positions and a mask that only covers the slots written so far agree too.
    cache = init_cache(config, batch, total, dtype=jnp.float32)
    positions = np.maximum(np.cumsum(np.asarray(full_mask), 1) - 1, 0)
    mask_so_far = np.asarray(full_mask) * (np.arange(total) < prompt_len)
    logits, cache = jax.jit(lambda p, c: Qwen(config).apply(
        {"params": p}, ids[:, :prompt_len], positions=jnp.asarray(positions[:, :prompt_len]),
        attention_mask=jnp.asarray(mask_so_far), cache=c))(params, cache)
    np.testing.assert_allclose(np.asarray(logits)[real[:, :prompt_len]],
                               np.asarray(want[:, :prompt_len])[real[:, :prompt_len]], atol=1e-4)
    # The cache holds the keys for exactly the prompt slots.
    assert float(jnp.max(jnp.abs(cache.k[:, :, prompt_len:]))) == 0.0
    assert float(jnp.min(jnp.max(jnp.abs(cache.k[:, :, :prompt_len]), axis=(-1, -2)))) > 0.0


def test_cache_shape_errors(model_and_params):
    config, params = model_and_params
    cache = init_cache(config, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="max_len"):
        Qwen(config).apply({"params": params}, jnp.zeros((2, 3), jnp.int32),
                           attention_mask=jnp.ones((2, 3)), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        Qwen(config).apply({"params": params}, jnp.zeros((3, 1), jnp.int32), cache=cache)
