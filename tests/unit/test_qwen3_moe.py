"""Qwen3-MoE and the shared MoE block (effopd_jax/models/qwen3_moe.py, models/moe.py).

References: transformers' `Qwen3MoeForCausalLM` (logits, load-balancing loss, tensor names), the
dense all-experts computation (grouped dispatch, forward and gradient), the single-device model
(expert parallelism on 8 virtual devices), the uncached forward (KV cache), numpy (routing
statistics, monitor aggregation), the safetensors files themselves (round trip, host memory).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import weakref
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from effopd_jax import models, monitor, objectives, rollout, sampling
from effopd_jax import sharding as sharding_lib
from effopd_jax.config import default_config
from effopd_jax.models import hf, moe
from effopd_jax.models.qwen import QwenConfig
from effopd_jax.models.qwen3_moe import Qwen3MoeConfig
from effopd_jax.objectives import LossSettings, OPDBatch
from effopd_jax.teachers import Teacher
from effopd_jax.trainer import FullFineTuning, make_optimizer, new_train_state, setup, update_step
from helpers_hf import load_torch_model, torch_logits
from helpers_moe import MOE_VARIANTS, make_tiny_moe_checkpoint, make_tiny_moe_hf_config, randomize_
from helpers_tiny import REPO_ROOT

QWEN_MOE_CONFIGS = Path(REPO_ROOT) / "third_party" / "qwen_configs" / "qwen_moe_configs.json"
F32 = dict(compute_dtype="float32")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {variant: make_tiny_moe_checkpoint(root, variant) for variant in MOE_VARIANTS}


def _padded_batch(seed: int = 0, rows: int = 3, seq: int = 9):
    """Token ids and a mask with left padding of 0, 3 and 5 tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, 128, (rows, seq))
    mask = np.ones((rows, seq), np.int32)
    for row, pad in enumerate((0, 3, 5)[:rows]):
        mask[row, :pad] = 0
    return ids, mask


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(config, params, ids, mask):
    return models.forward(config, params, ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(MOE_VARIANTS))
def test_logits_match_transformers_with_left_padding(checkpoints, variant):
    path = checkpoints[variant]
    config, params = models.load_hf(path, **F32)
    hf = make_tiny_moe_hf_config(variant)
    assert config.sparse_layers == tuple(
        type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in load_torch_model(path).model.layers)
    ids, mask = _padded_batch()
    want = torch_logits(path, ids, attention_mask=mask)
    got = np.asarray(_forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.max(np.abs(got - want)[real]) <= 1e-4
    assert 0.3 < np.std(want[real]) < 30  # random weights give O(1) logits: the test has teeth
    assert config.norm_topk_prob == hf.norm_topk_prob


def test_router_losses_match_transformers(checkpoints):
    path = checkpoints["mixed"]
    config, params = models.load_hf(path, **F32)
    config = dataclasses.replace(config, output_router_logits=True, router_z_loss_coef=0.5)
    ids, mask = _padded_batch(1)
    model = load_torch_model(path)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)),
                    output_router_logits=True)
    logits, aux = jax.jit(functools.partial(models.forward_with_aux, config))(
        params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(aux.metrics["moe/load_balancing_loss"]), float(out.aux_loss), rtol=1e-5)
    # z-loss: mean over the real tokens of every MoE layer of logsumexp(router logits)^2.
    lse = [torch.logsumexp(g.float(), -1).numpy() for g in out.router_logits]
    z_want = sum(float(np.sum(l ** 2 * mask.reshape(-1))) for l in lse) / (mask.sum() * len(lse))
    np.testing.assert_allclose(float(aux.metrics["moe/router_z_loss"]), z_want, rtol=1e-5)
    np.testing.assert_allclose(float(aux.loss), 0.001 * float(out.aux_loss) + 0.5 * z_want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(_forward(config, params, jnp.asarray(ids),
                                                                       jnp.asarray(mask))), atol=1e-6)
    # HF's default (output_router_logits false): the statistics are reported, nothing is added.
    stats = moe.RouterStats(jnp.full((8,), 3.0), jnp.full((8,), 1.5), jnp.asarray(2.0), jnp.asarray(12.0))
    off = moe.router_aux_output(dataclasses.replace(config, output_router_logits=False, router_z_loss_coef=0.0), stats)
    assert float(off.loss) == 0.0 and float(off.metrics["moe/load_balancing_loss"]) == pytest.approx(8 * 8 * 0.25 * 0.125)


