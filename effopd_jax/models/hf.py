"""Hugging Face safetensors checkpoints <-> params pytrees, for every registered family.

HF checkpoint layout (what `transformers.save_pretrained` writes): `config.json` plus either
`model.safetensors`, or `model-0000k-of-0000n.safetensors` shards listed by
`model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor: file}}`).

Which tensor feeds which leaf, in which orientation, comes from the family's layout
(`ParamInfo.hf_names`, `.transpose`, `.stack_axes`): nothing here knows a parameter name.

Safetensors files are read through a memory map of the documented format (8-byte little-endian
header length, JSON header, raw little-endian data) rather than `safetensors.safe_open(framework=
"np")`, because numpy has no bfloat16 and that reader rejects BF16 tensors, the dtype every
published Qwen checkpoint uses; `ml_dtypes.bfloat16` (a JAX dependency) covers it. The memory map
means each device shard reads only the bytes it needs. A leaf that stacks several HF tensors
over the decoder layers (scanned layers, with or without a mixture of experts' `experts` axis
after it) is assembled one layer at a time, each written into the sharded array on device, so a
host holds at most one layer's local blocks of one module, never the whole stack; saving fetches
such leaves one layer at a time too.

Orientation: `ParamInfo.transpose` reverses every axis of each per-tensor slice (`[in, out]` here,
`[out, in]` in HF): for a matrix, one expert's included, that is the plain transpose; for a
3-D leaf (Qwen3.5's conv kernel `[K, 1, channels]`, HF `[channels, 1, K]`) all three axes reverse.

Errors: every problem with a checkpoint raises a `CheckpointError` subclass naming the tensor(s);
config problems raise `UnsupportedConfigError` (or ValueError naming the file). A tensor the
model needs is never initialised when the checkpoint lacks it.

Two storage forms: a stacked leaf whose layout entry has `ParamInfo.hf_fused` (e.g.
Qwen3.5-MoE's experts) may be stored one HF tensor per slice (`hf_names`) or its last stack axis
fused into one tensor per layer (`gate_up_proj [E, 2I, H]`, the leaf one chunk of it). The
form is told from the tensor names; a layer holding both, or layers in different forms, raise
`CheckpointError`. Fused tensors are read through lazy views of the leaf's chunk (streamed like
any stacked leaf); `save_hf` writes the form of `carry_from` (separate tensors without one).

Carried tensors: a family may declare HF name prefixes of tensors that belong to its published
checkpoints but not to the model (`ModelFamily.carried_hf_prefixes`, e.g. Qwen3.5's vision tower
`model.visual.` and MTP head `mtp.`). Loading leaves them untouched and reports them in one log
line (logger `effopd_jax.models.hf`, level WARNING) instead of refusing them; `save_hf(...,
carry_from=source)` copies them byte for byte from the source checkpoint into the export, so
`transformers` loads it as the class it came from. Any other tensor the model does not use is
still an `UnexpectedTensorError`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from effopd_jax.models.family import (
    EMBEDDING, LM_HEAD, ModelConfig, ParamInfo, family_for, read_hf_config,
)

PyTree = Any

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
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
# Leaves of a config: layout entry + shape
# ============================================================================================
@dataclasses.dataclass(frozen=True)
class _Leaf:
    info: ParamInfo
    shape: tuple[int, ...]

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.shape[:len(self.info.stack_axes)]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of each HF tensor feeding this leaf."""
        per_tensor = self.shape[len(self.info.stack_axes):]
        return tuple(reversed(per_tensor)) if self.info.transpose else per_tensor

    @property
    def fused_shape(self) -> tuple[int, ...]:
        """The shape of each fused HF tensor (`info.hf_fused`): `[n, parts * d0, d1, ...]`."""
        first, *rest = self.hf_shape
        return (self.stack_shape[-1], self.info.hf_fused.parts * first, *rest)

    def names(self, fused: bool) -> tuple[str, ...]:
        """The HF tensors feeding the leaf in the per-tensor or (with `fused`) the fused form."""
        return self.info.hf_fused.names if fused and self.info.hf_fused else self.info.hf_names


