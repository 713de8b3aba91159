"""The Qwen3.5 / Qwen3.6 hybrid family (effopd_jax/models/qwen3_5.py) against independent references.

References: `transformers`' `Qwen3_5ForCausalLM` / `Qwen3_5ForConditionalGeneration` in float32
(logits, greedy generation, checkpoint loading), a numpy loop of the gated delta rule, the same
model on unpadded rows (padding), the uncached forward (cache), the unscanned model (scan),
one device (sharding), and the `transformers` state_dict (layout).

Tiny random weights are redrawn like tests/helpers_hf.py's `_randomize_` so logits are O(1):
embeddings N(0, 0.3^2), Linear weights N(0, 1/fan_in), zero-centred norm weights N(0, 0.2^2)
(scale 1 + w), the gated norm's weights 1 + N(0, 0.2^2), conv taps N(0, 1/width),
A_log = log U(0.1, 4) (per-token decays from ~0.9 down to ~0.05), dt_bias N(0, 0.5^2).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from effopd_jax import models, monitor, objectives, rollout, sampling
from effopd_jax import sharding as sharding_lib
from effopd_jax.config import default_config
from effopd_jax.effopd import DEFAULT_PARAM_FILTER
from effopd_jax.models import UnsupportedConfigError
from effopd_jax.models import qwen3_5
from effopd_jax.models.hf import SAFE_WEIGHTS_NAME, _SafetensorsReader
from effopd_jax.models.qwen3_5 import Qwen3_5Config
from helpers_tiny import REPO_ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5ForCausalLM"):
    pytest.skip("transformers has no Qwen3_5ForCausalLM (needs >= 5.2)", allow_module_level=True)

VOCAB = 96
# Two text configs: different head counts, untied / tied, default / non-default layer_types,
# GQA in both the attention and the linear layers in A, a different conv width and rotary
# fraction in B.
TEXT_A = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4,
              linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
              linear_num_value_heads=4, tie_word_embeddings=False)
TEXT_B = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=5,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, linear_conv_kernel_dim=3,
              linear_key_head_dim=8, linear_value_head_dim=6, linear_num_key_heads=3,
              linear_num_value_heads=3, tie_word_embeddings=True,
              layer_types=["full_attention", "linear_attention", "linear_attention",
                           "full_attention", "linear_attention"],
              rope_parameters={"rope_type": "default", "rope_theta": 50_000.0,
                               "partial_rotary_factor": 0.5})
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
              patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
MTP_TENSORS = {"mtp.fc.weight": (32, 64), "mtp.norm.weight": (32,),
               "mtp.layers.0.mlp.up_proj.weight": (48, 32)}


def _randomize_(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = param.shape
            randn = lambda: torch.randn(shape, generator=generator)  # noqa: E731
            if "embed_tokens" in name:
                value = 0.3 * randn()
            elif name.endswith("A_log"):
                value = torch.log(torch.empty(shape).uniform_(0.1, 4.0, generator=generator))
            elif name.endswith("dt_bias"):
                value = 0.5 * randn()
            elif "linear_attn.norm" in name:
                value = 1.0 + 0.2 * randn()
            elif "visual" in name:
                value = 0.1 * randn()
            elif "norm" in name:
                value = 0.2 * randn()
            elif "conv1d" in name:
                value = randn() / np.sqrt(shape[-1])
            else:
                value = randn() / np.sqrt(shape[1])
            param.copy_(value)


def _add_tensors(path, tensors: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Adds float32 tensors (standing in for a published checkpoint's `mtp.*`) to model.safetensors."""
    from safetensors.numpy import load_file, save_file

    file = path / SAFE_WEIGHTS_NAME
    contents = load_file(file)
    rng = np.random.RandomState(seed)
    added = {name: rng.randn(*shape).astype(np.float32) for name, shape in tensors.items()}
    save_file({**contents, **added}, file, metadata={"format": "pt"})
    return added


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random HF checkpoints: two text-only ones and a multimodal one with MTP tensors."""
    root = tmp_path_factory.mktemp("qwen3_5")
    out = {}
    for name, fields, seed in (("text_a", TEXT_A, 0), ("text_b", TEXT_B, 1)):
        torch.manual_seed(seed)
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**fields)).float()
        _randomize_(model, seed)
        model.save_pretrained(root / name)
        out[name] = root / name
    torch.manual_seed(2)
    config = transformers.Qwen3_5Config(text_config=TEXT_A, vision_config=VISION,
                                        tie_word_embeddings=False)
    model = transformers.Qwen3_5ForConditionalGeneration(config).float()
    _randomize_(model, 2)
    model.save_pretrained(root / "multimodal")
    _add_tensors(root / "multimodal", MTP_TENSORS)
    out["multimodal"] = root / "multimodal"
    return out


@functools.lru_cache(maxsize=None)
def _torch_model(path):
    cls = (transformers.Qwen3_5ForConditionalGeneration if "multimodal" in str(path)
           else transformers.Qwen3_5ForCausalLM)
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _torch_logits(path, ids, mask=None) -> np.ndarray:
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(mask.astype(np.int64))
        kwargs["position_ids"] = torch.as_tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))
    with torch.no_grad():
        return _torch_model(path)(input_ids=torch.as_tensor(ids), **kwargs).logits.float().numpy()


@functools.partial(jax.jit, static_argnames=("config", "return_hidden_states"))
def _forward(config, params, ids, attention_mask=None, return_hidden_states=False):
    return models.forward(config, params, ids, attention_mask=attention_mask,
                          return_hidden_states=return_hidden_states)


def _load(path, **runtime):
    return models.load_hf(path, param_dtype="float32", compute_dtype="float32", **runtime)


def _batch(seed: int, rows: int = 3, length: int = 11):
    """Token ids and a left-padded mask (row 0 full, the others shorter)."""
    ids = np.random.RandomState(seed).randint(0, VOCAB, (rows, length))
    mask = np.ones_like(ids)
    for row in range(1, rows):
        mask[row, :2 + 3 * row] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Logits vs transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["text_a", "text_b", "multimodal"])
def test_logits_match_transformers_with_and_without_left_padding(checkpoints, name):
    path = checkpoints[name]
    config, params = _load(path)
    assert config.model_type == ("qwen3_5" if name == "multimodal" else "qwen3_5_text")
    ids, mask = _batch(seed=len(name))
    want = _torch_logits(path, ids)
    assert 0.3 < want.std() < 10  # O(1) logits: the comparison is not vacuous
    got = np.asarray(_forward(config, params, jnp.asarray(ids)))
    assert np.abs(got - want).max() <= 1e-4
    want = _torch_logits(path, ids, mask)
    got = np.asarray(_forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4


def test_padding_anywhere_equals_the_unpadded_row(checkpoints):
    """Masked positions contribute nothing: left, right and inner padding all give the unpadded
    row's logits at the real tokens (the linear layers' conv and recurrent state included).

    Config A: B's random weights make some logits sensitive to float32 summation order at the
    1e-4 level (transformers' own padded and unpadded runs of a B row differ by 6e-5), too
    coarse for this exact-equality check."""
    config, params = _load(checkpoints["text_a"])
    tokens = np.random.RandomState(5).randint(0, VOCAB, 7)
    alone = np.asarray(_forward(config, params, jnp.asarray(tokens[None])))[0]
    layouts = [np.r_[np.zeros(4), np.ones(7)], np.r_[np.ones(7), np.zeros(4)],
               np.r_[np.ones(2), np.zeros(3), np.ones(5), np.zeros(1)]]
    ids = np.zeros((3, 11), np.int64)
    mask = np.stack(layouts).astype(np.int32)
    for row in range(3):
        ids[row, mask[row].astype(bool)] = tokens
        ids[row, ~mask[row].astype(bool)] = 7  # any id: must not matter
    got = np.asarray(_forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    for row in range(3):
        np.testing.assert_allclose(got[row][mask[row].astype(bool)], alone, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# The gated delta rule: numpy reference, recurrent == chunked
# ---------------------------------------------------------------------------------------------
def _numpy_delta_rule(q, k, v, g, beta, state):
    """The recurrence as written in the module docstring, in float64."""
    q, k, v, g, beta, state = (np.asarray(x, np.float64) for x in (q, k, v, g, beta, state))
    out = np.zeros(v.shape)
    for t in range(q.shape[1]):
        state = state * np.exp(g[:, t])[..., None, None]
        remembered = np.einsum("bhkv,bhk->bhv", state, k[:, t])
        delta = (v[:, t] - remembered) * beta[:, t][..., None]
        state = state + k[:, t][..., :, None] * delta[..., None, :]
        out[:, t] = np.einsum("bhkv,bhk->bhv", state, q[:, t])
    return out, state


def test_gated_delta_rule_recurrent_and_chunked_forms_equal_the_numpy_recurrence():
    rng = np.random.RandomState(0)
    b, s, h, dk, dv = 2, 11, 3, 5, 4
    normalise = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = normalise(rng.randn(b, s, h, dk)) / np.sqrt(dk)
    k = normalise(rng.randn(b, s, h, dk))
    v = rng.randn(b, s, h, dv)
    g = -rng.uniform(0.01, 3.0, (b, s, h))
    beta = rng.uniform(0.0, 1.0, (b, s, h))
    state = rng.randn(b, h, dk, dv)
    want_out, want_state = _numpy_delta_rule(q, k, v, g, beta, state)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta, state)]
    recurrent = jax.jit(qwen3_5.gated_delta_rule_recurrent)
    chunked = jax.jit(qwen3_5.gated_delta_rule_chunked, static_argnames="chunk_size")
    out, final = recurrent(*args)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5)
    np.testing.assert_allclose(np.asarray(final), want_state, atol=2e-5)
    for chunk in (4, 16):  # several chunks with a ragged last one; one padded chunk
        out_c, final_c = chunked(*args, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(out_c), np.asarray(out), atol=2e-5)
        np.testing.assert_allclose(np.asarray(final_c), np.asarray(final), atol=2e-5)
    # Strong decay (g down to -40 per token) stays finite: every exponent is of G_t - G_j <= 0.
    strong = args[:3] + [jnp.asarray(-rng.uniform(0, 40, (b, s, h)), jnp.float32)] + args[4:]
    out_s, _ = chunked(*strong, chunk_size=8)
    ref_s, _ = recurrent(*strong)
    assert np.isfinite(np.asarray(out_s)).all()
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(ref_s), atol=2e-5)


def test_unit_lower_triangular_inverse_matches_numpy_and_the_rule_calls_no_lapack():
    rng = np.random.RandomState(2)
    for size in (1, 6, 16):  # 6: padded to 8 inside
        a = rng.randn(2, size, size) * 0.5
        got = np.asarray(qwen3_5.unit_lower_triangular_inverse(jnp.asarray(a, jnp.float32)))
        np.testing.assert_allclose(got, np.linalg.inv(np.eye(size) + np.tril(a, -1)), atol=1e-5)
    # The stall regression guard: the chunked rule and its gradient are built without the LAPACK
    # custom calls (triangular_solve) that deadlock XLA:CPU's intra-op pool when run concurrently.
    args = [jnp.ones((1, 12, 2, 4))] * 3 + [-jnp.ones((1, 12, 2))] * 2
    loss = lambda *x: qwen3_5.gated_delta_rule_chunked(*x, chunk_size=4)[0].sum()  # noqa: E731
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args))
    assert "triangular_solve" not in text and "custom_call" not in text


def test_causal_conv_and_norms_match_numpy():
    rng = np.random.RandomState(1)
    x, kernel, state = (rng.randn(*shape).astype(np.float32) for shape in ((2, 5, 3), (4, 3), (2, 3, 3)))
    out, new_state = qwen3_5.causal_depthwise_conv(*map(jnp.asarray, (x, kernel, state)))
    window = np.concatenate([state, x], axis=1)
    want = np.stack([sum(kernel[j] * window[:, t + j] for j in range(4)) for t in range(5)], axis=1)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state), window[:, -3:], atol=0)
    # Per-row lengths: the state handed on ends at each row's last real input.
    _, short = qwen3_5.causal_depthwise_conv(*map(jnp.asarray, (x, kernel, state)), jnp.array([2, 5]))
    np.testing.assert_array_equal(np.asarray(short)[0], window[0, 2:5])

    h = rng.randn(4, 6).astype(np.float32) * 3
    w = rng.randn(6).astype(np.float32) * 0.2
    rms = np.sqrt(np.mean(h ** 2, -1, keepdims=True) + 1e-6)
    norm = qwen3_5.ZeroCenteredRMSNorm(1e-6, jnp.float32, jnp.float32)
    np.testing.assert_allclose(np.asarray(norm.apply({"params": {"centered_scale": w}}, h)),
                               h / rms * (1 + w), rtol=1e-5)
    gate = rng.randn(4, 6).astype(np.float32)
    gated = qwen3_5.GatedRMSNorm(1e-6, jnp.float32, jnp.float32)
    np.testing.assert_allclose(np.asarray(gated.apply({"params": {"scale": 1 + w}}, h, gate)),
                               (1 + w) * h / rms * gate / (1 + np.exp(-gate)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Cache, scan, generation
# ---------------------------------------------------------------------------------------------
def test_prefill_then_decode_equals_one_uncached_forward(checkpoints):
    """Scanned layers (the cache split per block); the unscanned cached path is what the sampler
    runs in test_greedy_generation_equals_transformers_generate."""
    config, params = _load(checkpoints["text_a"], scan_layers=True)
    ids, mask = _batch(seed=3, length=12)
    full = np.asarray(_forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    cache = models.init_cache(config, batch=3, max_len=12, dtype=jnp.float32)
    assert cache.recurrent.dtype == jnp.float32 and cache.conv.shape == (3, 3, 3, 64)
    step = jax.jit(lambda p, x, m, c: models.forward(config, p, x, attention_mask=m, cache=c))
    got, start = [], 0
    for stop in (6, 9, 10, 11, 12):  # two multi-token prefill calls, then one token at a time
        slots = jnp.asarray(mask * (np.arange(12) < stop))
        logits, cache = step(params, jnp.asarray(ids[:, start:stop]), slots, cache)
        got.append(np.asarray(logits))
        start = stop
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], full[real], atol=2e-5)
    assert int(cache.index) == 12


def test_scanned_and_rematerialised_layers_equal_unscanned(checkpoints):
    config, params = _load(checkpoints["text_b"])
    scanned_config = dataclasses.replace(config, scan_layers=True, remat="full")
    scanned = models.relayout_params(params, config, scanned_config)
    # The period of (F, L, L, F, L) is the whole stack: one block of 5 sub-layers.
    assert scanned_config.layer_period == 5 and scanned["layers"]["sub_0"]["self_attn"]["q_proj"]["kernel"].shape[0] == 1
    ids, mask = _batch(seed=4)
    want = np.asarray(_forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    got = np.asarray(_forward(scanned_config, scanned, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    back = models.relayout_params(scanned, scanned_config, config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_greedy_generation_equals_transformers_generate(checkpoints):
    """Batched, left-padded rollouts of different prompt lengths equal one-at-a-time HF ones."""
    path = checkpoints["text_a"]
    config, params = _load(path)
    rng = np.random.RandomState(6)
    prompts = [rng.randint(1, VOCAB, n).tolist() for n in (5, 9, 2)]
    max_new = 6
    out = sampling.generate(config, params, prompts, max_new_tokens=max_new, temperature=0.0)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            hf = _torch_model(path).generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new, eos_token_id=None,
                pad_token_id=0)
        np.testing.assert_array_equal(out.tokens[row], hf[0, len(prompt):].numpy())
    # Right padding through the low-level API (same shapes as generate's buckets: [4, 16], so the
    # same compiled program): the conv / recurrent state handed to decoding skips the padding.
    ids, mask = np.zeros((4, 16), np.int32), np.zeros((4, 16), bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], mask[row, :len(prompt)] = prompt, True
    right = sampling.generate_padded(config, params, ids, mask, jax.random.key(0),
                                     max_new_tokens=max_new, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(right.tokens)[:3], out.tokens)


# ---------------------------------------------------------------------------------------------
# Checkpoints: config, round trip, carried tensors
# ---------------------------------------------------------------------------------------------
def _all_tensors(path) -> dict[str, np.ndarray]:
    reader = _SafetensorsReader(str(path))
    return {name: np.asarray(reader.array(name)) for name in reader.records}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_hf_round_trip_is_exact_and_transformers_loads_it(checkpoints, tmp_path, scan_layers):
    path = checkpoints["text_b"]
    config, params = _load(path, scan_layers=scan_layers)
    models.save_hf(config, params, tmp_path / "out")
    again_config, again = _load(tmp_path / "out", scan_layers=scan_layers)
    assert again_config == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    source, written = _all_tensors(path), _all_tensors(tmp_path / "out")
    assert set(written) == set(source) - {"lm_head.weight"}  # tied: the head is the embedding
    for name, array in written.items():
        np.testing.assert_array_equal(array, source[name])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen3_5ForCausalLM"]
    if not scan_layers:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
        assert type(reloaded).__name__ == "Qwen3_5ForCausalLM"


def test_multimodal_checkpoint_loads_reports_and_carries_the_vision_tower_and_mtp(
        checkpoints, tmp_path, caplog):
    path = checkpoints["multimodal"]
    with caplog.at_level(logging.WARNING, logger="effopd_jax.models.hf"):
        config, params = _load(path)
    lines = [r.getMessage() for r in caplog.records if "left untouched" in r.getMessage()]
    assert len(lines) == 1
    visual = sum(1 for name in _all_tensors(path) if name.startswith("model.visual."))
    assert f"model.visual.* ({visual}), mtp.* ({len(MTP_TENSORS)})" in lines[0]

    models.save_hf(config, params, tmp_path / "out", carry_from=path)
    source, written = _all_tensors(path), _all_tensors(tmp_path / "out")
    assert set(written) == set(source)
    for name, array in written.items():  # everything, carried tensors included, bit for bit
        assert array.dtype == source[name].dtype
        np.testing.assert_array_equal(array, source[name])
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((path / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert hf_config["vision_config"] == original["vision_config"]
    assert hf_config["image_token_id"] == original["image_token_id"]
    again_config, _ = _load(tmp_path / "out")
    assert again_config == config
    # transformers loads the export as the class it came from, with the same text path.
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(
        tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "Qwen3_5ForConditionalGeneration"
    ids, _ = _batch(seed=8)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(input_ids=torch.as_tensor(ids)).logits.numpy(),
                                      _torch_logits(path, ids))
    # Without carry_from nothing is carried, and a warning says so.
    with caplog.at_level(logging.WARNING, logger="effopd_jax.models.hf"):
        models.save_hf(config, params, tmp_path / "bare")
    assert not any(n.startswith(("model.visual.", "mtp.")) for n in _all_tensors(tmp_path / "bare"))
    assert any("no carry_from" in r.getMessage() for r in caplog.records)


def test_unused_tensors_outside_the_carried_prefixes_are_still_refused(checkpoints, tmp_path):
    import shutil

    shutil.copytree(checkpoints["text_a"], tmp_path / "ckpt")
    _add_tensors(tmp_path / "ckpt", {"model.visual.stray.weight": (2, 2)})
    with pytest.raises(models.UnexpectedTensorError, match="model.visual.stray.weight"):
        _load(tmp_path / "ckpt")


def test_config_from_hf_reads_both_layouts_and_refuses_what_it_does_not_implement(checkpoints):
    text = json.loads((checkpoints["text_b"] / "config.json").read_text())
    config = models.config_from_hf(text)
    assert (config.layer_types, config.rotary_dim, config.rope_theta, config.tie_word_embeddings) == (
        tuple(TEXT_B["layer_types"]), 4, 50_000.0, True)
    assert Qwen3_5Config.from_dict(config.to_dict()) == config
    assert Qwen3_5Config.from_hf(config.to_hf()) == config
    multimodal = json.loads((checkpoints["multimodal"] / "config.json").read_text())
    mm = models.config_from_hf(multimodal)
    assert mm.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert Qwen3_5Config.from_hf(mm.to_hf()) == mm
    # transformers' default pattern when layer_types is absent, from full_attention_interval.
    no_types = {k: v for k, v in text.items() if k != "layer_types"}
    assert models.config_from_hf({**no_types, "full_attention_interval": 2}).layer_types == (
        "linear_attention", "full_attention") * 2 + ("linear_attention",)
    refusals = {
        "num_experts": {"num_experts": 8},
        "attention_bias": {"attention_bias": True},
        "hidden_act": {"hidden_act": "gelu"},
        "rope_type": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
        "layer_types": {"layer_types": ["sliding_attention"] + text["layer_types"][1:]},
    }
    for field, change in refusals.items():
        with pytest.raises(UnsupportedConfigError, match=field):
            models.config_from_hf({**text, **change})
    with pytest.raises(UnsupportedConfigError, match="text_config.attention_bias"):
        models.config_from_hf({**multimodal, "text_config": {**multimodal["text_config"],
                                                             "attention_bias": True}})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        models.config_from_hf({k: v for k, v in text.items() if k != "num_hidden_layers"})


def test_published_configs_build_at_their_real_sizes():
    with open(os.path.join(REPO_ROOT, "third_party", "qwen_configs", "qwen3_5_configs.json")) as f:
        published = json.load(f)
    counts = {}
    for repo, hf in published.items():
        if repo.startswith("_"):
            continue
        config = models.config_from_hf(hf)
        shapes = jax.tree.leaves(models.abstract_params(dataclasses.replace(config, scan_layers=True)))
        counts[repo] = sum(int(np.prod(x.shape)) for x in shapes)
        assert config.vocab_size == 248_320 and config.rotary_dim == 64
        assert config.layer_types.count("full_attention") == config.num_hidden_layers // 4
    # Text parameters (embedding included once when tied); the model cards' totals include the
    # vision tower (~0.1-0.4B), so these sit just below 0.8B / 2B / 9B.
    assert 0.6e9 < counts["Qwen/Qwen3.5-0.8B"] < 0.8e9
    assert 1.6e9 < counts["Qwen/Qwen3.5-2B"] < 2.0e9
    assert 8.5e9 < counts["Qwen/Qwen3.5-9B"] < 9.5e9


# ---------------------------------------------------------------------------------------------
# Layout, EffOPD filter, monitor / analyze
# ---------------------------------------------------------------------------------------------
def _leaf_names(tree) -> list[str]:
    return [jax.tree_util.keystr(p, simple=True, separator="/")
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("fields", [TEXT_A, TEXT_B], ids=["a", "b"])
def test_layout_names_the_transformers_tensors(fields, scan_layers):
    hf = transformers.Qwen3_5TextConfig(**fields)
    config = models.config_from_hf(hf.to_dict(), scan_layers=scan_layers)
    layout = models.layout(config)
    abstract = models.abstract_params(config)
    assert [info.name for info in layout.params] == _leaf_names(abstract)
    expected = set(transformers.Qwen3_5ForCausalLM(hf).state_dict()) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set())
    assert {name for info in layout.params for name in info.hf_names} == expected
    linear = config.layers_of_type("linear_attention")
    full = config.layers_of_type("full_attention")
    for module in layout.matrix_modules:
        held = sorted(layout.module_layers(module))
        assert held == sorted(linear if module.startswith("linear_attn") else
                              full if module.startswith("self_attn") else range(config.num_hidden_layers))
    assert layout.module_groups() == {
        "linear_attention": qwen3_5.QWEN3_5_MATRIX_MODULES[:5],
        "attention": qwen3_5.QWEN3_5_MATRIX_MODULES[5:9], "mlp": qwen3_5.QWEN3_5_MATRIX_MODULES[9:]}
    roles = {info.module: info.role for info in layout.params}
    assert (roles["linear_attn/conv1d"], roles["linear_attn/A_log"], roles["linear_attn/dt_bias"]) == (
        "conv", "decay", "bias")


def test_effopd_default_is_the_authors_filter_except_the_decay_parameters():
    config = models.config_from_hf(transformers.Qwen3_5TextConfig(**TEXT_A).to_dict())
    layout = models.layout(config)
    authors = re.compile(DEFAULT_PARAM_FILTER, re.IGNORECASE)
    # The authors' substring rule on the transformers names (their code filters torch names).
    by_hf = {name: info for info in layout.params for name in info.hf_names}
    chosen = {name for name, info in by_hf.items() if info.extrapolate}
    authors_choice = {name for name in by_hf if authors.search(name)}
    assert authors_choice - chosen == {n for n in by_hf if n.endswith(("A_log", "dt_bias"))}
    assert chosen <= authors_choice
    assert any(n.endswith("conv1d.weight") for n in chosen)
    assert not any("input_layernorm" in n or "embed_tokens" in n for n in chosen)


# A period-2 hybrid, so the scanned layout stacks non-adjacent layers: sub_0 holds layers 0 and 2.
SMALL = Qwen3_5Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                      layer_types=("linear_attention", "full_attention") * 2,
                      linear_key_head_dim=4, linear_value_head_dim=4, linear_num_key_heads=2,
                      linear_num_value_heads=2, dtype=jnp.float32)


def test_monitor_stacks_each_module_over_the_layers_that_hold_it():
    config = dataclasses.replace(SMALL, scan_layers=True)
    layout = models.layout(config)
    assert layout.module_layers("linear_attn/in_proj_qkv") == (0, 2)
    assert layout.module_layers("self_attn/q_proj") == (1, 3) and layout.module_layers("mlp/up_proj") == (0, 2, 1, 3)
    base = models.init_params(config, jax.random.key(0))
    moved = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), base)
    kernels = monitor.module_kernels(base, layout)
    assert kernels["self_attn/q_proj"].shape == (2, 16, 32) and kernels["linear_attn/in_proj_b"].shape == (2, 16, 2)
    np.testing.assert_array_equal(np.asarray(kernels["mlp/up_proj"][1]),  # row 1 = layer 2 = sub_0[1]
                                  np.asarray(base["layers"]["sub_0"]["mlp"]["up_proj"]["kernel"][1]))
    restored = monitor.replace_module_kernels(base, layout, kernels)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    unscanned = models.layout(SMALL)
    np.testing.assert_array_equal(  # the same rows whatever the tree layout
        np.asarray(monitor.module_kernels(models.relayout_params(base, config, SMALL), unscanned)["mlp/up_proj"]),
        np.asarray(kernels["mlp/up_proj"])[np.argsort(layout.module_layers("mlp/up_proj"))])

    # The live monitor over three modules held by different layers (all 12 cost 4x the compile).
    kept = ("linear_attn/in_proj_qkv", "self_attn/q_proj", "mlp/up_proj")
    layout = dataclasses.replace(layout, params=tuple(
        info for info in layout.params if info.role != "matrix" or info.module in kept))
    settings = monitor.MonitorConfig(k=1, per_layer=True, svd_method="exact")
    state = monitor.init_monitor_state(base, layout)
    _, metrics = monitor.monitor_step(state, moved, jax.random.key(2), config=settings, layout=layout)
    # Per-layer metrics exist exactly for the layers that hold each module, and the allocation
    # shares of each layer's modules sum to 1.
    for module in layout.matrix_modules:
        for layer in range(config.num_hidden_layers):
            key = f"monitor/layers_{layer}/{module}/update_norm"
            assert (key in metrics) == (layer in layout.module_layers(module)), key
            if key in metrics:
                path = ("layers", f"sub_{layer % 2}", *module.split("/"), "kernel")
                delta = (functools.reduce(lambda t, k: t[k], path, moved)[layer // 2]
                         - functools.reduce(lambda t, k: t[k], path, base)[layer // 2])
                assert float(metrics[key]) == pytest.approx(float(jnp.linalg.norm(delta)), rel=1e-4)
    for layer in range(config.num_hidden_layers):
        shares = [float(v) for k, v in metrics.items()
                  if k.startswith(f"monitor/layers_{layer}/") and k.endswith("/alloc")]
        assert abs(sum(shares) - 1.0) < 1e-5


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")
def test_sharded_forward_and_decode_equal_one_device(checkpoints):
    config, params = _load(checkpoints["text_a"], scan_layers=True)
    ids, mask = _batch(seed=9, rows=4, length=8)
    want = np.asarray(_forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))

    def run(p, x, m, cache):
        logits, cache = models.forward(config, p, x[:, :7], attention_mask=m * (jnp.arange(8) < 7), cache=cache)
        last, cache = models.forward(config, p, x[:, 7:], attention_mask=m, cache=cache)
        return jnp.concatenate([logits, last], axis=1), cache

    mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    specs = sharding_lib.param_shardings(config, mesh)
    assert specs["layers"]["sub_0"]["linear_attn"]["in_proj_z"]["kernel"].spec == PartitionSpec(None, "fsdp", "tensor")
    cache_shardings = sharding_lib.cache_shardings(config, mesh)
    assert cache_shardings.recurrent.spec == PartitionSpec(None, ("data", "fsdp"), "tensor", None, None)
    batch = sharding_lib.batch_sharding(mesh)
    with sharding_lib.sharding_context(mesh):
        sharded = jax.device_put(params, specs)
        x, m = jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch)
        got = jax.jit(lambda p, x, m: models.forward(config, p, x, attention_mask=m))(sharded, x, m)
        cache = jax.device_put(models.init_cache(config, 4, 8, jnp.float32), cache_shardings)
        decoded, new_cache = jax.jit(run, out_shardings=(None, cache_shardings))(sharded, x, m, cache)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5)
    np.testing.assert_allclose(np.asarray(decoded)[real], want[real], atol=2e-5)
    assert new_cache.recurrent.sharding.is_equivalent_to(cache_shardings.recurrent, 5)


# ---------------------------------------------------------------------------------------------
# One OPD step with a Qwen3.5 student and teacher
# ---------------------------------------------------------------------------------------------
def test_opd_step_with_qwen3_5_student_and_teacher_runs_with_a_finite_loss():
    from effopd_jax.teachers import Teacher
    from effopd_jax.trainer import FullFineTuning, make_optimizer, new_train_state, update_step

    student_config = dataclasses.replace(SMALL, num_hidden_layers=2, layer_types=SMALL.layer_types[:2])
    teacher_config = dataclasses.replace(student_config, hidden_size=24, tie_word_embeddings=True)
    student = models.init_params(student_config, jax.random.key(1))
    teacher_params = models.init_params(teacher_config, jax.random.key(2))
    mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
    prompts = [np.random.RandomState(n).randint(1, VOCAB, n).astype(np.int32) for n in (5, 3, 4, 2)]
    engine = rollout.make_rollout_engine(
        "static", model_config=student_config, mesh=mesh, prompt_length=5,
        settings=sampling.SamplingSettings(max_new_tokens=4, temperature=1.0))
    out = engine.generate(student, prompts, jax.random.key(0))
    assert np.asarray(out.response_mask).all()
    teacher = Teacher(name="teacher", config=teacher_config, params=teacher_params,
                      output="token_logprobs", temperature=1.0, chunk_size=4)
    batch = teacher.score(out, objectives.OPDBatch(*out))
    assert np.isfinite(np.asarray(batch.teacher_logprobs)).all()

    config = default_config()
    config.optimizer.learning_rate = 1e-2
    parameterization = FullFineTuning()
    trainable, frozen = parameterization.split(student)
    optimizer, _ = make_optimizer(config.optimizer, total_steps=4, effopd_config=config.effopd,
                                  param_filter=parameterization.param_filter(models.layout(student_config)))
    state = new_train_state(trainable, optimizer, seed=0, mesh=mesh)
    step = jax.jit(functools.partial(
        update_step, optimizer=optimizer, model_config=student_config,
        parameterization=parameterization, loss=objectives.get_loss("sampled_token"),
        settings=objectives.LossSettings(chunk_size=4)))
    new_state, metrics = step(state, batch, frozen)
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["update_skipped"])
    assert float(metrics["grad_norm"]) > 0
    layer = lambda p: p["layers_0"]["linear_attn"]  # noqa: E731
    for name in ("in_proj_qkv", "conv1d", "out_proj"):  # the linear layer learns
        assert not np.array_equal(np.asarray(layer(state.trainable_params)[name]["kernel"]),
                                  np.asarray(layer(new_state.trainable_params)[name]["kernel"]))


def test_analyze_reads_a_scanned_qwen3_5_checkpoint_in_the_unscanned_layout(tmp_path):
    from effopd_jax import analyze, convert

    config = dataclasses.replace(SMALL, scan_layers=True)
    params = models.init_params(config, jax.random.key(4))
    convert.save_orbax(config, params, tmp_path / "step")
    loaded_config, loaded = analyze.load_checkpoint(tmp_path / "step")
    assert loaded_config == dataclasses.replace(config, scan_layers=False)
    assert loaded["layers_2"]["linear_attn"]["A_log"].shape == (2,)
    expected = models.relayout_params(params, config, loaded_config)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(loaded["layers_2"]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(params["layers"]["sub_0"]["mlp"]["up_proj"]["kernel"][1]))


def test_the_qwen3_5_config_validates_with_the_users_paths(checkpoints):
    import importlib.util

    from effopd_jax import config as config_lib
    from helpers_tiny import GSM8K_FILE

    path = os.path.join(REPO_ROOT, "configs", "qwen3p5_0p8b_from_9b_opd_effopd.py")
    spec = importlib.util.spec_from_file_location("qwen3p5_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.student.path = c.teachers[0].path = str(checkpoints["multimodal"])
    c.data.train_files = c.data.eval_files = c.effopd.val_files = (GSM8K_FILE,)
    config_lib.validate_config(c)
    student = models.config_from_hf(c.student.path, scan_layers=c.student.scan_layers)
    assert student.model_type == "qwen3_5" and student.scan_layers


def test_lora_adapters_on_every_matrix_and_their_merge_in_the_scanned_layout():
    """LoRA's default targets are the layout's matrix modules (the Gated DeltaNet projections
    included); the analysis merges a scanned run's adapters (grouped by the layer_types period)
    into the unscanned base: W + (alpha / r) A B, checked in numpy per layer."""
    from effopd_jax import analyze, lora

    config = dataclasses.replace(SMALL, scan_layers=True)
    flat = dataclasses.replace(SMALL, scan_layers=False)
    params = models.init_params(config, jax.random.key(5))
    adapter = lora.LoRA.for_model(config, rank=2, alpha=4.0)
    assert set(adapter.modules) == set(qwen3_5.QWEN3_5_MATRIX_MODULES)
    adapters, _ = adapter.split(params)
    rng = np.random.RandomState(0)  # B = 0 at init: draw it so the merge shows
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.randn(*x.shape), x.dtype) if path[-1].key == "lora_b" else x, adapters)
    base = models.relayout_params(params, config, flat)
    merged = analyze.merge_lora_adapters(config, base, adapters, adapter.scale)
    sub = adapters["layers"]["sub_1"]["self_attn"]["q_proj"]  # layers 1 and 3 (period 2)
    for row, layer in enumerate((1, 3)):
        want = (np.asarray(base[f"layers_{layer}"]["self_attn"]["q_proj"]["kernel"])
                + 2.0 * np.asarray(sub["lora_a"][row]) @ np.asarray(sub["lora_b"][row]))
        np.testing.assert_allclose(np.asarray(merged[f"layers_{layer}"]["self_attn"]["q_proj"]["kernel"]),
                                   want, rtol=1e-5, atol=1e-6)
    qkv = adapters["layers"]["sub_0"]["linear_attn"]["in_proj_qkv"]
    want = (np.asarray(base["layers_2"]["linear_attn"]["in_proj_qkv"]["kernel"])
            + 2.0 * np.asarray(qkv["lora_a"][1]) @ np.asarray(qkv["lora_b"][1]))
    np.testing.assert_allclose(np.asarray(merged["layers_2"]["linear_attn"]["in_proj_qkv"]["kernel"]),
                               want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["layers_2"]["linear_attn"]["A_log"]),
                                  np.asarray(base["layers_2"]["linear_attn"]["A_log"]))
