"""Checkpoint conversion: Hugging Face safetensors <-> orbax params directories, and its CLI.

The HF side lives in `effopd_jax.models` (`load_hf`, `save_hf`, for every registered family);
this module keeps the older entry points `convert.load_hf` / `convert.save_hf` (same arguments
as before) and adds orbax params checkpoints:

    python -m effopd_jax.convert hf-to-orbax SRC_HF_DIR DST_DIR [--dtype bfloat16] [--scan-layers]
    python -m effopd_jax.convert orbax-to-hf SRC_DIR DST_HF_DIR [--dtype bfloat16]
                                             [--max-shard-bytes N]

An orbax params directory holds `params/` (an `orbax.checkpoint.StandardCheckpointer` checkpoint
of the params pytree) and `model_config.json` (the family config's `to_dict()`, with its
`model_type`; directories written before the model registry have `qwen_config.json`, read the
same way).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from effopd_jax import models
from effopd_jax.models import (
    CheckpointError,
    MissingTensorError,
    ModelConfig,
    TensorShapeError,
    UnexpectedTensorError,
    UnsupportedConfigError,
)

__all__ = [
    "CheckpointError", "MissingTensorError", "UnexpectedTensorError", "TensorShapeError",
    "UnsupportedConfigError", "load_hf", "save_hf", "save_orbax", "load_orbax",
    "load_orbax_params", "read_orbax_config", "main",
]

ORBAX_PARAMS_DIR = "params"
ORBAX_CONFIG_NAME = "model_config.json"
LEGACY_ORBAX_CONFIG_NAME = "qwen_config.json"
# Fields that do not change the stored params' values (only how they are used).
_RUNTIME_FIELDS = ("param_dtype", "dtype", "scan_layers", "remat")


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, shardings: Any = None,
            scan_layers: bool | None = None, *, compute_dtype: Any = None) -> tuple[ModelConfig, Any]:
    """`models.load_hf` with this module's original argument names: `dtype` is the params'
    dtype, `compute_dtype` defaults to the family config's default, `scan_layers` to False."""
    runtime: dict[str, Any] = {"param_dtype": dtype, "scan_layers": bool(scan_layers)}
    if compute_dtype is not None:
        runtime["dtype"] = compute_dtype
    config = models.config_from_hf(path, **runtime)
    return config, models.load_params(path, config, shardings)


def save_hf(config: ModelConfig, params: Any, path: str | os.PathLike,
            max_shard_bytes: int = 5 * 2**30, dtype: Any = None) -> None:
    """`models.save_hf` with this module's original positional order."""
    models.save_hf(config, params, path, dtype=dtype, max_shard_bytes=max_shard_bytes)


def is_orbax_params_dir(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a directory written by :func:`save_orbax`."""
    path = os.fspath(path)
    return os.path.isdir(os.path.join(path, ORBAX_PARAMS_DIR)) and any(
        os.path.isfile(os.path.join(path, name)) for name in (ORBAX_CONFIG_NAME, LEGACY_ORBAX_CONFIG_NAME))


def save_orbax(config: ModelConfig, params: Any, directory: str | os.PathLike) -> None:
    """Writes `directory/params` (orbax StandardCheckpointer) and `directory/model_config.json`."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, ORBAX_PARAMS_DIR), params)
        checkpointer.wait_until_finished()
    with open(os.path.join(directory, ORBAX_CONFIG_NAME), "w") as f:
        json.dump(config.to_dict(), f, indent=2)


def read_orbax_config(directory: str | os.PathLike) -> ModelConfig:
    """The model config stored next to an orbax params checkpoint, built by its family."""
    for name in (ORBAX_CONFIG_NAME, LEGACY_ORBAX_CONFIG_NAME):
        path = os.path.join(os.fspath(directory), name)
        if os.path.isfile(path):
            with open(path) as f:
                fields = json.load(f)
            return models.family_for(str(fields.get("model_type"))).config_from_dict(fields)
    raise CheckpointError(f"{directory}: no {ORBAX_CONFIG_NAME}; not written by save_orbax?")


def load_orbax_params(directory: str | os.PathLike, config: ModelConfig,
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
    if type(stored) is not type(config):
        raise CheckpointError(
            f"{directory}: stored model_type {stored.model_type!r} differs from the requested "
            f"{config.model_type!r}")
    differences = sorted(
        f.name for f in dataclasses.fields(config)
        if f.name not in _RUNTIME_FIELDS and getattr(stored, f.name) != getattr(config, f.name))
    if differences:
        raise CheckpointError(
            f"{directory}: stored config differs from the requested one in {differences}")
    if stored.scan_layers != config.scan_layers:
        raise CheckpointError(
            f"{directory}: params were stored with scan_layers={stored.scan_layers}, requested "
            f"scan_layers={config.scan_layers}; convert with the matching --scan-layers flag")
    abstract = models.abstract_params(config)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(directory, ORBAX_PARAMS_DIR), target)


def load_orbax(directory: str | os.PathLike, shardings: Any = None,
               **config_overrides) -> tuple[ModelConfig, Any]:
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
        config, params = models.load_hf(args.src, param_dtype=jnp.dtype(args.dtype),
                                        scan_layers=args.scan_layers)
        save_orbax(config, params, args.dst)
    else:
        config, params = load_orbax(args.src)
        models.save_hf(config, params, args.dst, max_shard_bytes=args.max_shard_bytes,
                       dtype=None if args.dtype is None else jnp.dtype(args.dtype))
    print(f"{args.command}: {args.src} -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