# ---------------------------------------------------------------------------------------------
# Checkpoints: layout, round trip, streaming
# ---------------------------------------------------------------------------------------------
def test_layout_names_every_transformers_tensor_and_round_trips_exactly(checkpoints, tmp_path):
    for variant, path in checkpoints.items():
        original = load_file(str(path / "model.safetensors"))
        for scan in (False, True) if variant == "sparse_bias" else (False,):
            config, params = models.load_hf(path, scan_layers=scan, **F32)
            layout = models.layout(config)
            assert {n for info in layout.params for n in info.hf_names} == set(original), variant
            out = tmp_path / f"{variant}_{scan}"
            models.save_hf(config, params, out)
            again = load_file(str(out / "model.safetensors"))
            assert set(again) == set(original)
            for name, tensor in original.items():
                np.testing.assert_array_equal(again[name], tensor, err_msg=name)
            assert models.config_from_hf(out, dtype="float32") == dataclasses.replace(config, scan_layers=False)
    # The expert stacks: [E, H, I] per layer, [L, E, H, I] scanned, one HF tensor per expert.
    config = models.config_from_hf(checkpoints["sparse_bias"], scan_layers=True)
    info = models.layout(config).find("layers/mlp/experts/down_proj/kernel")
    assert info.stack_axes == ("layers", "experts") and info.experts == 8
    assert info.hf_names[:2] == ("model.layers.0.mlp.experts.0.down_proj.weight",
                                 "model.layers.0.mlp.experts.1.down_proj.weight")
    assert models.abstract_params(config)["layers"]["mlp"]["experts"]["down_proj"]["kernel"].shape == (2, 8, 32, 64)


def test_loading_and_saving_hold_about_one_layer_on_the_host(tmp_path, monkeypatch):
    """A scanned leaf is streamed layer by layer: the host never holds a whole [L, E, H, I] stack.

    Loading: the host blocks the reader builds are tracked until freed (on the CPU backend a
    device buffer may alias its host block, so this also covers the device copy); about two
    layers' blocks are alive at once (the one being written and the next one read, plus a small
    leaf), well under half the stack. Saving: every array fetched to the host is at most one
    layer of a leaf."""
    path = make_tiny_moe_checkpoint(tmp_path, "sparse_bias", num_hidden_layers=6, num_experts=16,
                                    moe_intermediate_size=64)
    config = models.config_from_hf(path, scan_layers=True)
    stack = models.abstract_params(config)["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
    stack_bytes = math.prod(stack.shape) * 4
    layer_bytes = stack_bytes // config.num_hidden_layers

    live, peak = [0], [0]
    reader = hf._block_reader

    def tracked_reader(*args):
        fetch = reader(*args)

        def tracked(index):
            block = fetch(index)
            live[0] += block.nbytes
            peak[0] = max(peak[0], live[0])
            weakref.finalize(block, lambda n=block.nbytes: live.__setitem__(0, live[0] - n))
            return block

        return tracked

    monkeypatch.setattr(hf, "_block_reader", tracked_reader)
    config, params = jax.block_until_ready(models.load_hf(path, scan_layers=True))
    assert peak[0] <= 2.5 * layer_bytes < stack_bytes / 2, (peak[0], layer_bytes)

    fetched = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: fetched.append(x.nbytes) or device_get(x))
    models.save_hf(config, params, tmp_path / "out")
    assert max(fetched) == layer_bytes, (max(fetched), layer_bytes)
    original = load_file(str(path / "model.safetensors"))
    again = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in original.items():
        np.testing.assert_array_equal(again[name], tensor)


