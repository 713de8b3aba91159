"""Hugging Face safetensors <-> effopd_jax params, and an orbax params-checkpoint CLI.

HF checkpoint layout (what `transformers.save_pretrained` writes): `config.json` plus either
`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards listed by
`model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor: file}}`).

Name and layout mapping (docs/architecture.md): `model.layers.{i}.<module>.weight` of a Linear
is `layers_{i}/<module>/kernel` transposed to `[in, out]`; `.bias` maps to `bias`; RMSNorm
`.weight` maps to `scale`; `model.embed_tokens.weight` -> `embed_tokens/embedding`,
`model.norm.weight` -> `norm/scale`, `lm_head.weight` -> `lm_head/kernel` (transposed). With
`scan_layers=True` the per-layer tensors are stacked on a leading axis under `layers/...`.

Safetensors files are read through a memory map of the documented format (8-byte little-endian
header length, JSON header, raw little-endian data) rather than `safetensors.safe_open(framework=
"np")`, because numpy has no bfloat16 and that reader rejects BF16 tensors, the dtype every
published Qwen checkpoint uses; `ml_dtypes.bfloat16` (a JAX dependency) covers it. The memory map
means each device shard reads only the bytes it needs, so peak host memory is about one tensor.

Errors: every problem with a checkpoint raises a `CheckpointError` subclass naming the tensor(s);
config problems raise `models.qwen.UnsupportedConfigError`. A tensor the model needs is never
initialised when the checkpoint lacks it.

CLI:
    python -m effopd_jax.convert hf-to-orbax SRC_HF_DIR DST_DIR [--dtype bfloat16] [--scan-layers]
    python -m effopd_jax.convert orbax-to-hf SRC_DIR DST_HF_DIR [--dtype bfloat16]
                                             [--max-shard-bytes N]
An orbax params directory holds `params/` (an `orbax.checkpoint.StandardCheckpointer` checkpoint
of the params pytree) and `qwen_config.json` (`QwenConfig.to_dict()`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from effopd_jax.models.qwen import QwenConfig, UnsupportedConfigError, abstract_params

__all__ = [
    "CheckpointError", "MissingTensorError", "UnexpectedTensorError", "TensorShapeError",
    "UnsupportedConfigError", "load_hf", "save_hf", "save_orbax", "load_orbax",
    "load_orbax_params", "read_orbax_config",
    "hf_tensor_name", "main",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ORBAX_PARAMS_DIR = "params"
ORBAX_CONFIG_NAME = "qwen_config.json"
# Non-persistent buffers some older exports include; they carry no learned weights.
IGNORED_HF_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint on disk does not match the model its config describes."""


class MissingTensorError(CheckpointError):
    """The checkpoint lacks tensors the model needs (the message lists them)."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint has tensors the model does not use (the message lists them)."""


class TensorShapeError(CheckpointError):
    """A tensor's shape differs from what the config implies (the message names it)."""


