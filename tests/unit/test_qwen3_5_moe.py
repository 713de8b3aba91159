"""The Qwen3.5-MoE family (effopd_jax/models/qwen3_5_moe.py) against independent references.

References: transformers' `Qwen3_5MoeForCausalLM` / `Qwen3_5MoeForConditionalGeneration` in
float32 (logits with left padding, the load-balancing loss, loading our export as the class it
came from), the safetensors files themselves (round trip, carried vision / MTP tensors) and the
uncached forward (cache). Tiny random checkpoints: tests/helpers_moe.py (8 experts, top-2, a
shared expert, 3 linear-attention layers and 1 full-attention layer), saved per expert by
`save_pretrained`; their fused-experts copies (the published checkpoints' form) hold transformers'
in-memory `mlp.experts.gate_up_proj` / `down_proj` tensors instead.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from effopd_jax import models
from effopd_jax.models.hf import CheckpointError, MissingTensorError, _SafetensorsReader
from effopd_jax.models.qwen3_5_moe import Qwen3_5MoeConfig
from helpers_moe import QWEN3_5_MOE_MTP, QWEN3_5_MOE_TEXT, make_tiny_qwen3_5_moe_checkpoint

F32 = dict(compute_dtype="float32")
CLASSES = {"text": "Qwen3_5MoeForCausalLM", "multimodal": "Qwen3_5MoeForConditionalGeneration"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_5_moe")
    return {"text": make_tiny_qwen3_5_moe_checkpoint(root, multimodal=False, seed=0),
            "multimodal": make_tiny_qwen3_5_moe_checkpoint(root, multimodal=True, seed=1)}


@functools.lru_cache(maxsize=None)
def _torch_model(path):
    cls = getattr(transformers, CLASSES["multimodal" if "multimodal" in str(path) else "text"])
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _torch_out(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(np.maximum(np.cumsum(mask, 1) - 1, 0)), **kwargs)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward_with_aux(config, params, ids, mask):
    return models.forward_with_aux(config, params, ids, attention_mask=mask)


def _padded_batch(seed: int = 0, rows: int = 3, seq: int = 10):
    """Token ids and a mask with left padding of 0, 3 and 6 tokens."""
    ids = np.random.RandomState(seed).randint(0, QWEN3_5_MOE_TEXT["vocab_size"], (rows, seq))
    mask = np.ones((rows, seq), np.int64)
    for row, pad in enumerate((0, 3, 6)[:rows]):
        mask[row, :pad] = 0
    return ids, mask


def _tensors(path) -> dict[str, np.ndarray]:
    reader = _SafetensorsReader(str(path))
    return {name: np.asarray(reader.array(name)) for name in reader.records}


_SEPARATE_EXPERT = re.compile(r"layers\.\d+\.mlp\.experts\.\d+\.")
_FUSED_EXPERTS = re.compile(r"layers\.\d+\.mlp\.experts\.(gate_up|down)_proj$")


def _write_checkpoint(path, tensors, config_from):
    from safetensors.numpy import save_file  # noqa: PLC0415

    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(config_from / "config.json", path)
    return path


@pytest.fixture(scope="module")
def fused_checkpoints(checkpoints, tmp_path_factory):
    """The published form of each checkpoint: its routed experts replaced by the fused tensors of
    transformers' in-memory model (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, the names
    the published checkpoints use); the MTP stand-ins stay as they are."""
    root = tmp_path_factory.mktemp("qwen3_5_moe_fused")
    out = {}
    for layout, path in checkpoints.items():
        fused = {name: tensor.numpy() for name, tensor in _torch_model(path).state_dict().items()
                 if _FUSED_EXPERTS.search(name)}
        kept = {name: array for name, array in _tensors(path).items() if not _SEPARATE_EXPERT.search(name)}
        out[layout] = _write_checkpoint(root / layout, {**kept, **fused}, path)
    return out


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_logits_and_load_balancing_loss_match_transformers_with_left_padding(checkpoints, layout):
    path = checkpoints[layout]
    config, params = models.load_hf(path, **F32)
    assert isinstance(config, Qwen3_5MoeConfig) and config.model_type == (
        "qwen3_5_moe" if layout == "multimodal" else "qwen3_5_moe_text")
    assert (config.num_experts, config.num_experts_per_tok, config.shared_expert_intermediate_size) == (8, 2, 24)
    config = dataclasses.replace(config, output_router_logits=True)
    ids, mask = _padded_batch()
    want = _torch_out(_torch_model(path), ids, mask, output_router_logits=True)
    got, aux = _forward_with_aux(config, params, jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    assert np.max(np.abs(np.asarray(got) - want.logits.numpy())[real]) <= 1e-4
    assert 0.3 < np.std(want.logits.numpy()[real]) < 30  # O(1) logits: the test has teeth
    # HF's load-balancing loss over the real tokens of all 4 MoE layers, times its coefficient.
    np.testing.assert_allclose(float(aux.metrics["moe/load_balancing_loss"]), float(want.aux_loss), rtol=1e-5)
    np.testing.assert_allclose(float(aux.loss), 0.001 * float(want.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_hf_round_trip_is_exact_and_transformers_loads_it_as_its_class(checkpoints, tmp_path, layout):
    """Scanned text layout (the `experts` stack after the `layers` one), unscanned multimodal
    with its vision tower and MTP head carried through bit for bit."""
    path = checkpoints[layout]
    scan = layout == "text"
    config, params = models.load_hf(path, scan_layers=scan, **F32)
    if scan:
        gate_up = params["layers"]["sub_0"]["mlp"]["experts"]["gate_proj"]["kernel"]
        assert gate_up.shape == (1, 8, 32, 16)  # [blocks, experts, hidden, moe_intermediate]
    models.save_hf(config, params, tmp_path / "out", carry_from=path)
    source, written = _tensors(path), _tensors(tmp_path / "out")
    assert set(written) == set(source)
    for name, array in written.items():
        np.testing.assert_array_equal(array, source[name])
    if layout == "multimodal":
        assert sum(n.startswith("model.visual.") for n in written) > 0 and set(QWEN3_5_MOE_MTP) <= set(written)
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["architectures"] == [CLASSES[layout]]
    again_config, _ = models.load_hf(tmp_path / "out", scan_layers=scan, **F32)
    assert again_config == config
    # transformers loads the export as the class it came from, with the same weights (its fused
    # in-memory experts included).
    reloaded = getattr(transformers, CLASSES[layout]).from_pretrained(tmp_path / "out", dtype=torch.float32)
    want = _torch_model(path).state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(want) and any(".mlp.experts.gate_up_proj" in name for name in got)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_fused_experts_load_exactly_as_the_per_expert_save_and_match_transformers(
        checkpoints, fused_checkpoints, layout):
    """The same weights stored fused load to the same params; the logits match transformers
    reading the fused files itself (the parity test's compile: same config and shapes)."""
    path = fused_checkpoints[layout]
    assert sum(bool(_FUSED_EXPERTS.search(n)) for n in _tensors(path)) == 2 * 4
    assert not any(_SEPARATE_EXPERT.search(n) for n in _tensors(path) if not n.startswith("mtp."))
    config, params = models.load_hf(path, **F32)
    want_config, want_params = models.load_hf(checkpoints[layout], **F32)
    assert config == want_config
    jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), np.asarray(want)),
                 params, want_params)
    config = dataclasses.replace(config, output_router_logits=True)
    ids, mask = _padded_batch()
    reference = getattr(transformers, CLASSES[layout]).from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    want = _torch_out(reference, ids, mask).logits.numpy()
    got = np.asarray(_forward_with_aux(config, params, jnp.asarray(ids), jnp.asarray(mask))[0])
    assert np.max(np.abs(got - want)[mask.astype(bool)]) <= 1e-4


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_export_writes_the_expert_form_it_was_read_in(checkpoints, fused_checkpoints, tmp_path, layout):
    """carry_from a fused checkpoint: the export is it, bit for bit (fused names), and
    transformers loads it as its class with identical weights; from scratch: per expert.
    Scanned text layout (the fused slices gathered from the `[blocks, experts, ...]` stacks),
    unscanned multimodal."""
    path = fused_checkpoints[layout]
    config, params = models.load_hf(path, scan_layers=layout == "text", **F32)
    models.save_hf(config, params, tmp_path / "fused", carry_from=path)
    source, written = _tensors(path), _tensors(tmp_path / "fused")
    assert set(written) == set(source)
    for name, array in written.items():
        np.testing.assert_array_equal(array, source[name])
    reloaded = getattr(transformers, CLASSES[layout]).from_pretrained(tmp_path / "fused", dtype=torch.float32)
    want = _torch_model(checkpoints[layout]).state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)
    if layout == "text":  # nothing carried: the from-scratch export is the save_pretrained one
        models.save_hf(config, params, tmp_path / "scratch")
        separate, written = _tensors(checkpoints[layout]), _tensors(tmp_path / "scratch")
        assert set(written) == set(separate)
        for name, array in written.items():
            np.testing.assert_array_equal(array, separate[name])