def test_published_qwen3_30b_a3b_config_builds_with_its_parameter_count():
    hf = json.loads(QWEN_MOE_CONFIGS.read_text())["Qwen/Qwen3-30B-A3B"]
    config = Qwen3MoeConfig.from_hf(hf, scan_layers=True)
    assert (config.num_experts, config.num_experts_per_tok, config.head_dim, config.norm_topk_prob) == (128, 8, 128, True)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(models.abstract_params(config)))
    H, L, E, I, V = 2048, 48, 128, 768, 151936
    q, kv = 32 * 128, 4 * 128
    attention = H * q + 2 * H * kv + q * H + 2 * 128
    want = 2 * V * H + H + L * (attention + 2 * H + H * E + E * 3 * H * I)
    assert count == want and 30.4e9 < count < 30.6e9
    assert Qwen3MoeConfig.from_hf(config.to_hf()) == dataclasses.replace(config, scan_layers=False)


@pytest.mark.parametrize("change, field", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"mlp_only_layers": [7]}, "mlp_only_layers"),
])
def test_bad_configs_are_refused_naming_the_field(change, field):
    hf = {**make_tiny_moe_hf_config("mixed").to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        models.config_from_hf(hf)


def test_scan_needs_one_kind_of_layer_and_the_impl_is_checked():
    hf = make_tiny_moe_hf_config("mixed").to_dict()
    with pytest.raises(ValueError, match="scan_layers"):
        models.config_from_hf(hf, scan_layers=True)
    with pytest.raises(ValueError, match="moe_impl"):
        Qwen3MoeConfig.from_hf(hf, moe_impl="megablocks")


# ---------------------------------------------------------------------------------------------
# The MoE block: grouped dispatch vs the dense oracle
# ---------------------------------------------------------------------------------------------
def _expert_problem(tokens=40, hidden=16, inter=8, experts=8, k=2, seed=0, skew=0.0):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(tokens, hidden), jnp.float32)
    weights = [jnp.asarray(rng.randn(experts, hidden, inter) / 4, jnp.float32),
               jnp.asarray(rng.randn(experts, hidden, inter) / 4, jnp.float32),
               jnp.asarray(rng.randn(experts, inter, hidden) / 3, jnp.float32)]
    bias = np.zeros(experts)
    bias[0], bias[-1] = skew, -10 * skew  # skew > 0 crowds expert 0 and starves the last one
    logits = x @ jnp.asarray(rng.randn(hidden, experts), jnp.float32) + jnp.asarray(bias, jnp.float32)
    return x, weights, logits


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_grouped_dispatch_equals_the_dense_all_experts_oracle(impl, norm_topk_prob):
    x, (wg, wu, wd), logits = _expert_problem(skew=2.0)
    routing = moe.route(logits, 2, norm_topk_prob)
    counts = np.bincount(np.asarray(routing.experts).ravel(), minlength=8)
    assert counts.max() > 16 and counts.min() == 0  # several blocks of 8 for one expert, one idle

    def loss(fn, x, wg, wu, wd, w):
        return jnp.sum(jnp.sin(fn(x, routing.experts, w, wg, wu, wd)))

    grouped = functools.partial(moe.local_expert_ffn, dtype=jnp.float32, impl=impl, block=8)
    args = (x, wg, wu, wd, routing.weights)
    np.testing.assert_allclose(grouped(x, routing.experts, routing.weights, wg, wu, wd),
                               moe.dense_expert_ffn_reference(x, routing.experts, routing.weights, wg, wu, wd),
                               atol=2e-6)
    got = jax.jit(jax.grad(functools.partial(loss, grouped), argnums=range(5)))(*args)
    want = jax.grad(functools.partial(loss, moe.dense_expert_ffn_reference), argnums=range(5))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    # HF's routing: softmax, top-k of the probabilities, renormalised only with norm_topk_prob.
    probs = torch.softmax(torch.as_tensor(np.array(logits)), -1)
    top, idx = torch.topk(probs, 2, -1)
    if norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    np.testing.assert_array_equal(np.asarray(routing.experts), idx.numpy())
    np.testing.assert_allclose(np.asarray(routing.weights), top.numpy(), rtol=1e-6)