# ============================================================================================
# Safetensors I/O
# ============================================================================================
@dataclasses.dataclass(frozen=True)
class _TensorRecord:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_safetensors_header(path: str) -> dict[str, _TensorRecord]:
    """The tensor records of one file; a damaged or truncated file raises CheckpointError."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (truncated header)")
        (header_len,) = struct.unpack("<Q", prefix)
        # Checked before reading: a damaged prefix can claim up to 2**64 bytes.
        if header_len > file_size - 8:
            raise CheckpointError(
                f"{path}: the header claims {header_len} bytes but only {file_size - 8} follow "
                "(truncated file, or not a safetensors file)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + header_len
    records = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, raw_shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in raw_shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(
                f"tensor {name!r} in {path}: malformed header entry {info!r}") from None
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {path} has dtype {dtype_name}; supported: "
                f"{sorted(_SAFETENSORS_DTYPES)}")
        dtype = _SAFETENSORS_DTYPES[dtype_name]
        if min(shape, default=0) < 0 or begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"tensor {name!r} in {path}: data_offsets do not match its shape")
        if data_start + end > file_size:
            raise CheckpointError(
                f"tensor {name!r} in {path}: its data ends at byte {data_start + end} but the file "
                f"has {file_size} bytes (truncated file?)")
        records[name] = _TensorRecord(path, dtype, shape, data_start + begin, end - begin)
    return records


class _SafetensorsReader:
    """All tensors of a (possibly index-sharded) checkpoint directory, read lazily via mmap."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
        single_path = os.path.join(directory, SAFE_WEIGHTS_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single_path):
            weight_map, files = None, [SAFE_WEIGHTS_NAME]
        else:
            raise CheckpointError(
                f"{directory}: neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} found")
        self.records: dict[str, _TensorRecord] = {}
        for file in files:
            path = os.path.join(directory, file)
            if not os.path.isfile(path):
                raise CheckpointError(f"{SAFE_WEIGHTS_INDEX_NAME} lists {file}, which is missing")
            for name, record in _read_safetensors_header(path).items():
                if name in self.records:
                    raise CheckpointError(f"tensor {name!r} appears in more than one file")
                if weight_map is not None and weight_map.get(name) != file:
                    raise CheckpointError(
                        f"tensor {name!r} is in {file} but the index maps it to "
                        f"{weight_map.get(name)!r}")
                self.records[name] = record
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.records))
            if absent:
                raise MissingTensorError(
                    f"{SAFE_WEIGHTS_INDEX_NAME} lists tensors absent from their files: {absent[:8]}")
        self._maps: dict[str, np.memmap] = {}

    def array(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view (no bytes read until indexed)."""
        record = self.records[name]
        if record.file not in self._maps:
            self._maps[record.file] = np.memmap(record.file, dtype=np.uint8, mode="r")
        return np.ndarray(record.shape, record.dtype, buffer=self._maps[record.file],
                          offset=record.offset)


def _write_safetensors(path: str, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                       fetch: Callable[[str], np.ndarray]) -> None:
    """Writes one safetensors file, fetching each tensor only when its bytes are written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape, dtype in tensors:
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise AssertionError(f"{name}: fetched {array.shape}, declared {shape}")
            f.write(array.tobytes())


# ============================================================================================
# Name mapping
# ============================================================================================
def _layer_of(key: str) -> int | None:
    return int(key.split("_", 1)[1]) if key.startswith("layers_") else None


def hf_tensor_name(path: Sequence[str], layer: int | None = None) -> tuple[str, bool]:
    """(HF tensor name, transposed?) of the param at `path` (tuple of keys).

    For scanned params (`path[0] == "layers"`) `layer` selects the slice of the leading axis.
    """
    leaf = path[-1]
    suffix = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}[leaf]
    transposed = leaf == "kernel"
    head = path[0]
    if head == "lm_head":
        return "lm_head.weight", True
    if head in ("embed_tokens", "norm"):
        return f"model.{head}.{suffix}", transposed
    index = layer if head == "layers" else _layer_of(head)
    if index is None:
        raise ValueError(f"no HF name for param path {'/'.join(path)}")
    return f"model.layers.{index}.{'.'.join(path[1:-1])}.{suffix}", transposed


@dataclasses.dataclass(frozen=True)
class _LeafSpec:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    sources: tuple[str, ...]     # HF names; one per layer for scanned leaves
    transposed: bool
    scanned: bool


