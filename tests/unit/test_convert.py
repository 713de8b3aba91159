"""effopd_jax.convert against transformers/torch: logits parity, round trips, bad checkpoints.

Every reference here is independent of our code: torch logits of `transformers` models, tensors
read by `safetensors.torch`, and `transformers.AutoModelForCausalLM.from_pretrained` of what
`save_hf` writes.
"""
import dataclasses
import functools
import json
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

from effopd_jax import convert, models, sharding
from effopd_jax.models import (CheckpointError, MissingTensorError, TensorShapeError,
                               UnexpectedTensorError, UnsupportedConfigError, load_hf, save_hf)
from effopd_jax.models import hf as hf_io
from helpers_hf import load_torch_model, make_tiny_hf_checkpoint, torch_logits

# (model_type, tie, num_kv_heads, attention_bias): GQA ratio 2 and 1, tied and untied, biases on
# (Qwen2 always has q/k/v biases; the Qwen3 variant switches attention_bias on, which also adds
# an o_proj bias in transformers).
VARIANTS = {
    "qwen3_untied_gqa2_bias": ("qwen3", False, 2, True),
    "qwen3_tied_gqa1": ("qwen3", True, 4, None),
    "qwen2_untied_gqa2": ("qwen2", False, 2, None),
    "qwen2_tied_gqa1": ("qwen2", True, 4, None),
}

# Row 0 unpadded, rows 1 and 2 left-padded by 3 and 7 tokens.
INPUT_IDS = np.random.RandomState(0).randint(0, 128, (3, 10))
MASK = np.ones((3, 10), np.int32)
MASK[1, :3] = 0
MASK[2, :7] = 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: make_tiny_hf_checkpoint(root, *args) for name, args in VARIANTS.items()}


@functools.partial(jax.jit, static_argnames="config")
def forward(config, params, ids, attention_mask):
    return models.forward(config, params, ids, attention_mask=attention_mask)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_with_and_without_left_padding(checkpoints, variant):
    config, params = load_hf(checkpoints[variant], compute_dtype=jnp.float32)
    model_type, tie, kv_heads, bias = VARIANTS[variant]
    assert (config.model_type, config.tie_word_embeddings, config.num_key_value_heads) == (
        model_type, tie, kv_heads)
    assert ("lm_head" in params) == (not tie)
    want = torch_logits(checkpoints[variant], INPUT_IDS, MASK)
    got = np.asarray(forward(config, params, jnp.asarray(INPUT_IDS), jnp.asarray(MASK)))
    real = MASK.astype(bool)
    assert np.abs(want[real]).max() > 1.0  # non-trivial logits
    assert np.abs(got - want)[real].max() <= 1e-4


def test_scan_layers_load_gives_the_same_logits(checkpoints):
    path = checkpoints["qwen3_untied_gqa2_bias"]
    config, params = load_hf(path, compute_dtype=jnp.float32)
    config_s, params_s = load_hf(path, scan_layers=True, compute_dtype=jnp.float32)
    assert config_s.scan_layers and params_s["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 96)
    np.testing.assert_array_equal(params_s["layers"]["self_attn"]["q_proj"]["kernel"][1],
                                  params["layers_1"]["self_attn"]["q_proj"]["kernel"])
    ids, mask = jnp.asarray(INPUT_IDS), jnp.asarray(MASK)
    np.testing.assert_allclose(forward(config_s, params_s, ids, mask),
                               forward(config, params, ids, mask), atol=1e-5)


def test_kernels_are_transposed_hf_weights(checkpoints):
    path = checkpoints["qwen2_untied_gqa2"]
    tensors = safetensors.torch.load_file(str(path / "model.safetensors"))
    _, params = load_hf(path)
    layer = params["layers_1"]
    np.testing.assert_array_equal(layer["self_attn"]["k_proj"]["kernel"],
                                  tensors["model.layers.1.self_attn.k_proj.weight"].numpy().T)
    np.testing.assert_array_equal(layer["self_attn"]["k_proj"]["bias"],
                                  tensors["model.layers.1.self_attn.k_proj.bias"].numpy())
    np.testing.assert_array_equal(params["lm_head"]["kernel"], tensors["lm_head.weight"].numpy().T)


def test_index_sharded_and_bf16_checkpoints_load(checkpoints, tmp_path):
    _, reference = load_hf(checkpoints["qwen2_untied_gqa2"])
    sharded = make_tiny_hf_checkpoint(tmp_path, "qwen2", False, 2, max_shard_size="20KB")
    assert (sharded / hf_io.SAFE_WEIGHTS_INDEX_NAME).exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    _, params = load_hf(sharded)
    assert_trees_equal(params, reference)

    bf16 = make_tiny_hf_checkpoint(tmp_path, "qwen2", False, 2, dtype=torch.bfloat16)
    tensors = safetensors.torch.load_file(str(bf16 / "model.safetensors"))
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    config, params = load_hf(bf16, param_dtype=jnp.bfloat16)
    assert config.param_dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params["layers_0"]["mlp"]["gate_proj"]["kernel"], np.float32),
        tensors["model.layers.0.mlp.gate_proj.weight"].float().numpy().T)
    _, params32 = load_hf(bf16, param_dtype=jnp.float32)
    np.testing.assert_array_equal(params32["embed_tokens"]["embedding"],
                                  tensors["model.embed_tokens.weight"].float().numpy())