def test_a_layer_with_both_expert_forms_or_neither_or_a_mix_of_layers_is_refused(
        checkpoints, fused_checkpoints, tmp_path):
    fused, separate = _tensors(fused_checkpoints["text"]), _tensors(checkpoints["text"])
    layer1 = {n: a for n, a in separate.items() if n.startswith("model.layers.1.mlp.experts.")}
    both = {**fused, "model.layers.1.mlp.experts.3.up_proj.weight": layer1["model.layers.1.mlp.experts.3.up_proj.weight"]}
    mixed = {**{n: a for n, a in fused.items() if not n.startswith("model.layers.1.mlp.experts.")}, **layer1}
    neither = {n: a for n, a in fused.items() if n != "model.layers.2.mlp.experts.gate_up_proj"}
    for name, tensors, error, match in [
            ("both", both, CheckpointError, r"model\.layers\.1\.mlp\.experts\.gate_up_proj.*one way"),
            ("mixed", mixed, CheckpointError, r"mixes fused and separate"),
            ("neither", neither, MissingTensorError, r"model\.layers\.2\.mlp\.experts\.gate_up_proj")]:
        path = _write_checkpoint(tmp_path / name, tensors, checkpoints["text"])
        with pytest.raises(error, match=match):
            models.load_hf(path, **F32)