@functools.lru_cache(maxsize=32)
def _leaves(config: ModelConfig) -> tuple[Any, tuple[_Leaf, ...]]:
    """The params' treedef and leaves of `config`; cached (configs are hashable, and tracing the
    family's init for the shapes costs seconds on a many-layer model)."""
    family = family_for(config)
    abstract = jax.eval_shape(lambda key: family.init_params(config, key), jax.random.key(0))
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    layout = family.layout(config)
    leaves = []
    for (key_path, leaf), info in zip(flat, layout.params, strict=True):
        path = tuple(k.key for k in key_path)
        if path != info.path:
            raise AssertionError(f"layout order differs from the params tree at {path} vs {info.path}")
        leaf_info = _Leaf(info, tuple(leaf.shape))
        if len(info.hf_names) != math.prod(leaf_info.stack_shape):
            raise AssertionError(f"{info.name}: {len(info.hf_names)} HF names for stack shape "
                                 f"{leaf_info.stack_shape}")
        if info.hf_fused and len(info.hf_fused.names) != math.prod(leaf_info.stack_shape[:-1]):
            raise AssertionError(f"{info.name}: {len(info.hf_fused.names)} fused HF names for "
                                 f"stack shape {leaf_info.stack_shape}")
        leaves.append(leaf_info)
    return treedef, tuple(leaves)


# ============================================================================================
# load_hf / save_hf
# ============================================================================================
def config_from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any], **runtime: Any) -> ModelConfig:
    """The family config of a HF checkpoint directory, `config.json` file or dict.

    `runtime` sets runtime fields (`param_dtype`, `dtype`, `scan_layers`, `remat`).

    Raises:
      UnsupportedConfigError: no registered family reads the `model_type`, or the family refuses
        a field (named in the message).
      FileNotFoundError / ValueError: no config.json, or not a JSON object (naming the file).
    """
    hf = read_hf_config(path_or_dict)
    return family_for(str(hf.get("model_type"))).config_from_hf(hf, **runtime)


def load_hf(path: str | os.PathLike, *, param_dtype: Any = "float32", compute_dtype: Any = "bfloat16",
            shardings: Any = None, scan_layers: bool = False, remat: str = "none"
            ) -> tuple[ModelConfig, PyTree]:
    """Reads a HF checkpoint directory of any registered family into a params pytree.

    Args:
      path: directory with `config.json` and `model.safetensors` or an index-sharded set.
      param_dtype: dtype of the returned arrays (`config.param_dtype`).
      compute_dtype: the forward's compute dtype (`config.dtype`).
      shardings: None (every array on the default device), one `jax.sharding.Sharding` for all
        leaves, a `jax.sharding.Mesh` (the params are laid out by `sharding.param_shardings`),
        or a pytree of shardings with the params' structure. Each device shard is assembled by
        `jax.make_array_from_callback` straight from the memory-mapped file, so no host holds
        more than about one tensor.
      scan_layers: stack the decoder layers on a leading axis (`config.scan_layers`).
      remat: activation checkpointing policy (`config.remat`).

    Returns:
      `(config, params)`, `params` matching `forward(config, params, ...)`.

    Raises:
      MissingTensorError / UnexpectedTensorError / TensorShapeError: naming the tensors.
      UnsupportedConfigError: the config asks for something no family implements.
    """
    path = os.fspath(path)
    config = config_from_hf(path, param_dtype=param_dtype, dtype=compute_dtype,
                            scan_layers=scan_layers, remat=remat)
    return config, load_params(path, config, shardings)


