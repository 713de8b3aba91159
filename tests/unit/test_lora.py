"""LoRA students (effopd_jax/lora.py) at a tiny vocabulary, against independent references.

References: the base model's own forward (B = 0), numpy products and SVDs (merged weights, the
merged-space extrapolation and its rank-r truncation), and PEFT's ``PeftModel`` on the
``transformers`` base (the export).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effopd_jax import config as config_lib
from effopd_jax import lora, models, objectives, rollout, sampling
from effopd_jax import sharding as sharding_lib
from effopd_jax.config import default_config
from effopd_jax.effopd import effopd_host_search, effopd_search_due, find_effopd_state
from effopd_jax.models.qwen import QwenConfig
from effopd_jax.objectives import LossSettings, OPDBatch
from effopd_jax.trainer import make_optimizer, new_train_state, update_step

VOCAB, PROMPT, NEW, RANK = 40, 5, 6, 4
CONFIG = QwenConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype=jnp.float32,
                    tie_word_embeddings=True)
SCANNED = dataclasses.replace(CONFIG, scan_layers=True)
IDS = jnp.asarray(np.random.RandomState(0).randint(1, VOCAB, (2, 7)), jnp.int32)


@pytest.fixture(scope="module")
def mesh():
    return sharding_lib.make_mesh(devices=jax.devices()[:1])


def _params(config):
    return models.init_params(config, jax.random.key(1))


def _trained(adapters, seed: int = 3, scale: float = 0.3):
    """Adapters as after training: B (and A) moved away from their initial values."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, moved)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------
# The adapted model


@pytest.mark.parametrize("config, base_dtype", [(CONFIG, "float32"), (SCANNED, "bfloat16")],
                         ids=["unscanned-float32", "scanned-bfloat16"])
def test_with_b_zero_the_adapted_logits_are_the_bases_exactly(config, base_dtype):
    params = _params(config)
    adapter = lora.LoRA.for_model(config, rank=RANK, alpha=8.0, base_dtype=base_dtype)
    adapters, frozen = adapter.split(params)
    assert all(not np.any(np.asarray(b)) for path, b in _flat(adapters).items() if path.endswith("lora_b"))
    base = jax.tree.map(lambda x: x.astype(base_dtype), params)
    np.testing.assert_array_equal(np.asarray(models.forward(config, adapter.merge(adapters, frozen), IDS)),
                                  np.asarray(models.forward(config, base, IDS)))


@pytest.mark.parametrize("config", [CONFIG, SCANNED], ids=["unscanned", "scanned"])
def test_merged_and_unmerged_forwards_agree(config):
    adapter = lora.LoRA.for_model(config, rank=RANK, alpha=8.0, base_dtype="float32")
    adapters, frozen = adapter.split(_params(config))
    adapters = _trained(adapters)
    merged = models.forward(config, adapter.merge(adapters, frozen), IDS)
    unmerged = jax.jit(lambda p: lora.unmerged_forward(config, p, IDS, scale=adapter.scale))(
        lora.with_adapters(frozen, adapters))
    base = models.forward(config, frozen, IDS)
    assert float(jnp.max(jnp.abs(merged - base))) > 0.1  # the adapters matter
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=1e-5, rtol=0)