def test_blocked_buffers_are_bounded_and_router_stats_are_masked_sums():
    assert moe.default_block_rows(8192, 64) == 64 and moe.default_block_rows(16, 8) == 8
    assert moe.default_block_rows(10**6, 8) == moe.MAX_BLOCK_ROWS
    assert moe.blocked_capacity(100, 8, 8) == 160  # 100 + 8 * 7 rows, rounded up to blocks
    x, _, logits = _expert_problem(tokens=6)
    routing = moe.route(logits, 2, False)
    mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
    stats = moe.router_stats(routing, jnp.asarray(mask))
    onehot = np.zeros((6, 8))
    np.add.at(onehot, (np.arange(6)[:, None], np.asarray(routing.experts)), 1)
    np.testing.assert_allclose(stats.assignments, mask @ onehot)
    np.testing.assert_allclose(stats.probs, mask @ np.asarray(routing.probs), rtol=1e-6)
    assert float(stats.tokens) == 4
    # Pooled over "layers": a balanced router gives exactly k.
    balanced = moe.RouterStats(jnp.full((8,), 2.0), jnp.full((8,), 1.0), jnp.zeros(()), jnp.asarray(8.0))
    assert float(moe.load_balancing_loss(balanced)) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# Expert parallelism, scan, cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_expert_parallel_on_8_devices_equals_one_device(checkpoints, mesh_shape):
    """Experts split over fsdp (8 devices: one expert each; or 2 x 2 x 2 with tensor-parallel
    expert columns): the sharded model's logits equal the single-device model's."""
    config, params = models.load_hf(checkpoints["step2_tied"], **F32)
    ids, mask = _padded_batch(2)
    ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])
    want = np.asarray(_forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    mesh = sharding_lib.make_mesh(*mesh_shape)
    shardings = sharding_lib.param_shardings(config, mesh)
    assert shardings["layers_1"]["mlp"]["experts"]["gate_proj"]["kernel"].spec == \
        jax.sharding.PartitionSpec("fsdp", None, "tensor")
    sharded = jax.device_put(params, shardings)
    down = sharded["layers_1"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert down.addressable_shards[0].data.shape[0] == 8 // mesh_shape[1]  # E/n whole experts
    forward = jax.jit(lambda p, i, m: models.forward(config, p, i, attention_mask=m))
    with sharding_lib.sharding_context(mesh):
        got = np.asarray(forward(sharded, jnp.asarray(ids), jnp.asarray(mask)))
        lowered = forward.lower(sharded, jnp.asarray(ids), jnp.asarray(mask)).as_text()
    assert "all_gather" in lowered and "reduce_scatter" in lowered  # the expert-parallel path ran
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_expert_parallel_gradient_equals_one_device():
    x, (wg, wu, wd), logits = _expert_problem(tokens=30, skew=1.0)  # 30: padded to 32 tokens
    routing = moe.route(logits, 2, True)

    def loss(x, wg, wu, wd, w):
        out = moe.expert_ffn(x, routing.experts, w, wg, wu, wd, dtype=jnp.float32)
        return jnp.sum(jnp.sin(out))

    args = (x, wg, wu, wd, routing.weights)
    want = jax.grad(loss, argnums=range(5))(*args)
    with sharding_lib.sharding_context(sharding_lib.make_mesh(1, 8, 1)):
        value, got = jax.jit(jax.value_and_grad(loss, argnums=range(5)))(*args)
    np.testing.assert_allclose(float(value), float(loss(*args)), rtol=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_scan_and_remat_match_the_unscanned_model(checkpoints):
    path = checkpoints["sparse_bias"]
    config, params = models.load_hf(path, **F32)
    scanned_config, scanned = models.load_hf(path, scan_layers=True, remat="dots", **F32)
    ids, mask = _padded_batch(4)
    want = _forward(config, params, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(_forward(scanned_config, scanned, jnp.asarray(ids), jnp.asarray(mask)), want,
                               atol=1e-5)
    # The router statistics are sown from inside the scan (and remat) too.
    aux = functools.partial(models.forward_with_aux, attention_mask=jnp.asarray(mask))
    a = jax.jit(lambda p: aux(config, p, jnp.asarray(ids))[1].metrics)(params)
    b = jax.jit(lambda p: aux(scanned_config, p, jnp.asarray(ids))[1].metrics)(scanned)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5)


def test_kv_cache_decode_equals_the_uncached_forward(checkpoints):
    config, params = models.load_hf(checkpoints["step2_tied"], **F32)
    ids, mask = _padded_batch(5)
    full = np.asarray(_forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    seq = ids.shape[1]
    cache = models.init_cache(config, batch=3, max_len=seq, dtype=jnp.float32)
    step = jax.jit(lambda p, t, m, c: models.forward(config, p, t, attention_mask=m, cache=c))
    slots = lambda n: jnp.asarray(mask * (np.arange(seq) < n))  # noqa: E731
    out, cache = step(params, jnp.asarray(ids[:, :6]), slots(6), cache)
    outs = [np.asarray(out)]
    for t in range(6, seq):
        out, cache = step(params, jnp.asarray(ids[:, t:t + 1]), slots(t + 1), cache)
        outs.append(np.asarray(out))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(outs, 1)[real], full[real], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Training: the OPD step, EffOPD's filter, the monitor
# ---------------------------------------------------------------------------------------------
VOCAB, PROMPT, NEW = 40, 5, 6
STUDENT = QwenConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, dtype=jnp.float32,
                     tie_word_embeddings=True)
MOE = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                     initializer_range=0.2, dtype=jnp.float32)


def _token_logprobs(config, params, out):
    """log softmax(logits)[token] of every response token, from one unchunked forward."""
    ids = jnp.concatenate([out.prompt_ids, out.response_ids], axis=1)
    mask = jnp.concatenate([out.prompt_mask, out.response_mask], axis=1)
    logits = np.asarray(_forward(config, params, ids, mask), np.float64)[:, PROMPT - 1:-1]
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return np.take_along_axis(logits, np.asarray(out.response_ids)[..., None], -1)[..., 0] - logz


@pytest.fixture(scope="module")
def opd_rollout():
    mesh = sharding_lib.make_mesh(devices=jax.devices()[:1])
    student = models.init_params(STUDENT, jax.random.key(1))
    rng = np.random.RandomState(0)
    prompts = [rng.randint(1, VOCAB, size=n).astype(np.int32) for n in (5, 3, 4, 2)]
    engine = rollout.make_rollout_engine(
        "static", model_config=STUDENT, mesh=mesh, prompt_length=PROMPT,
        settings=sampling.SamplingSettings(max_new_tokens=NEW, temperature=1.0, eos_token_ids=(0,)))
    return mesh, student, engine.generate(student, prompts, jax.random.key(7))


def _optimizer_and_state(config, params, mesh, learning_rate=1e-2):
    c = default_config()
    c.optimizer.learning_rate = learning_rate
    optimizer, _ = make_optimizer(c.optimizer, total_steps=10, effopd_config=c.effopd,
                                  param_filter=FullFineTuning().param_filter(models.layout(config)))
    return optimizer, new_train_state(params, optimizer, seed=0, mesh=mesh)


def test_opd_step_with_a_moe_teacher_and_a_dense_student(opd_rollout):
    mesh, student, out = opd_rollout
    teacher_params = models.init_params(MOE, jax.random.key(2))
    teacher = Teacher(name="moe", config=MOE, params=teacher_params, output="token_logprobs",
                      temperature=1.0, chunk_size=4)
    batch = teacher.score(out, OPDBatch(*out))
    valid = np.asarray(out.response_mask)
    t = _token_logprobs(MOE, teacher_params, out)
    np.testing.assert_allclose(np.asarray(batch.teacher_logprobs)[valid], t[valid], atol=2e-5)
    assert np.std(t[valid]) > 0.1  # the MoE teacher's scores are not flat
    optimizer, state = _optimizer_and_state(STUDENT, student, mesh)
    step = jax.jit(functools.partial(update_step, optimizer=optimizer, model_config=STUDENT,
                                     parameterization=FullFineTuning(),
                                     loss=objectives.get_loss("sampled_token"), settings=LossSettings(chunk_size=4)))
    new_state, metrics = step(state, batch, {})
    s = _token_logprobs(STUDENT, student, out)
    per_sequence = np.sum(np.where(valid, -(t - s), 0.0), 1) / valid.sum(1)
    assert float(metrics["loss"]) == pytest.approx(per_sequence.mean(), rel=1e-4, abs=1e-6)
    assert "aux_loss" not in metrics and not bool(metrics["update_skipped"])  # a dense student adds nothing
    assert int(new_state.step) == 1


def test_a_moe_student_trains_with_the_load_balancing_loss(opd_rollout):
    mesh, _, out = opd_rollout
    student = dataclasses.replace(MOE, output_router_logits=True, router_aux_loss_coef=0.3)
    params = models.init_params(student, jax.random.key(4))
    teacher = Teacher(name="dense", config=STUDENT, params=models.init_params(STUDENT, jax.random.key(5)),
                      output="token_logprobs", temperature=1.0, chunk_size=4)
    s = _token_logprobs(student, params, out)
    valid = np.asarray(out.response_mask)
    # The rollout came from another policy: make the behaviour log-probs this student's own, so
    # the importance weight is 1 and the objective is the plain formula below.
    out = out._replace(behaviour_logprobs=jnp.asarray(np.where(valid, s, 0.0), jnp.float32))
    batch = teacher.score(out, OPDBatch(*out))
    optimizer, state = _optimizer_and_state(student, params, mesh)
    step = jax.jit(functools.partial(update_step, optimizer=optimizer, model_config=student,
                                     parameterization=FullFineTuning(),
                                     loss=objectives.get_loss("sampled_token"), settings=LossSettings(chunk_size=4)))
    new_state, metrics = step(state, batch, {})
    # (The balancing loss itself is checked against transformers in test_router_losses_*.)
    balance = float(metrics["moe/load_balancing_loss"])
    assert 1.9 < balance < 4.0  # k = 2 when perfectly balanced
    assert float(metrics["aux_loss"]) == pytest.approx(0.3 * balance, rel=1e-5)
    objective = float(metrics["loss"]) - float(metrics["aux_loss"])
    t = np.asarray(batch.teacher_logprobs, np.float64)
    assert objective == pytest.approx(np.mean(np.sum(np.where(valid, -(t - s), 0.0), 1) / valid.sum(1)), rel=1e-4)
    # The router learns (its gradient includes the balancing term), the experts too.
    for name in ("gate", "experts"):
        before = jax.tree.leaves(state.trainable_params["layers_0"]["mlp"][name])
        after = jax.tree.leaves(new_state.trainable_params["layers_0"]["mlp"][name])
        assert all(not np.array_equal(a, b) for a, b in zip(before, after)), name


def test_trainer_setup_applies_the_router_loss_weights_and_refuses_them_for_dense_students():
    spec = default_config().student
    spec.router_aux_loss_coef = 0.01
    moe_config = setup.with_router_losses(MOE, spec, "student")
    assert (moe_config.output_router_logits, moe_config.router_aux_loss_coef) == (True, 0.01)
    with pytest.raises(ValueError, match="config.student.router_aux_loss_coef=0.01.*no router"):
        setup.with_router_losses(STUDENT, spec, "student")
    assert setup.with_router_losses(STUDENT, default_config().student, "student") is STUDENT
    from effopd_jax import plan  # noqa: PLC0415
    spec.hf_name = "Qwen/Qwen3-30B-A3B"  # the memory plan builds the same student
    planned = plan.model_config(spec, "student")
    assert (planned.output_router_logits, planned.router_aux_loss_coef) == (True, 0.01)


def test_effopd_extrapolates_attention_and_experts_but_not_the_router():
    layout = models.layout(dataclasses.replace(MOE, mlp_only_layers=(1,)))
    chosen = layout.extrapolated_names()
    assert "layers_0/mlp/experts/gate_proj/kernel" in chosen and "layers_0/self_attn/q_proj/kernel" in chosen
    assert "layers_1/mlp/gate_proj/kernel" in chosen  # the dense layer's MLP
    assert "layers_0/mlp/gate/kernel" not in chosen and "layers_0/input_layernorm/scale" not in chosen
    assert layout.module_groups()["router"] == ("mlp/gate",)


@pytest.mark.parametrize("scan", [False, True])
def test_monitor_analyses_each_expert_and_aggregates_a_layers_stack(scan):
    config = dataclasses.replace(MOE, scan_layers=scan)
    layout = models.layout(config)
    params_0 = models.init_params(config, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params_0)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params_t = jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    kernels = monitor.module_kernels(params_t, layout)
    assert kernels["mlp/experts/down_proj"].shape == (2 * 4, 16, 24)
    assert layout.module_rows("mlp/experts/down_proj")[:5] == ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0))
    rebuilt = monitor.replace_module_kernels(params_t, layout, kernels)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(params_t)):
        np.testing.assert_array_equal(a, b)
    if not scan:
        return  # the monitor pass itself: scanned only (one compilation)
    state = monitor.init_monitor_state(params_0, layout)
    cfg = monitor.MonitorConfig(k=2, full_spectrum=True)
    _, metrics = monitor.monitor_step(state, params_t, jax.random.key(2), config=cfg, layout=layout)
    delta = np.asarray(kernels["mlp/experts/up_proj"] - monitor.module_kernels(params_0, layout)["mlp/experts/up_proj"])
    per_expert = np.sqrt(np.sum(delta ** 2, axis=(1, 2))).reshape(2, 4)
    np.testing.assert_allclose(metrics["monitor/layers_1/mlp/experts/up_proj/update_norm"],
                               np.sqrt(np.sum(per_expert[1] ** 2)), rtol=1e-5)
    layer_alloc = sum(float(v) for k, v in metrics.items() if k.startswith("monitor/layers_0/") and k.endswith("/alloc"))
    assert layer_alloc == pytest.approx(1.0, abs=1e-5)
    assert "monitor/mean/mlp/gate/erank" in metrics