def _leaf_specs(config: QwenConfig) -> tuple[Any, list[_LeafSpec]]:
    abstract = abstract_params(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    specs = []
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        scanned = path[0] == "layers"
        if scanned:
            names = [hf_tensor_name(path, i) for i in range(config.num_hidden_layers)]
        else:
            names = [hf_tensor_name(path)]
        specs.append(_LeafSpec(path, tuple(leaf.shape), tuple(n for n, _ in names), names[0][1],
                               scanned))
    return treedef, specs


def _hf_shape(spec: _LeafSpec) -> tuple[int, ...]:
    shape = spec.shape[1:] if spec.scanned else spec.shape
    return tuple(reversed(shape)) if spec.transposed else shape


# ============================================================================================
# load_hf / save_hf
# ============================================================================================
def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, shardings: Any = None,
            scan_layers: bool | None = None, *, compute_dtype: Any = None) -> tuple[QwenConfig, Any]:
    """Reads a HF Qwen2/2.5/3 checkpoint directory into a params pytree.

    Args:
      path: directory with `config.json` and `model.safetensors` or an index-sharded set.
      dtype: dtype of the returned arrays (becomes `config.param_dtype`).
      shardings: None (every array on the default device), one `jax.sharding.Sharding` for all
        leaves, or a pytree of shardings with the params' structure (e.g.
        `sharding.param_shardings(config, mesh)` for the config `QwenConfig.from_hf(path,
        scan_layers=...)`). Each device shard is assembled by `jax.make_array_from_callback`
        straight from the memory-mapped file, so no host holds more than about one tensor.
      scan_layers: param layout; None keeps `QwenConfig`'s default (False).
      compute_dtype: sets `config.dtype` when given.

    Returns:
      (config, params) with `params` matching `Qwen(config)`.

    Raises:
      MissingTensorError / UnexpectedTensorError / TensorShapeError: naming the tensors.
      UnsupportedConfigError: the config asks for an unsupported feature.
    """
    path = os.fspath(path)
    overrides: dict[str, Any] = {"param_dtype": dtype}
    if scan_layers is not None:
        overrides["scan_layers"] = scan_layers
    if compute_dtype is not None:
        overrides["dtype"] = compute_dtype
    config = QwenConfig.from_hf(path, **overrides)
    reader = _SafetensorsReader(path)
    treedef, specs = _leaf_specs(config)
    _check_tensors(config, reader, specs)

    target_dtype = np.dtype(config.param_dtype)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        leaf_shardings = [shardings] * len(specs)
    else:
        leaf_shardings = treedef.flatten_up_to(shardings)

    leaves = []
    for spec, sharding in zip(specs, leaf_shardings):
        views = [reader.array(name) for name in spec.sources]
        if spec.transposed:
            views = [view.T for view in views]  # still a lazy view of the memory map

        def fetch(index, views=views, scanned=spec.scanned, shape=spec.shape):
            index = tuple(index) if index is not None else (slice(None),) * len(shape)
            if scanned:
                layers = range(len(views))[index[0]]
                block = np.stack([views[i][index[1:]] for i in layers])
            else:
                block = views[0][index]
            # A copy, never a view of the memory map: the device buffer must not alias the file.
            return np.array(block, dtype=target_dtype, copy=True)

        leaves.append(jax.make_array_from_callback(spec.shape, sharding, fetch, dtype=target_dtype))
    return config, jax.tree_util.tree_unflatten(treedef, leaves)