def test_merged_kernels_are_w_plus_scaled_product_in_numpy():
    adapter = lora.LoRA.for_model(CONFIG, rank=RANK, alpha=6.0, target=("q_proj", "mlp/down_proj"))
    assert adapter.modules == ("self_attn/q_proj", "mlp/down_proj") and adapter.scale == 1.5
    params = _params(CONFIG)
    adapters, frozen = adapter.split(params)
    adapters = _trained(adapters)
    merged, base, factors = _flat(adapter.merge(adapters, frozen)), _flat(params), _flat(adapters)
    for name, value in merged.items():
        module = name.rsplit("/", 1)[0]
        if f"{module}/lora_a" in factors:
            a, b = factors[f"{module}/lora_a"].astype(np.float64), factors[f"{module}/lora_b"].astype(np.float64)
            assert a.shape == base[name].shape[:-1] + (RANK,) and b.shape == (RANK, base[name].shape[-1])
            np.testing.assert_allclose(value, base[name] + 1.5 * a @ b, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(value, base[name])
    # A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default) and B = 0 at the start.
    a0 = _flat(adapter.split(params)[0])["layers_0/mlp/down_proj/lora_a"]
    bound = 1 / np.sqrt(CONFIG.intermediate_size)
    assert np.abs(a0).max() <= bound and a0.std() == pytest.approx(bound / np.sqrt(3), rel=0.2)


def test_targets_and_rank_are_checked():
    layout = models.layout(CONFIG)
    assert lora.resolve_targets(layout, ()) == layout.matrix_modules
    assert lora.resolve_targets(layout, ("up_proj", "self_attn/k_proj")) == ("self_attn/k_proj", "mlp/up_proj")
    with pytest.raises(ValueError, match=r"config\.lora\.target: 'lm_head' is not a matrix module"):
        lora.resolve_targets(layout, ("lm_head",))
    with pytest.raises(ValueError, match="named twice"):
        lora.resolve_targets(layout, ("q_proj", "self_attn/q_proj"))
    # k_proj is [16, 8]: a rank above 8 adds parameters, not expressiveness.
    with pytest.raises(ValueError, match=r"config\.lora\.rank: 9 is larger than min\(in, out\) = 8 of "
                                         r"self_attn/k_proj"):
        lora.LoRA.for_model(CONFIG, rank=9, alpha=1.0)


def test_config_group_and_dropout_refusal(tmp_path):
    assert config_lib.LORA_EFFOPD_SPACES == lora.EFFOPD_SPACES
    c = default_config()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1", "answer": "2"}\n')
    c.student.path = c.teachers[0].path = str(model)
    c.data.train_files = (str(prompts),)
    c.lora.rank = 4
    with pytest.raises(ValueError, match=r"config\.lora\.rank: only used with lora\.enabled=True"):
        config_lib.validate_config(c)
    c.lora.enabled = True
    config_lib.validate_config(c)
    c.lora.dropout = 0.1
    with pytest.raises(ValueError, match=r"config\.lora\.dropout: must be 0, got 0\.1: the OPD loss scores"):
        config_lib.validate_config(c)
    c.lora.dropout = 0.0
    c.lora.effopd_space = "merged"
    with pytest.raises(ValueError, match=r"config\.lora\.effopd_space: only used with lora\.enabled=True and "
                                         r"effopd\.enabled=True"):
        config_lib.validate_config(c)


# ---------------------------------------------------------------------------------------------
# Training: the update and EffOPD


@pytest.fixture(scope="module")
def batch(mesh):
    """A scored rollout of the base student (teacher log-probs from a second random model)."""
    params = _params(CONFIG)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(1, VOCAB, size=n).astype(np.int32) for n in (5, 3, 4, 2)]
    engine = rollout.make_rollout_engine(
        "static", model_config=CONFIG, mesh=mesh, prompt_length=PROMPT,
        settings=sampling.SamplingSettings(max_new_tokens=NEW, temperature=1.0, eos_token_ids=(0,)))
    out = engine.generate(params, prompts, jax.random.key(7))
    teacher = models.init_params(CONFIG, jax.random.key(2))
    teacher_logprobs = objectives.response_logprobs(CONFIG, teacher, out.prompt_ids, out.prompt_mask,
                                                    out.response_ids, out.response_mask, temperature=1.0,
                                                    chunk_size=4)
    return OPDBatch(*out, teacher_logprobs=jnp.where(out.response_mask, teacher_logprobs, 0.0))