def load_params(path: str | os.PathLike, config: ModelConfig, shardings: Any = None) -> PyTree:
    """The params of `config` read from the HF checkpoint directory `path` (see `load_hf`;
    `config` decides the layout and dtype, the file's config.json is not read)."""
    path = os.fspath(path)
    reader = _SafetensorsReader(path)
    treedef, leaves = _leaves(config)
    carried, fused = _check_tensors(config, reader, leaves)
    if carried:
        logger.warning("%s: %d tensor(s) the model does not use are left untouched (carried "
                       "through on export with save_hf(carry_from=...)): %s", path, len(carried),
                       _summarize_prefixes(carried, family_for(config).carried_hf_prefixes(config)))

    target_dtype = np.dtype(config.param_dtype)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Mesh):
        from effopd_jax import sharding as sharding_lib  # noqa: PLC0415  (sharding imports models)

        shardings = sharding_lib.param_shardings(config, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        leaf_shardings = [shardings] * len(leaves)
    else:
        leaf_shardings = treedef.flatten_up_to(shardings)

    arrays = []
    for leaf, sharding in zip(leaves, leaf_shardings):
        if fused and leaf.info.hf_fused:
            # Lazy views of this leaf's chunk of each fused slice, in `hf_names` order.
            rows, part = leaf.hf_shape[0], leaf.info.hf_fused.part
            views = [reader.array(name)[j, part * rows:(part + 1) * rows]
                     for name in leaf.info.hf_fused.names for j in range(leaf.stack_shape[-1])]
        else:
            views = [reader.array(name) for name in leaf.info.hf_names]
        if leaf.info.transpose:  # still lazy views of the memory map
            views = [view.T for view in views]
        arrays.append(_assemble_leaf(leaf.shape, leaf.stack_shape, views, sharding, target_dtype,
                                     by_layer=_layer_stacked(leaf)))
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _layer_stacked(leaf: _Leaf) -> bool:
    """Whether the leaf's leading axis stacks several decoder layers (streamed layer by layer)."""
    return leaf.info.stack_axes[:1] == ("layers",) and leaf.shape[0] > 1


def _assemble_leaf(shape: tuple[int, ...], stack_shape: tuple[int, ...], views: list[np.ndarray],
                   sharding: jax.sharding.Sharding, dtype: np.dtype, *, by_layer: bool) -> jax.Array:
    """The array `shape` laid out by `sharding`, from the HF tensor `views` (one per index of
    `stack_shape`, row-major). With `by_layer` (a leaf stacked over layers) it is built one
    slice of its leading axis at a time (host memory: one layer's local blocks) when the
    sharding can describe a slice."""
    slice_sharding = _leading_slice_sharding(sharding, len(shape)) if by_layer else None
    if slice_sharding is None:
        return jax.make_array_from_callback(shape, sharding, _block_reader(views, stack_shape, dtype),
                                            dtype=dtype)
    per_slice = math.prod(stack_shape[1:])
    out = _zeros(shape, dtype, sharding)()
    write = _slice_writer(shape, dtype, sharding)
    for i in range(shape[0]):
        part = jax.make_array_from_callback(
            shape[1:], slice_sharding,
            _block_reader(views[i * per_slice:(i + 1) * per_slice], stack_shape[1:], dtype),
            dtype=dtype)
        # Waited for: with asynchronous dispatch the loop would otherwise read every layer
        # before the first write ran, holding them all on the host at once.
        out = write(out, part, i).block_until_ready()
    return out


def _leading_slice_sharding(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding | None:
    """The sharding of `x[i]` for an `ndim`-D array laid out by `sharding`, when expressible."""
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return None


@functools.lru_cache(maxsize=64)
def _zeros(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding) -> Callable:
    return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=64)
def _slice_writer(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding) -> Callable:
    """`(full, part, i) -> full.at[i].set(part)`, in place (the full array is donated)."""
    del dtype  # part of the cache key only
    return jax.jit(lambda full, part, i: jax.lax.dynamic_update_index_in_dim(full, part, i, 0),
                   donate_argnums=0, out_shardings=sharding)


def _block_reader(views: list[np.ndarray], stack_shape: tuple[int, ...], dtype: np.dtype) -> Callable:
    """The callback that assembles one device's block from the per-tensor views (one view per
    index of `stack_shape`, the leading axes of the block)."""
    stack_rank = len(stack_shape)
    ndim = stack_rank + views[0].ndim

    def fetch(index):
        index = tuple(index) if index is not None else (slice(None),) * ndim
        if not stack_rank:
            # A copy, never a view of the memory map: the device buffer must not alias the file.
            return np.array(views[0][index], dtype=dtype, copy=True)
        # The stacked axes index the HF tensors; copy each selected tensor's slice into place.
        selected = [range(size)[index[axis]] for axis, size in enumerate(stack_shape)]
        first = views[0][index[stack_rank:]]
        block = np.empty(tuple(len(s) for s in selected) + first.shape, dtype)
        for position, multi in zip(itertools.product(*(range(len(s)) for s in selected)),
                                   itertools.product(*selected)):
            block[position] = views[int(np.ravel_multi_index(multi, stack_shape))][index[stack_rank:]]
        return block

    return fetch


def _carried_names(config: ModelConfig, names: Any, expected: Any = ()) -> list[str]:
    """The names among `names` under the family's carried prefixes (and not model params)."""
    prefixes = family_for(config).carried_hf_prefixes(config)
    if not prefixes:
        return []
    return sorted(n for n in names if n.startswith(prefixes) and n not in expected)


def _summarize_prefixes(names: Sequence[str], prefixes: Sequence[str]) -> str:
    """`model.visual.* (297), mtp.* (15)`: how many names fall under each prefix."""
    counts = {prefix: sum(1 for n in names if n.startswith(prefix)) for prefix in prefixes}
    return ", ".join(f"{prefix}* ({count})" for prefix, count in counts.items() if count)


def _stored_fused(names: Any, leaves: Sequence[_Leaf]) -> bool:
    """Whether the checkpoint whose tensor names are `names` stores the leaves that have a fused
    form (`ParamInfo.hf_fused`) fused; False when no leaf has one.

    Raises:
      CheckpointError: a layer holds both forms of a leaf, or some layers are fused and others not.
    """
    names = set(names)
    forms: dict[bool, str] = {}  # form -> one fused tensor name showing it
    for leaf in leaves:
        fused = leaf.info.hf_fused
        if fused is None:
            continue
        per_slice = leaf.stack_shape[-1]
        for i, fused_name in enumerate(fused.names):
            separate = [n for n in leaf.info.hf_names[i * per_slice:(i + 1) * per_slice] if n in names]
            if fused_name in names and separate:
                raise CheckpointError(
                    f"checkpoint holds {fused_name!r} and also {len(separate)} of the separate tensors "
                    f"it fuses (e.g. {separate[0]!r}); a layer must store them one way")
            if fused_name in names:
                forms.setdefault(True, fused_name)
            elif separate:
                forms.setdefault(False, separate[0])
    if len(forms) > 1:
        raise CheckpointError(
            f"checkpoint mixes fused and separate storage across layers (e.g. {forms[True]!r} and "
            f"{forms[False]!r}); expected one form throughout")
    return True in forms


def _expected_shapes(leaves: Sequence[_Leaf], fused: bool) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of the tensors feeding `leaves` in the chosen form."""
    expected: dict[str, tuple[int, ...]] = {}
    for leaf in leaves:
        shape = leaf.fused_shape if fused and leaf.info.hf_fused else leaf.hf_shape
        for name in leaf.names(fused):
            expected[name] = shape
    return expected


def _check_tensors(config: ModelConfig, reader: _SafetensorsReader, leaves: Sequence[_Leaf]
                   ) -> tuple[list[str], bool]:
    """Checks the checkpoint's tensors against the config; returns the carried tensors' names
    and whether the leaves with a fused form are stored fused."""
    present = {name for name in reader.records
               if not name.endswith(IGNORED_HF_TENSOR_SUFFIXES)}
    fused = _stored_fused(present, leaves)
    expected = _expected_shapes(leaves, fused)
    carried = _carried_names(config, present, expected)
    present -= set(carried)
    missing = sorted(set(expected) - present)
    if missing:
        fused_forms = [leaf.info.hf_fused.names[0] for leaf in leaves if leaf.info.hf_fused]
        raise MissingTensorError(
            f"checkpoint is missing {len(missing)} tensor(s) the config needs: {missing[:8]}"
            + (" ..." if len(missing) > 8 else "")
            + (f" (or, fused, e.g. {fused_forms[0]!r})" if fused_forms and not fused else ""))
    unexpected = sorted(present - set(expected))
    tied_head = _tied_head_name(config, leaves)
    if tied_head is not None and tied_head in unexpected:
        # Some exports write the tied head explicitly; accept it only if it is the embedding.
        embedding = next(leaf.info.hf_names[0] for leaf in leaves if leaf.info.role == EMBEDDING)
        _check_tied_head(reader, tied_head, embedding)
        unexpected.remove(tied_head)
    if unexpected:
        raise UnexpectedTensorError(
            f"checkpoint has {len(unexpected)} tensor(s) the config does not use: "
            f"{unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
    for name, shape in expected.items():
        got = reader.records[name].shape
        if got != shape:
            raise TensorShapeError(f"tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    return carried, fused


def _tied_head_name(config: ModelConfig, leaves: Sequence[_Leaf]) -> str | None:
    """The HF name an untied head would have, when the config ties it to the embedding."""
    if not getattr(config, "tie_word_embeddings", False):
        return None
    if any(leaf.info.role == LM_HEAD for leaf in leaves):
        return None
    return "lm_head.weight"


def _check_tied_head(reader: _SafetensorsReader, head_name: str, embedding_name: str,
                     rows_per_chunk: int = 4096) -> None:
    head, embed = reader.array(head_name), reader.array(embedding_name)
    if head.shape != embed.shape:
        raise TensorShapeError(
            f"tensor {head_name!r} has shape {list(head.shape)} but tie_word_embeddings needs "
            f"the embedding's {list(embed.shape)}")
    for start in range(0, head.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        if not np.array_equal(head[rows], embed[rows]):
            raise UnexpectedTensorError(
                f"tensor {head_name!r} differs from {embedding_name!r} but the config sets "
                "tie_word_embeddings=true")


def save_hf(config: ModelConfig, params: PyTree, path: str | os.PathLike, *,
            dtype: Any = None, max_shard_bytes: int = 5 * 2**30,
            carry_from: str | os.PathLike | None = None) -> None:
    """Writes `params` as a HF checkpoint directory that `transformers` loads as the class the
    config names (`config.to_hf()["architectures"]`, e.g. `AutoModelForCausalLM`).

    Args:
      config: the model's config (`scan_layers` must describe `params`' layout).
      params: the params pytree (single-process: arrays must be fully addressable).
      path: output directory (created; existing files of the same names are overwritten).
      dtype: storage dtype (float32 / bfloat16 / float16) of the params; default: each array's
        own dtype. Carried tensors keep their stored dtype.
      max_shard_bytes: above this total size the tensors go into several
        `model-0000k-of-0000n.safetensors` files plus `model.safetensors.index.json`.
      carry_from: the HF checkpoint directory the model came from: every tensor of it under
        the family's carried prefixes (`ModelFamily.carried_hf_prefixes`, e.g. a vision tower,
        an MTP head) is copied unchanged into the export (ignored when the family carries
        nothing). None: nothing is carried, and for a family that carries tensors a warning
        names the prefixes left out. Leaves with two storage forms (`ParamInfo.hf_fused`,
        e.g. fused experts) are written in the form `carry_from` stores them in; without
        `carry_from`, one tensor per slice (`hf_names`).

    Host memory peaks at about one unstacked leaf, one leading slice (one layer) of a
    stacked leaf, or one carried tensor.

    Raises:
      MissingTensorError / UnexpectedTensorError / TensorShapeError: `params` does not have
        the structure and shapes `config` implies.
      CheckpointError: `carry_from` is not a checkpoint directory.
    """
    path = os.fspath(path)
    _, leaves = _leaves(config)
    arrays = _flatten_like(leaves, params)
    prefixes = family_for(config).carried_hf_prefixes(config)
    carry_reader, carried, fused = None, [], False
    if carry_from is not None and (prefixes or any(leaf.info.hf_fused for leaf in leaves)):
        carry_reader = _SafetensorsReader(os.fspath(carry_from))
        # The source's storage form of the leaves that have two (e.g. fused experts).
        fused = _stored_fused(carry_reader.records, leaves)
    if carry_reader is not None and prefixes:
        carried = _carried_names(config, carry_reader.records,
                                 {name for leaf in leaves for name in leaf.info.hf_names}
                                 | set(_expected_shapes(leaves, fused)))
    elif prefixes:
        logger.warning("save_hf(%s): no carry_from checkpoint, so no %s tensors (not used by "
                       "this model) are written", path, ", ".join(p + "*" for p in prefixes))
    storage = [np.dtype(dtype if dtype is not None else array.dtype) for array in arrays]
    for leaf, array, leaf_dtype in zip(leaves, arrays, storage):
        if leaf_dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"save_hf: dtype {leaf_dtype} of {leaf.info.name} "
                             f"cannot be stored; use one of float32, bfloat16, float16")
        if isinstance(array, jax.Array) and not array.is_fully_addressable:
            raise ValueError(
                f"save_hf: {leaf.info.name} is not fully addressable by this process; "
                "gather it first (jax.experimental.multihost_utils.process_allgather)")

    # (name, hf shape, dtype, leaf number, slice number) in leaf order: each leaf is fetched once;
    # carried tensors (leaf number None) follow, read from the source when written. A fused
    # tensor's entry has the leaf numbers of its parts (a tuple) and the fused slice number.
    entries = []
    fused_parts: dict[str, list[int]] = {}  # fused name -> its leaves, by part
    for n, leaf in enumerate(leaves):
        if fused and leaf.info.hf_fused:
            for name in leaf.info.hf_fused.names:
                fused_parts.setdefault(name, [None] * leaf.info.hf_fused.parts)[leaf.info.hf_fused.part] = n
    written_fused = set()
    for n, leaf in enumerate(leaves):
        if fused and leaf.info.hf_fused:
            for slice_number, name in enumerate(leaf.info.hf_fused.names):
                if name not in written_fused:
                    if None in fused_parts[name]:
                        raise AssertionError(f"{name}: the layout lacks a part of the fused tensor")
                    written_fused.add(name)
                    entries.append((name, leaf.fused_shape, storage[n], tuple(fused_parts[name]),
                                    slice_number))
            continue
        stacked = bool(leaf.info.stack_axes)
        for slice_number, name in enumerate(leaf.info.hf_names):
            entries.append((name, leaf.hf_shape, storage[n], n, slice_number if stacked else None))
    for name in carried:
        record = carry_reader.records[name]
        entries.append((name, record.shape, record.dtype, None, None))
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
    # The host copy of what is being written: a whole unstacked leaf, or one leading slice of a
    # stacked one (one layer of a scanned leaf), never a whole stack.
    cache: dict[tuple[int, int], np.ndarray] = {}

    def fetch_entry(entry) -> np.ndarray:
        name, _, _, n, slice_number = entry
        if n is None:  # a carried tensor: its bytes as stored in the source
            return carry_reader.array(name)
        if isinstance(n, tuple):  # a fused tensor: its parts' slices side by side
            return np.concatenate([fetch_fused_part(m, slice_number) for m in n], axis=1)
        stack_shape = leaves[n].stack_shape
        if slice_number is None or not _layer_stacked(leaves[n]):
            key, inner = (n, 0), slice_number
        else:
            per_slice = math.prod(stack_shape[1:])
            key, inner = (n, slice_number // per_slice), slice_number % per_slice
        if key not in cache:
            cache.clear()
            array = arrays[n]
            if slice_number is not None and _layer_stacked(leaves[n]):
                array = _leading_slice(array, key[1]) if isinstance(array, jax.Array) else array[key[1]]
            cache[key] = np.asarray(jax.device_get(array))
        array = cache[key]
        if inner is not None:
            stacked_rank = len(stack_shape) - (1 if _layer_stacked(leaves[n]) else 0)
            array = array.reshape((-1,) + array.shape[stacked_rank:])[inner]
        return array.T if leaves[n].info.transpose else array

    def fetch_fused_part(n: int, fused_slice: int) -> np.ndarray:
        """Leaf `n`'s HF tensors `[n_last, d0, ...]` along its last stack axis at index
        `fused_slice` of the others (host memory: one layer of the leaf)."""
        leaf, array = leaves[n], arrays[n]
        inner_shape = leaf.shape[len(leaf.stack_shape) - 1:]  # [n_last, *per-tensor leaf shape]
        if _layer_stacked(leaf):
            per_slice = math.prod(leaf.stack_shape[1:-1])
            layer, fused_slice = divmod(fused_slice, per_slice)
            array = _leading_slice(array, layer) if isinstance(array, jax.Array) else array[layer]
        block = np.asarray(jax.device_get(array)).reshape((-1,) + inner_shape)[fused_slice]
        if leaf.info.transpose:  # every per-tensor axis reverses, the stack axis stays first
            block = block.transpose(0, *range(block.ndim - 1, 0, -1))
        return block

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
    if carried:
        logger.info("save_hf(%s): carried %d tensor(s) from %s: %s", path, len(carried),
                    carry_from, _summarize_prefixes(carried, prefixes))
    stored = {str(d) for d in storage}
    hf_config = config.to_hf()
    hf_config["dtype"] = stored.pop() if len(stored) == 1 else "float32"
    hf_config["torch_dtype"] = hf_config["dtype"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


@jax.jit
def _leading_slice(array: jax.Array, i: jax.Array) -> jax.Array:
    """`array[i]` on device (one compilation per shape, whatever `i`)."""
    return jax.lax.dynamic_index_in_dim(array, i, 0, keepdims=False)


def _flatten_like(leaves: Sequence[_Leaf], params: PyTree) -> list:
    """`params`' leaves in layout order, checking names and shapes against the config."""
    flat = {tuple(k.key for k in key_path): leaf
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    wanted = {leaf.info.path for leaf in leaves}
    missing = sorted("/".join(p) for p in wanted - set(flat))
    if missing:
        raise MissingTensorError(f"params lack {missing[:8]} that the config implies")
    unexpected = sorted("/".join(p) for p in set(flat) - wanted)
    if unexpected:
        raise UnexpectedTensorError(f"params have {unexpected[:8]} that the config does not use")
    for leaf in leaves:
        if tuple(flat[leaf.info.path].shape) != leaf.shape:
            raise TensorShapeError(
                f"param {leaf.info.name} has shape {list(flat[leaf.info.path].shape)}, expected "
                f"{list(leaf.shape)}")
    return [flat[leaf.info.path] for leaf in leaves]