def test_cached_decode_equals_the_uncached_forward(checkpoints):
    """One token at a time through the whole (left-padded) batch: one compile of the step; the
    uncached forward is the parity test's compile (same config and shapes)."""
    config, params = models.load_hf(checkpoints["text"], **F32)
    config = dataclasses.replace(config, output_router_logits=True)
    ids, mask = _padded_batch()
    full = np.asarray(_forward_with_aux(config, params, jnp.asarray(ids), jnp.asarray(mask))[0])
    seq = ids.shape[1]
    cache = models.init_cache(config, batch=3, max_len=seq, dtype=jnp.float32)
    step = jax.jit(lambda p, t, m, c: models.forward(config, p, t, attention_mask=m, cache=c))
    outs = []
    for t in range(seq):
        out, cache = step(params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask * (np.arange(seq) <= t)), cache)
        outs.append(np.asarray(out))
    real = mask.astype(bool)
    # float32, the recurrent form of the delta rule against the chunked one: ~1e-4 after 10 steps
    np.testing.assert_allclose(np.concatenate(outs, 1)[real], full[real], atol=2e-4, rtol=1e-4)


def test_layout_extrapolates_experts_and_shared_expert_but_not_the_gates_and_monitors_each_expert():
    config = Qwen3_5MoeConfig.from_hf(transformers.Qwen3_5MoeTextConfig(**QWEN3_5_MOE_TEXT).to_dict())
    layout = models.layout(config)
    chosen = layout.extrapolated_names()
    assert {"layers_0/mlp/experts/gate_proj/kernel", "layers_0/mlp/shared_expert/down_proj/kernel",
            "layers_0/linear_attn/in_proj_qkv/kernel", "layers_3/self_attn/q_proj/kernel"} <= chosen
    assert not {"layers_0/mlp/gate/kernel", "layers_0/mlp/shared_expert_gate/kernel",
                "layers_0/linear_attn/A_log"} & chosen
    assert layout.module_groups()["router"] == ("mlp/gate", "mlp/shared_expert_gate")
    assert layout.module_experts("mlp/experts/down_proj") == 8
    assert layout.module_rows("mlp/experts/up_proj")[:2] == ((0, 0), (0, 1))
    assert len(layout.module_rows("mlp/experts/up_proj")) == 4 * 8
    # The expert stacks carry the `expert` logical axis (mapped to a mesh axis by the rules).
    axes = models.param_logical_axes(config)["layers_0"]["mlp"]["experts"]["gate_proj"]["kernel"]
    assert tuple(axes)[0] == "expert"