def _lora_training(adapter, mesh, *, effopd: bool):
    config = default_config()
    config.optimizer.learning_rate = 3e-2
    config.effopd.enabled = effopd
    adapters, frozen = adapter.split(_params(CONFIG))
    optimizer, _ = make_optimizer(config.optimizer, total_steps=10, effopd_config=config.effopd,
                                  param_filter=adapter.param_filter(models.layout(CONFIG)))
    state = new_train_state(adapters, optimizer, seed=0, mesh=mesh)
    step = jax.jit(functools.partial(
        update_step, optimizer=optimizer, model_config=CONFIG, parameterization=adapter,
        loss=objectives.get_loss("sampled_token"), settings=LossSettings(chunk_size=4)))
    return state, frozen, step


def _assert_only_adapted_kernels_moved(adapter, trainable, frozen, base):
    merged, base = _flat(adapter.merge(trainable, frozen)), _flat(base)
    adapted = {"/".join(path) for path in adapter.kernel_paths}
    for name, value in merged.items():
        if name in adapted:
            assert not np.array_equal(value, base[name]), name
        else:
            np.testing.assert_array_equal(value, base[name], err_msg=name)


def test_a_step_moves_only_the_adapters_and_adam_holds_only_them(mesh, batch):
    adapter = lora.LoRA.for_model(CONFIG, rank=RANK, alpha=8.0, target=("q_proj", "v_proj", "up_proj"),
                                  base_dtype="float32")
    state, frozen, step = _lora_training(adapter, mesh, effopd=False)
    names = set(_flat(state.trainable_params))
    assert names == {f"layers_{i}/{m}/{f}" for i in range(2) for m in ("self_attn/q_proj", "self_attn/v_proj",
                                                                       "mlp/up_proj") for f in ("lora_a", "lora_b")}
    mu, nu = optax.tree.get(state.opt_state, "mu"), optax.tree.get(state.opt_state, "nu")
    assert jax.tree.structure(mu) == jax.tree.structure(nu) == jax.tree.structure(state.trainable_params)
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(state.trainable_params))
    moment_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2)
    assert moment_bytes == 2 * adapter_bytes  # Adam's two moments, over the adapters only
    frozen_before = _flat(frozen)
    new_state, metrics = step(state, batch, frozen)
    assert not bool(metrics["update_skipped"])
    moved = _flat(new_state.trainable_params)
    for name, value in _flat(state.trainable_params).items():
        assert not np.array_equal(moved[name], value), name  # B from its gradient, A from weight decay
    _assert_only_adapted_kernels_moved(adapter, new_state.trainable_params, frozen, _params(CONFIG))
    for name, value in _flat(frozen).items():
        np.testing.assert_array_equal(value, frozen_before[name])


@pytest.mark.parametrize("space", ["factors", "merged"])
def test_effopd_on_adapters_triggers_at_1_2_4_8_and_moves_only_adapters(mesh, batch, space):
    adapter = lora.LoRA.for_model(CONFIG, rank=RANK, alpha=8.0, base_dtype="float32", effopd_space=space)
    state, frozen, step = _lora_training(adapter, mesh, effopd=True)
    base = _params(CONFIG)
    b_paths = [p for p in _flat(state.trainable_params) if p.endswith("lora_b")]

    def score(candidate):  # rewards a larger merged update, so candidates get accepted
        return float(sum(jnp.sum(jnp.square(x)) for x in lora.adapter_product(candidate, adapter.scale).values()))

    searched = []
    for update in range(1, 9):
        state, _ = step(state, batch, frozen)
        due = effopd_search_due(state.opt_state)
        if not due:
            continue
        searched.append(update)
        theta, anchor = state.trainable_params, find_effopd_state(state.opt_state).anchor
        params, opt_state, report = effopd_host_search(theta, state.opt_state, score_fn=score,
                                                       extrapolate=adapter.effopd_extrapolation())
        assert report.accepted_index > 0
        m = report.accepted_multiplier
        if update == 1:
            # The first search: the anchor's B is 0, so the merged update is extrapolated exactly
            # in both spaces up to the factors' quadratic term; the merged space keeps A as it is.
            delta_theta, delta_new = (lora.adapter_product(t, adapter.scale) for t in (theta, params))
            if space == "merged":
                assert adapter.refactor_error(theta, anchor, m) < 1e-5
                for name in delta_theta:
                    np.testing.assert_allclose(np.asarray(delta_new[name]), m * np.asarray(delta_theta[name]),
                                               rtol=1e-4, atol=1e-6)
                for name, value in _flat(params).items():
                    if name.endswith("lora_a"):
                        np.testing.assert_allclose(value, _flat(theta)[name], rtol=1e-5, atol=1e-6)
        state = state._replace(trainable_params=params, opt_state=opt_state)
        # The anchor holds the adapters only (both factors of every matrix) and moved to the point.
        anchor = _flat(find_effopd_state(opt_state).anchor)
        assert set(anchor) == set(_flat(params)) and set(b_paths) <= set(anchor)
        for name, value in anchor.items():
            np.testing.assert_array_equal(value, _flat(params)[name])
        _assert_only_adapted_kernels_moved(adapter, params, frozen, base)
    assert searched == [1, 2, 4, 8]