def test_the_qwen3_30b_a3b_teacher_config_validates_and_its_teacher_splits_over_8_devices(tmp_path):
    """configs/qwen3_30b_a3b_teacher_1p7b_opd.py needs only the user's paths; with the published
    teacher config its 128 experts split over an 8-device fsdp axis (16 per device)."""
    import importlib.util

    from effopd_jax import config as config_lib

    spec = importlib.util.spec_from_file_location(
        "moe_config", Path(REPO_ROOT) / "configs" / "qwen3_30b_a3b_teacher_1p7b_opd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    from effopd_jax import plan  # noqa: PLC0415
    config_lib.validate_config(c, for_plan=True)  # as shipped: the plan reads the bundled configs
    planned = plan.model_config(c.teachers[0], "teachers[0]")
    assert (planned.model_type, planned.num_experts, planned.param_dtype) == ("qwen3_moe", 128, jnp.bfloat16)
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    (teacher_dir / "config.json").write_text(json.dumps(json.loads(QWEN_MOE_CONFIGS.read_text())["Qwen/Qwen3-30B-A3B"]))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2+3?", "answer": "5"}\n')
    c.student.path = str(teacher_dir)  # validation only checks that the paths exist
    c.teachers[0].path = str(teacher_dir)
    c.data.train_files = c.data.eval_files = c.effopd.val_files = (str(prompts),)
    config_lib.validate_config(c)
    teacher = models.config_from_hf(str(teacher_dir), param_dtype=c.teachers[0].param_dtype,
                                    dtype=c.teachers[0].compute_dtype, scan_layers=c.teachers[0].scan_layers)
    mesh = setup.make_mesh(c)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    down = sharding_lib.param_shardings(teacher, mesh)["layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert down.shard_shape((48, 128, 768, 2048)) == (48, 16, 768, 2048)


def test_the_block_with_a_shared_expert_matches_transformers_qwen3_5_moe_block():
    """The reusable block in Qwen3.5-MoE's form (shared expert + sigmoid gate, fused gate/up
    experts, normalised top-k) against transformers' `Qwen3_5MoeSparseMoeBlock`."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf_moe

    hf_config = transformers.Qwen3_5MoeTextConfig(
        hidden_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, hidden_act="silu")
    block = hf_moe.Qwen3_5MoeSparseMoeBlock(hf_config).float().eval()
    randomize_(block, 3)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = block(x).numpy()
    t = lambda w: jnp.asarray(w.detach().numpy().swapaxes(-1, -2))  # noqa: E731  [.., out, in] -> [.., in, out]
    params = {
        "gate": {"kernel": t(block.gate.weight)},
        "experts": {"gate_up_proj": {"kernel": t(block.experts.gate_up_proj)},
                    "down_proj": {"kernel": t(block.experts.down_proj)}},
        "shared_expert": {name: {"kernel": t(getattr(block.shared_expert, name).weight)}
                          for name in ("gate_proj", "up_proj", "down_proj")},
        "shared_expert_gate": {"kernel": t(block.shared_expert_gate.weight)},
    }
    ours = moe.SparseMoeBlock(8, 2, 16, True, jnp.float32, jnp.float32, 0.02,
                              shared_expert_intermediate_size=24, fused_gate_up=True)
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(ours.init(jax.random.key(0), jnp.zeros((1, 1, 32))))["params"])
    assert shapes == jax.tree.map(lambda a: a.shape, params)
    got = ours.apply({"params": params}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    assert np.std(want) > 0.1


def test_analyze_writes_one_row_per_expert_and_plots_layer_aggregates(checkpoints, tmp_path):
    from effopd_jax import analyze

    base = checkpoints["step2_tied"]  # layer 0 dense, layer 1 sparse
    config, params = models.load_hf(base, **F32)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    moved = jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    models.save_hf(config, moved, tmp_path / "step_1")
    result = analyze.analyze([str(base), str(tmp_path / "step_1")], str(tmp_path / "out"), k=2, keep_order=True)
    experts = [r for r in result.rows if r["module"] == "mlp/experts/up_proj"]
    assert sorted(r["expert"] for r in experts) == list(range(8)) and {r["layer"] for r in experts} == {1}
    assert all(r["expert"] == "" for r in result.rows if r["module"] == "self_attn/q_proj")
    for layer in (0, 1):
        shares = sum(float(r["alloc"]) for r in result.rows if r["layer"] == layer)
        assert shares == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "out" / "module_allocation.png").is_file()
    header = (tmp_path / "out" / "spectrum.csv").read_text().splitlines()[0]
    assert header.startswith("layer,module,expert,j")


def test_lora_adapters_on_the_experts_merge_per_expert_and_export_per_expert(checkpoints):
    """LoRA on a MoE student: one (A, B) pair per expert, W_e + s·A_e·B_e merged (numpy), PEFT's
    per-expert tensor names; the unmerged forward refuses expert adapters instead of skipping them."""
    from effopd_jax import lora as lora_lib

    config, params = models.load_hf(str(checkpoints["mixed"]), **F32)
    lora = lora_lib.LoRA.for_model(config, rank=2, alpha=4.0, target=("mlp/experts/down_proj", "mlp/gate"))
    adapters, base = lora.split(params)
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), adapters)
    merged = lora_lib.merge_adapters(base, adapters, lora.scale)
    node = adapters["layers_0"]["mlp"]["experts"]["down_proj"]
    a, b = np.asarray(node["lora_a"]), np.asarray(node["lora_b"])
    assert a.shape == (8, 32, 2) and b.shape == (8, 2, 64)
    w = np.asarray(params["layers_0"]["mlp"]["experts"]["down_proj"]["kernel"])
    want = w + lora.scale * np.einsum("eir,ero->eio", a, b)
    np.testing.assert_allclose(np.asarray(merged["layers_0"]["mlp"]["experts"]["down_proj"]["kernel"]), want,
                               rtol=1e-6, atol=1e-6)
    assert "experts" not in merged["layers_1"]["mlp"]  # the dense layer has no adapters
    tensors = lora_lib.peft_state_dict(config, lora, adapters)
    # 2 sparse layers x (8 experts + the router) x (A, B)
    assert len(tensors) == 2 * (8 + 1) * 2
    np.testing.assert_array_equal(
        tensors["base_model.model.model.layers.2.mlp.experts.5.down_proj.lora_A.weight"],
        np.asarray(adapters["layers_2"]["mlp"]["experts"]["down_proj"]["lora_a"])[5].T)
    assert tensors["base_model.model.model.layers.0.mlp.gate.lora_B.weight"].shape == (8, 2)
    with pytest.raises(ValueError, match="expert stack.*merge the adapters"):
        lora_lib.unmerged_forward(config, lora_lib.with_adapters(base, adapters), jnp.zeros((1, 3), jnp.int32),
                                  scale=lora.scale)