def test_load_into_mesh_shardings(checkpoints):
    path = checkpoints["qwen3_untied_gqa2_bias"]
    _, reference = load_hf(path, scan_layers=True)
    config = models.config_from_hf(path, scan_layers=True)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.param_shardings(config, mesh)
    _, params = load_hf(path, shardings=shardings, scan_layers=True)
    for leaf, want_sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert leaf.sharding == want_sharding
    kernel = params["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, q_heads]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 32, 48)
    assert_trees_equal(params, reference)


@pytest.mark.parametrize("variant, scan_layers, max_shard_bytes", [
    ("qwen3_untied_gqa2_bias", True, 5 * 2**30),
    ("qwen2_tied_gqa1", False, 30_000),
])
def test_save_hf_round_trip_through_transformers(checkpoints, tmp_path, variant, scan_layers,
                                                 max_shard_bytes):
    source = checkpoints[variant]
    config, params = load_hf(source, scan_layers=scan_layers)
    out = tmp_path / "saved"
    save_hf(config, params, out, max_shard_bytes=max_shard_bytes)
    sharded = (out / hf_io.SAFE_WEIGHTS_INDEX_NAME).exists()
    assert sharded == (max_shard_bytes < 100_000)
    model = load_torch_model(out)  # transformers reads our config.json and safetensors
    assert type(model).__name__ == type(load_torch_model(source)).__name__
    np.testing.assert_allclose(torch_logits(model, INPUT_IDS, MASK),
                               torch_logits(source, INPUT_IDS, MASK), atol=1e-6)
    config_again, params_again = load_hf(out, scan_layers=scan_layers)
    assert config_again == config
    assert_trees_equal(params_again, params)


def test_save_hf_bf16_storage(checkpoints, tmp_path):
    config, params = load_hf(checkpoints["qwen3_tied_gqa1"])
    save_hf(config, params, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = safetensors.torch.load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    np.testing.assert_array_equal(
        tensors["model.layers.1.self_attn.o_proj.weight"].float().numpy(),
        np.asarray(params["layers_1"]["self_attn"]["o_proj"]["kernel"]).T
        .astype(ml_dtypes.bfloat16).astype(np.float32))


def test_save_hf_rejects_params_that_do_not_fit_the_config(checkpoints, tmp_path):
    config, params = load_hf(checkpoints["qwen2_untied_gqa2"])
    broken = jax.tree.map(lambda x: x, params)
    del broken["layers_0"]["mlp"]["up_proj"]
    with pytest.raises(MissingTensorError, match="layers_0/mlp/up_proj/kernel"):
        save_hf(config, broken, tmp_path / "a")
    with pytest.raises(UnexpectedTensorError, match="lm_head/kernel"):
        save_hf(dataclasses.replace(config, tie_word_embeddings=True), params, tmp_path / "b")
    broken = jax.tree.map(lambda x: x, params)
    broken["norm"]["scale"] = jnp.zeros(3)
    with pytest.raises(TensorShapeError, match="norm/scale"):
        save_hf(config, broken, tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# Corrupted checkpoints
# ---------------------------------------------------------------------------------------------
def rewrite(source, destination, edit_tensors=None, edit_config=None):
    shutil.copytree(source, destination)
    if edit_tensors is not None:
        file = str(destination / "model.safetensors")
        tensors = safetensors.torch.load_file(file)
        edit_tensors(tensors)
        safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((destination / "config.json").read_text())
        edit_config(config)
        (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_missing_tensor_raises_naming_it(checkpoints, tmp_path):
    name = "model.layers.1.self_attn.q_norm.weight"
    path = rewrite(checkpoints["qwen3_untied_gqa2_bias"], tmp_path / "c",
                   edit_tensors=lambda t: t.pop(name))
    with pytest.raises(MissingTensorError, match=name.replace(".", r"\.")):
        load_hf(path)
    with pytest.raises(MissingTensorError, match="q_norm"):
        load_hf(path, scan_layers=True)


def test_wrong_shape_raises_naming_it(checkpoints, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"

    def transpose(tensors):
        tensors[name] = tensors[name].T.contiguous()

    path = rewrite(checkpoints["qwen2_untied_gqa2"], tmp_path / "c", edit_tensors=transpose)
    with pytest.raises(TensorShapeError, match=name.replace(".", r"\.") + r".*\[96, 64\].*\[64, 96\]"):
        load_hf(path)


def test_unexpected_tensor_raises_naming_it(checkpoints, tmp_path):
    name = "model.layers.0.self_attn.extra_proj.weight"

    def add(tensors):
        tensors[name] = torch.zeros(4, 4)

    path = rewrite(checkpoints["qwen2_untied_gqa2"], tmp_path / "c", edit_tensors=add)
    with pytest.raises(UnexpectedTensorError, match=name.replace(".", r"\.")):
        load_hf(path)
    # A config that does not match the weights (qwen3 tensors read as qwen2) is caught the same way.
    path = rewrite(checkpoints["qwen3_tied_gqa1"], tmp_path / "d",
                   edit_config=lambda c: c.update(model_type="qwen2", head_dim=24))
    with pytest.raises(CheckpointError, match="q_norm|q_proj.bias"):
        load_hf(path)


def test_tied_checkpoint_with_an_explicit_head(checkpoints, tmp_path):
    source = checkpoints["qwen2_tied_gqa1"]
    _, reference = load_hf(source)

    def copy_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    _, params = load_hf(rewrite(source, tmp_path / "same", edit_tensors=copy_head))
    assert_trees_equal(params, reference)

    def other_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0

    with pytest.raises(UnexpectedTensorError, match="lm_head.weight"):
        load_hf(rewrite(source, tmp_path / "other", edit_tensors=other_head))


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(model_type="qwen2_moe", num_experts=8), "model_type"),
    (lambda c: c.update(use_sliding_window=True, sliding_window=4), "use_sliding_window"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
     "rope"),
])
def test_unsupported_config_raises_naming_the_field(checkpoints, tmp_path, edit, field):
    path = rewrite(checkpoints["qwen3_tied_gqa1"], tmp_path / "c", edit_config=edit)
    with pytest.raises(UnsupportedConfigError, match=field):
        load_hf(path)


def test_missing_files_raise(checkpoints, tmp_path):
    path = rewrite(checkpoints["qwen2_tied_gqa1"], tmp_path / "c")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(path)
    sharded = make_tiny_hf_checkpoint(tmp_path, "qwen2", True, 4, max_shard_size="20KB")
    next(iter(sorted(sharded.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_hf(sharded)



def _safetensors_parts(file):
    """(header dict, data bytes) of a safetensors file, parsed here from the documented layout."""
    raw = file.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + header_len]), raw[8 + header_len:]


def _write_safetensors_parts(file, header, data_bytes, header_len=None):
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    length = len(header_bytes) if header_len is None else header_len
    file.write_bytes(struct.pack("<Q", length) + header_bytes + data_bytes)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_file_truncated_in_tensor_data_raises_naming_the_tensor(checkpoints, tmp_path, keep):
    path = rewrite(checkpoints["qwen3_untied_gqa2_bias"], tmp_path / "c")
    file = path / "model.safetensors"
    header, data_bytes = _safetensors_parts(file)
    _write_safetensors_parts(file, header, data_bytes[:int(keep * len(data_bytes))])
    kept = int(keep * len(data_bytes))
    with pytest.raises(CheckpointError, match=r"truncated file") as info:
        load_hf(path)
    name = re.search(r"tensor '([^']+)'", str(info.value)).group(1)
    assert header[name]["data_offsets"][1] > kept  # the named tensor really lost bytes


def test_header_claiming_more_bytes_than_the_file_has_is_refused(checkpoints, tmp_path):
    path = rewrite(checkpoints["qwen2_tied_gqa1"], tmp_path / "c")
    file = path / "model.safetensors"
    header, data_bytes = _safetensors_parts(file)
    # The length prefix: larger than the file (and absurdly large, which must not be allocated).
    for claimed in (len(data_bytes) + 10**6, 2**63):
        _write_safetensors_parts(file, header, data_bytes, header_len=claimed)
        with pytest.raises(CheckpointError, match=rf"header claims {claimed} bytes"):
            load_hf(path)
    # A tensor's data_offsets past the end of the data.
    name = "model.norm.weight"
    begin, end = header[name]["data_offsets"]
    shifted = dict(header, **{name: dict(header[name], data_offsets=[begin + len(data_bytes), end + len(data_bytes)])})
    _write_safetensors_parts(file, shifted, data_bytes)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{name}'") + ".*truncated file"):
        load_hf(path)


@pytest.mark.parametrize("damage, message", [
    (lambda header: "x" * 64, "not valid JSON"),
    (lambda header: [1, 2], "not a JSON object"),
    (lambda header: dict(header, **{"model.norm.weight": {"shape": [64]}}), r"tensor 'model\.norm\.weight'.*malformed"),
    (lambda header: dict(header, **{"model.norm.weight": dict(header["model.norm.weight"], dtype="I8")}),
     r"tensor 'model\.norm\.weight'.*dtype I8"),
])
def test_damaged_header_is_refused(checkpoints, tmp_path, damage, message):
    path = rewrite(checkpoints["qwen2_tied_gqa1"], tmp_path / "c")
    file = path / "model.safetensors"
    header, data_bytes = _safetensors_parts(file)
    damaged = damage(header)
    if isinstance(damaged, str):
        raw = damaged.encode()
        file.write_bytes(struct.pack("<Q", len(raw)) + raw + data_bytes)
    else:
        _write_safetensors_parts(file, damaged, data_bytes)
    with pytest.raises(CheckpointError, match=message):
        load_hf(path)


def test_config_whose_sizes_disagree_with_the_tensors_is_refused(checkpoints, tmp_path):
    source = checkpoints["qwen2_untied_gqa2"]
    hidden = json.loads((source / "config.json").read_text())["hidden_size"]
    path = rewrite(source, tmp_path / "wide", edit_config=lambda c: c.update(hidden_size=2 * hidden))
    with pytest.raises(TensorShapeError, match=r"model\.embed_tokens\.weight"):
        load_hf(path)
    deeper = rewrite(source, tmp_path / "deep", edit_config=lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.2\."):
        load_hf(deeper)

# ---------------------------------------------------------------------------------------------
# Orbax CLI
# ---------------------------------------------------------------------------------------------
def test_cli_hf_to_orbax_and_back(checkpoints, tmp_path):
    source = checkpoints["qwen3_untied_gqa2_bias"]
    orbax_dir, hf_dir = tmp_path / "orbax", tmp_path / "hf"
    assert convert.main(["hf-to-orbax", str(source), str(orbax_dir), "--scan-layers"]) == 0
    stored = json.loads((orbax_dir / convert.ORBAX_CONFIG_NAME).read_text())
    assert stored["scan_layers"] is True and stored["param_dtype"] == "float32"
    config, params = convert.load_orbax(orbax_dir)
    _, reference = load_hf(source, scan_layers=True)
    assert_trees_equal(params, reference)
    assert convert.main(["orbax-to-hf", str(orbax_dir), str(hf_dir), "--dtype", "bfloat16"]) == 0
    _, params_bf16 = load_hf(hf_dir, param_dtype=jnp.bfloat16, scan_layers=True)
    assert_trees_equal(params_bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), reference))


def test_load_orbax_params_casts_and_checks_the_config(checkpoints, tmp_path):
    source = checkpoints["qwen2_tied_gqa1"]
    config, params = load_hf(source)
    convert.save_orbax(config, params, tmp_path / "o")
    config16 = dataclasses.replace(config, param_dtype=jnp.bfloat16)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    restored = convert.load_orbax_params(tmp_path / "o", config16,
                                         shardings=sharding.param_shardings(config16, mesh))
    assert_trees_equal(restored, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    assert restored["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(
        "tensor", "fsdp")
    with pytest.raises(CheckpointError, match="scan_layers"):
        convert.load_orbax_params(tmp_path / "o", dataclasses.replace(config, scan_layers=True))
    with pytest.raises(CheckpointError, match="intermediate_size"):
        convert.load_orbax_params(tmp_path / "o", dataclasses.replace(config, intermediate_size=32))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_invalid_config_json_is_refused_naming_the_file(tmp_path, text):
    from effopd_jax.models.qwen import QwenConfig

    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="config.json"):
        QwenConfig.from_hf(str(tmp_path))