def test_factors_and_merged_extrapolation_differ_by_the_quadratic_term():
    rng = np.random.default_rng(0)
    a_b, b_b = rng.normal(size=(12, 3)), rng.normal(size=(3, 10))
    a_t, b_t = a_b + 0.1 * rng.normal(size=a_b.shape), b_b + 0.1 * rng.normal(size=b_b.shape)
    m = 5.0
    factors = (a_b + m * (a_t - a_b)) @ (b_b + m * (b_t - b_b)) - a_b @ b_b
    merged = m * (a_t @ b_t - a_b @ b_b)
    np.testing.assert_allclose(factors - merged, (m * m - m) * (a_t - a_b) @ (b_t - b_b), atol=1e-10)


def test_merged_refactoring_is_exact_iff_rank_allows_and_else_the_best_rank_r():
    rng = np.random.default_rng(1)
    r, m = 3, 5.0

    def run(a_b, b_b, a_t, b_t):
        node = lambda a, b: {"q": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}}
        theta, anchor = node(a_t, b_t), node(a_b, b_b)
        point = lora.extrapolate_merged(theta, anchor, jnp.float32(m), rank=r)
        product = np.asarray(point["q"]["lora_a"], np.float64) @ np.asarray(point["q"]["lora_b"], np.float64)
        return point, product, float(lora.refactor_error(theta, anchor, jnp.float32(m), rank=r))

    # Same column space (A_t = A_B): rank(P(m)) <= r, exact.
    a_b, b_b, b_t = rng.normal(size=(12, r)), rng.normal(size=(r, 10)), rng.normal(size=(r, 10))
    _, product, error = run(a_b, b_b, a_b, b_t)
    np.testing.assert_allclose(product, a_b @ b_b + m * (a_b @ b_t - a_b @ b_b), rtol=1e-4, atol=1e-4)
    assert error < 1e-5
    # Generic: rank up to 2r; the result is numpy's rank-r truncation of P(m) (Eckart-Young).
    a_t = rng.normal(size=(12, r))
    target = a_b @ b_b + m * (a_t @ b_t - a_b @ b_b)
    _, product, error = run(a_b, b_b, a_t, b_t)
    u, s, vt = np.linalg.svd(target)
    np.testing.assert_allclose(product, (u[:, :r] * s[:r]) @ vt[:r], rtol=1e-4, atol=1e-3)
    expected = np.linalg.norm(s[r:]) / np.linalg.norm(target - a_b @ b_b)
    assert error == pytest.approx(expected, rel=1e-3) and error > 0.01


# ---------------------------------------------------------------------------------------------
# The PEFT export