def _check_tensors(config: QwenConfig, reader: _SafetensorsReader, specs: list[_LeafSpec]) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        for name in spec.sources:
            expected[name] = _hf_shape(spec)
    present = {name for name in reader.records
               if not name.endswith(IGNORED_HF_TENSOR_SUFFIXES)}
    missing = sorted(set(expected) - present)
    if missing:
        raise MissingTensorError(
            f"checkpoint is missing {len(missing)} tensor(s) the config needs: {missing[:8]}"
            + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(present - set(expected))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        # Some exports write the tied head explicitly; accept it only if it is the embedding.
        _check_tied_head(reader)
        unexpected.remove("lm_head.weight")
    if unexpected:
        raise UnexpectedTensorError(
            f"checkpoint has {len(unexpected)} tensor(s) the config does not use: "
            f"{unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
    for name, shape in expected.items():
        got = reader.records[name].shape
        if got != shape:
            raise TensorShapeError(f"tensor {name!r} has shape {list(got)}, expected {list(shape)}")


def _check_tied_head(reader: _SafetensorsReader, rows_per_chunk: int = 4096) -> None:
    head, embed = reader.array("lm_head.weight"), reader.array("model.embed_tokens.weight")
    if head.shape != embed.shape:
        raise TensorShapeError(
            f"tensor 'lm_head.weight' has shape {list(head.shape)} but tie_word_embeddings needs "
            f"the embedding's {list(embed.shape)}")
    for start in range(0, head.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        if not np.array_equal(head[rows], embed[rows]):
            raise UnexpectedTensorError(
                "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but the config "
                "sets tie_word_embeddings=true")


def save_hf(config: QwenConfig, params: Any, path: str | os.PathLike,
            max_shard_bytes: int = 5 * 2**30, dtype: Any = None) -> None:
    """Writes `params` as a HF checkpoint directory loadable by
    `transformers.AutoModelForCausalLM.from_pretrained`.

    Args:
      config: the model's config (`scan_layers` must describe `params`' layout).
      params: the params pytree (single-process: arrays must be fully addressable).
      path: output directory (created; existing files of the same names are overwritten).
      max_shard_bytes: above this total size the tensors go into several
        `model-0000k-of-0000n.safetensors` files plus `model.safetensors.index.json`.
      dtype: storage dtype (float32 / bfloat16 / float16); default: each array's own dtype.

    Host memory peaks at about one params leaf (a scanned leaf holds all its layers).

    Raises:
      MissingTensorError / UnexpectedTensorError / TensorShapeError: `params` does not have
        the structure and shapes `config` implies.
    """
    path = os.fspath(path)
    _, specs = _leaf_specs(config)
    leaves = _flatten_like(specs, params)
    storage = [np.dtype(dtype if dtype is not None else leaf.dtype) for leaf in leaves]
    for spec, leaf, leaf_dtype in zip(specs, leaves, storage):
        if leaf_dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"save_hf: dtype {leaf_dtype} of {'/'.join(spec.path)} "
                             f"cannot be stored; use one of float32, bfloat16, float16")
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(
                f"save_hf: {'/'.join(spec.path)} is not fully addressable by this process; "
                "gather it first (jax.experimental.multihost_utils.process_allgather)")

    # (name, hf shape, dtype, leaf number, layer) in leaf order, so each leaf is fetched once.
    entries = []
    for n, spec in enumerate(specs):
        for layer, name in enumerate(spec.sources):
            entries.append((name, _hf_shape(spec), storage[n], n,
                            layer if spec.scanned else None))
    shards: list[list[tuple]] = [[]]
    shard_bytes = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes

    os.makedirs(path, exist_ok=True)
    cache: dict[int, np.ndarray] = {}  # holds the host copy of the leaf being written

    def fetch_entry(entry) -> np.ndarray:
        _, _, _, n, layer = entry
        if n not in cache:
            cache.clear()
            cache[n] = np.asarray(jax.device_get(leaves[n]))
        array = cache[n] if layer is None else cache[n][layer]
        return array.T if specs[n].transposed else array

    total_size = sum(math.prod(e[1]) * e[2].itemsize for e in entries)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = (SAFE_WEIGHTS_NAME if len(shards) == 1
                else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
        by_name = {e[0]: e for e in shard}
        _write_safetensors(os.path.join(path, file), [(e[0], e[1], e[2]) for e in shard],
                           lambda name: fetch_entry(by_name[name]))
        weight_map.update({e[0]: file for e in shard})
    if len(shards) > 1:
        with open(os.path.join(path, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f,
                      indent=2)
    stored = {str(d) for d in storage}
    hf_config = config.to_hf()
    hf_config["dtype"] = stored.pop() if len(stored) == 1 else "float32"
    hf_config["torch_dtype"] = hf_config["dtype"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


def _flatten_like(specs: list[_LeafSpec], params: Any) -> list:
    """`params`' leaves in `specs` order, checking names and shapes against the config."""
    flat = {tuple(k.key for k in key_path): leaf
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    wanted = {spec.path for spec in specs}
    missing = sorted("/".join(p) for p in wanted - set(flat))
    if missing:
        raise MissingTensorError(f"params lack {missing[:8]} that the config implies")
    unexpected = sorted("/".join(p) for p in set(flat) - wanted)
    if unexpected:
        raise UnexpectedTensorError(f"params have {unexpected[:8]} that the config does not use")
    for spec in specs:
        if tuple(flat[spec.path].shape) != spec.shape:
            raise TensorShapeError(
                f"param {'/'.join(spec.path)} has shape {list(flat[spec.path].shape)}, expected "
                f"{list(spec.shape)}")
    return [flat[spec.path] for spec in specs]


# ============================================================================================
# Orbax params checkpoints
# ============================================================================================
def save_orbax(config: QwenConfig, params: Any, directory: str | os.PathLike) -> None:
    """Writes `directory/params` (orbax StandardCheckpointer) and `directory/qwen_config.json`."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, ORBAX_PARAMS_DIR), params)
        checkpointer.wait_until_finished()
    with open(os.path.join(directory, ORBAX_CONFIG_NAME), "w") as f:
        json.dump(config.to_dict(), f, indent=2)


_RUNTIME_FIELDS = ("param_dtype", "dtype", "scan_layers", "remat")


def read_orbax_config(directory: str | os.PathLike) -> QwenConfig:
    """The `QwenConfig` stored next to an orbax params checkpoint (`qwen_config.json`)."""
    path = os.path.join(os.fspath(directory), ORBAX_CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {ORBAX_CONFIG_NAME}; not written by save_orbax?")
    with open(path) as f:
        return QwenConfig.from_dict(json.load(f))


def load_orbax_params(directory: str | os.PathLike, config: QwenConfig,
                      shardings: Any = None) -> Any:
    """Restores the params of an orbax params checkpoint into the layout of `config`.

    The stored architecture must equal `config`'s (runtime fields aside) and so must
    `scan_layers` (it changes the tree); arrays are restored as `config.param_dtype` (orbax
    casts when the stored dtype differs). `shardings`: None (default device), one Sharding, or a
    pytree of shardings like the params (e.g. `sharding.param_shardings(config, mesh)`).

    Raises:
      CheckpointError: the stored config describes a different model or layout.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    stored = read_orbax_config(directory)
    differences = sorted(
        f.name for f in dataclasses.fields(QwenConfig)
        if f.name not in _RUNTIME_FIELDS and getattr(stored, f.name) != getattr(config, f.name))
    if differences:
        raise CheckpointError(
            f"{directory}: stored config differs from the requested one in {differences}")
    if stored.scan_layers != config.scan_layers:
        raise CheckpointError(
            f"{directory}: params were stored with scan_layers={stored.scan_layers}, requested "
            f"scan_layers={config.scan_layers}; convert with the matching --scan-layers flag")
    abstract = abstract_params(config)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(directory, ORBAX_PARAMS_DIR), target)


def load_orbax(directory: str | os.PathLike, shardings: Any = None,
               **config_overrides) -> tuple[QwenConfig, Any]:
    """Reads a directory written by `save_orbax`: `(config, params)`.

    `config_overrides` may change runtime fields (`dtype`, `remat`, `param_dtype` — the arrays
    are cast to it); the stored `scan_layers` must be kept. `shardings` as in
    `load_orbax_params`.
    """
    config = dataclasses.replace(read_orbax_config(directory), **config_overrides)
    return config, load_orbax_params(directory, config, shardings)


# ============================================================================================
# CLI
# ============================================================================================
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m effopd_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_orbax = sub.add_parser("hf-to-orbax", help="HF safetensors directory -> orbax params")
    to_orbax.add_argument("src")
    to_orbax.add_argument("dst")
    to_orbax.add_argument("--dtype", default="float32", help="params dtype (default float32)")
    to_orbax.add_argument("--scan-layers", action="store_true",
                          help="store layers stacked under layers/ (for scan_layers=True)")
    to_hf = sub.add_parser("orbax-to-hf", help="orbax params -> HF safetensors directory")
    to_hf.add_argument("src")
    to_hf.add_argument("dst")
    to_hf.add_argument("--dtype", default=None, help="storage dtype (default: params dtype)")
    to_hf.add_argument("--max-shard-bytes", type=int, default=5 * 2**30)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.command == "hf-to-orbax":
        config, params = load_hf(args.src, dtype=jnp.dtype(args.dtype),
                                 scan_layers=args.scan_layers)
        save_orbax(config, params, args.dst)
    else:
        config, params = load_orbax(args.src)
        save_hf(config, params, args.dst, max_shard_bytes=args.max_shard_bytes,
                dtype=None if args.dtype is None else jnp.dtype(args.dtype))
    print(f"{args.command}: {args.src} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