@pytest.mark.parametrize("model_type, scan", [("qwen3", True), ("qwen2", False)])
def test_peft_export_loads_with_peft_and_gives_our_logits(tmp_path, model_type, scan):
    import peft
    import torch
    from helpers_hf import load_torch_model, make_tiny_hf_checkpoint

    base_dir = make_tiny_hf_checkpoint(tmp_path, model_type, tie=False, num_kv_heads=2)
    config, params = models.load_hf(str(base_dir), param_dtype=jnp.float32, compute_dtype=jnp.float32,
                                    scan_layers=scan)
    adapter = lora.LoRA.for_model(config, rank=4, alpha=12.0, target=("q_proj", "o_proj", "gate_proj", "down_proj"),
                                  base_dtype="float32", seed=5)
    adapters, frozen = adapter.split(params)
    adapters = _trained(adapters, scale=0.2)
    out = tmp_path / "peft"
    lora.save_peft(config, adapter, adapters, str(out), base_model_name_or_path=str(base_dir))

    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["peft_type"]) == (4, 12.0, "LORA")
    assert sorted(written["target_modules"]) == ["down_proj", "gate_proj", "o_proj", "q_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.1.mlp.down_proj"
    assert tensors[f"{name}.lora_A.weight"].shape == (4, 96) and tensors[f"{name}.lora_B.weight"].shape == (64, 4)
    assert len(tensors) == 2 * 4 * 2  # two factors, four modules, two layers

    model = peft.PeftModel.from_pretrained(load_torch_model(base_dir), str(out)).eval()
    ids = np.random.RandomState(0).randint(0, 128, (2, 9))
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(ids)).logits.float().numpy()
    ours = np.asarray(models.forward(config, adapter.merge(adapters, frozen), jnp.asarray(ids)))
    base = np.asarray(models.forward(config, params, jnp.asarray(ids)))
    assert np.abs(ours - base).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_split_places_adapters_like_their_kernels_on_a_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    params = models.init_params(SCANNED, jax.random.key(1), sharding_lib.param_shardings(SCANNED, mesh))
    adapter = lora.LoRA.for_model(SCANNED, rank=RANK, alpha=8.0, base_dtype="bfloat16")
    adapters, frozen = adapter.split(params)
    for path in adapter.kernel_paths:
        spec = tuple(lora._get(params, path).sharding.spec)
        assert tuple(lora._get(adapters, lora.adapter_path(path, "lora_a")).sharding.spec) == spec[:-1] + (None,)
        b_spec = tuple(lora._get(adapters, lora.adapter_path(path, "lora_b")).sharding.spec)
        assert b_spec == spec[:-2] + (None, spec[-1])
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)):
        assert after.dtype == jnp.bfloat16 and after.sharding.is_equivalent_to(before.sharding, before.ndim)


def test_analysis_refuses_a_parameterization_it_cannot_merge(tmp_path):
    from effopd_jax import analyze, checkpoint

    run = checkpoint.RunCheckpointer(str(tmp_path / "checkpoints"), async_save=False)
    adapters = {"layers_0": {"self_attn": {"q_proj": {"lora_a": jnp.ones((16, 2)), "lora_b": jnp.ones((2, 16))}}}}
    run.save(1, {"trainable_params": adapters, "step": jnp.int32(1)}, {},
             {"step": 1, checkpoint.META_PARAMETERIZATION: {"name": "ia3"}})
    run.save(2, {"trainable_params": adapters, "step": jnp.int32(2)}, {},
             {"step": 2, checkpoint.META_PARAMETERIZATION: {"name": "lora", "rank": 2, "alpha": 4.0}})
    run.close()
    with pytest.raises(ValueError, match="names the parameterization 'ia3', which the analysis cannot"):
        analyze.load_checkpoint(str(tmp_path / "checkpoints" / "1"), base_params={})
    with pytest.raises(ValueError, match=r"holds LoRA adapters only \(rank 2\); put the base model"):
        analyze.load_checkpoint(str(tmp_path / "checkpoints" / "2"))
    base = {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.zeros((16, 16))}}}}
    _, merged = analyze.load_checkpoint(str(tmp_path / "checkpoints" / "2"), base_params=base)
    np.testing.assert_allclose(np.asarray(merged["layers_0"]["self_attn"]["q_proj"]["kernel"]), 2.0 * 2.0, rtol=0)
