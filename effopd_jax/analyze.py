"""Offline foresight analysis over a series of checkpoints: CSV files, PNG plots, rank-k export.

    python -m effopd_jax.analyze --checkpoints BASE CKPT_1 ... CKPT_T --out DIR [--k 8]
        [--rank-k-export K [--alpha 1.0] [--export-dtype bfloat16]] [--svd-method auto]
        [--topk-only] [--keep-order] [--seed 0]

Each checkpoint is one of
  hf     a Hugging Face directory (``config.json`` + safetensors, read by ``models.load_hf``);
  orbax  an orbax params directory written by ``python -m effopd_jax.convert hf-to-orbax``
         (``params/`` + ``model_config.json``);
  run    a step directory of the trainer (``WORKDIR/checkpoints/<step>``, holding ``state/``):
         only ``state.trainable_params`` is read (orbax partial restore; for full fine-tuning
         that is the whole student) and the model config the trainer wrote into ``meta``.
         A LoRA run's step directory (``meta.parameterization.name == "lora"``) holds only the
         adapters: they are merged into the first checkpoint of the series, which must then be
         the base the run started from (HF or orbax), W_t = W_0 + (alpha / r)·A·B. So the
         analysed update ΔW_t is exactly the adapters' product, of rank <= r (a bfloat16 frozen
         base in the run does not change it: both W_t and W_0 use the base given here).
Which parameters are the attention/MLP matrices comes from the model's layout
(``effopd_jax.models.layout``), built from the first checkpoint that carries a config.
The base W_0 comes first and the final W_T last. Ordering: when every directory name ends in a
number (``step_20``, ``DAPO-step-7``, ``checkpoints/12``) they are sorted by it; when all but the
first given do, the first given is the base (step 0) and the rest are sorted; otherwise (or with
``--keep-order``) the given order is kept with steps 0..T. The order used is printed. Parameters are
analysed in the unscanned layout (a scanned tree is split into ``layers_{i}``).

For every checkpoint t >= 1 and every matrix of the layout (for Qwen: q, k, v, o, gate, up, down
of every layer; for a mixture of experts also the router and every expert's gate, up, down), from ΔW_t = W_t − W_0 (metrics of ``effopd_jax.monitor``, HF orientation ``[out, in]``,
U spans the output space):
  update_norm ‖ΔW‖_F, w0_norm ‖W_0‖_F, rel_update ‖ΔW‖_F/‖W_0‖_F,
  alloc (the module's share of its layer's Σ‖ΔW‖_F²),
  energy Σ_{j<=k} σ_j²/‖ΔW‖_F², erank (exact, full spectrum; ``--topk-only``: erank_topk of the
  randomized top-k spectrum),
  overlap_final_left/right ‖U_{t,k}ᵀ U_{T,k}‖_F²/k with the final update's top-k bases (U, V),
  overlap_prev_left/right the same with the previous checkpoint's update (empty for t = 1).

Outputs in ``--out``:
  metrics.csv       one row per (checkpoint, layer, module) with the columns above; for a mixture
                    of experts one row per (checkpoint, layer, module, expert), with an `expert`
                    column (empty for the dense matrices); the plots average a layer's experts
                    (their allocation shares add up);
  summary.csv       one row per (checkpoint, module type): means over layers, the module type's
                    share of the whole model's squared update (alloc_model), and a row
                    module="all" with model-wide rel_update and mean overlaps;
  spectrum.csv      the final update's singular values per (layer, module): index j (1-based),
                    sigma, sigma/sigma_1, cumulative energy fraction;
  relative_update_heatmap.png   rel_update of the final checkpoint, layers × modules;
  overlap_with_final.png        mean (over layers) overlap with the final subspace vs step;
  spectrum_decay.png            σ_j/σ_1 and cumulative energy of the final update per module;
  module_allocation.png         per-layer shares of the squared update norm (final checkpoint);
  rank_<K>_alpha_<A>/           with ``--rank-k-export``: HF checkpoint of the norm-preserving
                                reconstruction W' = W_0 + α(‖ΔW‖/‖ΔW_K‖)ΔW_K of the final
                                checkpoint (non-matrix params from the base, as the authors do).

Marginal utility (Python API only): ``marginal_utility(params_0, params_t, evaluate)`` resets one
module group's ΔW to W_0 at a time and scores each model with a user-given ``evaluate(params) ->
float`` (e.g. accuracy on a validation set); see its docstring.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax import checkpoint as checkpoint_lib
from effopd_jax import models, monitor
from effopd_jax.models import ModelConfig, ModelLayout

# Config fields that do not fix the parameter tree (checkpoints may differ in them).
NON_ARCHITECTURE_FIELDS = (
    "param_dtype", "dtype", "scan_layers", "remat", "attention_impl", "max_position_embeddings", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta", "rms_norm_eps",
    # Mixture of experts: how the experts run and the router losses' weights.
    "moe_impl", "router_aux_loss_coef", "output_router_logits", "router_z_loss_coef",
)
METRIC_COLUMNS = (
    "update_norm", "w0_norm", "rel_update", "alloc", "energy", "erank",
    "overlap_final_left", "overlap_final_right", "overlap_prev_left", "overlap_prev_right",
)
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def _log(message: str) -> None:
    print(f"[analyze] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Loading


def checkpoint_format(path: str | os.PathLike) -> str:
    """'hf', 'orbax' or 'run' for a checkpoint directory; ValueError naming the path otherwise."""
    from effopd_jax import convert

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if convert.is_orbax_params_dir(path):
        return "orbax"
    if os.path.isdir(os.path.join(path, "state")):
        return "run"
    raise ValueError(
        f"checkpoint {path!r} is neither a Hugging Face directory (config.json + safetensors), an"
        " orbax params directory (params/ + model_config.json) nor a trainer step directory (state/)"
    )


def unscanned(params: Mapping[str, Any]) -> dict[str, Any]:
    """The unscanned layout of a params tree whose ``layers`` subtree stacks one layer per
    slice (``layers_{i}``), for checkpoints without a config; with a config,
    ``models.relayout_params`` handles every family (e.g. Qwen3.5's period-grouped scan)."""
    if "layers" not in params:
        return dict(params)
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    out = {key: value for key, value in params.items() if key != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def _restore_run_checkpoint(path: str) -> tuple[ModelConfig | None, Any, dict]:
    """(model config from meta or None, ``state.trainable_params``, the meta's parameterization
    (``{"name": "full"}`` when the meta has none)) of a trainer step directory, without reading
    the optimizer state."""
    import json

    import orbax.checkpoint as ocp

    state_dir = os.path.join(os.path.abspath(path), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(state_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or "trainable_params" not in tree:
        raise ValueError(f"checkpoint {path!r}: state/ has no 'trainable_params' entry")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"trainable_params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["trainable_params"])}
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            ),
        )
    config = None
    parameterization = {"name": "full"}
    meta_file = os.path.join(os.path.abspath(path), "meta", "metadata")
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
        fields = meta.get(checkpoint_lib.META_MODEL_CONFIG)
        if fields is not None:
            config = models.family_for(str(fields.get("model_type"))).config_from_dict(fields)
        parameterization = meta.get(checkpoint_lib.META_PARAMETERIZATION) or parameterization
    return config, restored["trainable_params"], parameterization


def merge_lora_adapters(config: ModelConfig | None, base_params: Any, adapters: Any, scale: float) -> Any:
    """The unscanned params ``W + scale·A·B`` of a LoRA run's adapters on its base.

    Args:
      config: the run's model config (``scan_layers`` as trained: the adapters' layout), or None
        for a run without one (then scanned adapters stack one layer per slice).
      base_params: the base's unscanned params.
      adapters: the step directory's trainable params (``{..., "q_proj": {"lora_a", "lora_b"}}``).
      scale: alpha / rank.
    """
    from effopd_jax import lora as lora_lib

    if config is None or not config.scan_layers:
        return lora_lib.merge_adapters(base_params, unscanned(adapters), scale)
    # Merged in the adapters' scanned layout, then unscanned through the layout's tensor names,
    # so any family's grouping of layers (e.g. Qwen3.5's by layer_types period) works.
    flat = dataclasses.replace(config, scan_layers=False)
    merged = lora_lib.merge_adapters(models.relayout_params(base_params, flat, config), adapters, scale)
    return models.relayout_params(merged, config, flat)


def load_checkpoint(path: str | os.PathLike, base_params: Any = None) -> tuple[ModelConfig | None, Any]:
    """(config or None, float32 params in the unscanned layout) of a checkpoint directory.

    The config is None only for a trainer step directory written without one in its meta. A
    LoRA run's step directory holds adapters only: they are merged into ``base_params`` (the
    unscanned float32 params of the series' base).

    Raises:
      ValueError: a LoRA step directory without ``base_params``, or a parameterization this
        analysis does not know.
    """
    from effopd_jax import convert

    fmt = checkpoint_format(path)
    if fmt == "hf":
        config, params = models.load_hf(path, param_dtype=jnp.float32, scan_layers=False)
        return config, params
    parameterization = {"name": "full"}
    if fmt == "orbax":
        config, params = convert.load_orbax(path)
    else:
        config, params, parameterization = _restore_run_checkpoint(os.fspath(path))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    if config is not None:
        config = dataclasses.replace(config, param_dtype=jnp.float32)
    flat = None if config is None else dataclasses.replace(config, scan_layers=False)
    name = parameterization.get("name")
    if name == "lora":
        if base_params is None:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} holds LoRA adapters only (rank {parameterization.get('rank')}); "
                "put the base model the run started from (its HF or orbax directory) first, the adapters are "
                "merged into it")
        scale = float(parameterization["alpha"]) / float(parameterization["rank"])
        params = merge_lora_adapters(config, base_params, params, scale)
    elif name != "full":
        raise ValueError(f"checkpoint {os.fspath(path)!r}: its meta names the parameterization {name!r}, which "
                         "the analysis cannot turn into model params (it knows 'full' and 'lora')")
    elif config is not None and config.scan_layers:  # through the layout's tensor names: any family's grouping
        params = models.relayout_params(params, config, flat)
    else:
        params = unscanned(params)
    return flat, params


def check_same_architecture(configs: Sequence[ModelConfig | None], names: Sequence[str]) -> None:
    """ValueError naming the first checkpoint whose architecture differs from the first one's.

    Checkpoints without a config are skipped here; their parameter shapes are compared by
    ``check_same_shapes``.
    """
    known = [(c.to_dict(), n) for c, n in zip(configs, names) if c is not None]
    for fields, name in known[1:]:
        diffs = [
            f"{field}: {known[0][0].get(field)!r} vs {fields.get(field)!r}"
            for field in sorted(set(known[0][0]) | set(fields))
            if field not in NON_ARCHITECTURE_FIELDS and known[0][0].get(field) != fields.get(field)
        ]
        if diffs:
            raise ValueError(
                f"checkpoints {known[0][1]!r} and {name!r} have different architectures ({'; '.join(diffs)})"
            )


def check_same_shapes(params_a: Any, params_b: Any, names: tuple[str, str]) -> None:
    """ValueError unless two (unscanned) params trees have the same paths and shapes."""
    monitor.check_same_architecture(params_a, params_b, names)


def order_checkpoints(paths: Sequence[str], keep_order: bool = False) -> tuple[list[str], list[int]]:
    """(paths, steps) in training order; see the module docstring for the rule."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    numbers = [_TRAILING_NUMBER.search(n) for n in names]
    if keep_order or not all(numbers[1:]):
        return list(paths), list(range(len(paths)))
    first = [] if numbers[0] else [0]
    rest = [i for i in range(len(paths)) if i not in first]
    steps = {i: int(numbers[i].group(1)) for i in rest}
    if len(set(steps.values())) != len(steps):
        raise ValueError(f"checkpoint names carry duplicate step numbers: {names}; use --keep-order")
    if first and min(steps.values()) <= 0:
        raise ValueError(f"the base {names[0]!r} has no step number but another checkpoint is step 0: {names}")
    order = first + sorted(rest, key=steps.get)
    return [paths[i] for i in order], [steps.get(i, 0) for i in order]


def check_k(kernels: Mapping[str, jax.Array], k: int, what: str = "--k") -> None:
    """ValueError naming the module when k exceeds a matrix's rank bound min(out, in)."""
    for name, stacked in kernels.items():
        fan_in, fan_out = stacked.shape[1:]
        if not 1 <= k <= min(fan_in, fan_out):
            raise ValueError(
                f"{what}={k} is larger than the rank bound min(out, in) = {min(fan_in, fan_out)} of"
                f" {name} ([out, in] = [{fan_out}, {fan_in}]); choose 1 <= k <= {min(fan_in, fan_out)}"
            )


# ----------------------------------------------------------------------------------------------
# Metrics over the series


@dataclasses.dataclass
class AnalysisResult:
    """What ``analyze`` computed (also written to CSV).

    Attributes:
      names, steps: checkpoint directory names and steps (index 0 = base).
      rows: metrics.csv rows, dicts with checkpoint, step, layer, module + METRIC_COLUMNS.
      summary: summary.csv rows.
      final_spectra: {module: [n, r]} singular values of the final update (row j = layer
        ``module_layers[module][j]``).
      k: top-k.
      num_layers: L.
      module_layers: {module: the layers holding it}, in the layout's module order.
      export_dir: the rank-k HF checkpoint directory, or None.
    """

    names: list[str]
    steps: list[int]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    final_spectra: dict[str, np.ndarray]
    k: int
    num_layers: int
    module_layers: dict[str, tuple[int, ...]]
    export_dir: str | None = None


@functools.partial(jax.jit, static_argnames=("config",))
def _update_metrics(w_t, w_0, key, ref_u, ref_v, *, config):
    return monitor.update_metrics(w_t, w_0, key, config=config, ref_u=ref_u, ref_v=ref_v)


def _module_stats(kernels_t, kernels_0, key, config, ref=None) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for index, name in enumerate(kernels_0):
        ref_u, ref_v = (None, None) if ref is None else (ref[name]["u"], ref[name]["v"])
        stats = _update_metrics(
            kernels_t[name], kernels_0[name], jax.random.fold_in(key, index), ref_u, ref_v, config=config
        )
        out[name] = jax.device_get(stats)
    return out


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-layer ‖aᵀb‖_F²/k for stacked bases [L, m, k]."""
    return np.asarray(monitor.subspace_overlap(jnp.asarray(a), jnp.asarray(b)))


def analyze(
    checkpoints: Sequence[str],
    out_dir: str,
    *,
    k: int = 8,
    rank_k_export: int | None = None,
    alpha: float = 1.0,
    export_dtype: str | None = None,
    svd_method: monitor.SVDMethod = "auto",
    full_spectrum: bool = True,
    keep_order: bool = False,
    seed: int = 0,
    plots: bool = True,
) -> AnalysisResult:
    """Runs the analysis (see the module docstring) and writes CSVs, PNGs and the export.

    Raises:
      ValueError: fewer than 2 checkpoints, an unreadable directory, different architectures,
        k (or rank_k_export) larger than a matrix's rank bound.
    """
    if len(checkpoints) < 2:
        raise ValueError(
            f"--checkpoints needs at least 2 directories (the base W_0 and one trained checkpoint),"
            f" got {len(checkpoints)}"
        )
    for path in checkpoints:
        checkpoint_format(path)  # refuses anything that is not a checkpoint before loading
    paths, steps = order_checkpoints(list(checkpoints), keep_order)
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    _log("order: " + ", ".join(f"{n} (step {s})" for n, s in zip(names, steps)))
    os.makedirs(out_dir, exist_ok=True)
    config_m = monitor.MonitorConfig(k=k, svd_method=svd_method, full_spectrum=full_spectrum)
    key = jax.random.PRNGKey(seed)

    configs: dict[int, ModelConfig | None] = {}

    def load(i: int):
        start = time.perf_counter()
        configs[i], params = load_checkpoint(paths[i], base_params)
        if i:  # every checkpoint against the base
            check_same_architecture([configs[0], configs[i]], [names[0], names[i]])
            check_same_shapes(base_params, params, (names[0], names[i]))
        _log(f"loaded {i + 1}/{len(paths)} {names[i]} ({checkpoint_format(paths[i])}) in {time.perf_counter() - start:.1f} s")
        return configs[i], params

    base_params = None
    _, base_params = load(0)
    _, final_params = load(len(paths) - 1)
    model_config = next((c for c in (configs[0], configs[len(paths) - 1]) if c is not None), None)
    if model_config is None:
        # Only trainer step directories written without a model config in their meta.
        for i in range(1, len(paths) - 1):
            model_config = load_checkpoint(paths[i], base_params)[0]
            if model_config is not None:
                break
    if model_config is None:
        raise ValueError(
            "no checkpoint of the series carries a model config (needed for the parameter layout);"
            " put the base HF checkpoint first"
        )
    layout = models.layout(model_config)
    base = monitor.module_kernels(base_params, layout)
    module_layers = {name: layout.module_layers(name) for name in layout.matrix_modules}
    module_rows = {name: layout.module_rows(name) for name in layout.matrix_modules}
    has_experts = any(layout.module_experts(name) for name in layout.matrix_modules)
    check_k(base, k)
    if rank_k_export is not None:
        check_k(base, rank_k_export, "--rank-k-export")
    final = monitor.module_kernels(final_params, layout)

    start = time.perf_counter()
    final_stats = _module_stats(final, base, key, config_m)
    _log(f"final update: top-{k} bases in {time.perf_counter() - start:.1f} s")
    ref = {name: {"u": final_stats[name]["u"], "v": final_stats[name]["v"]} for name in module_layers}

    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    prev = None
    erank_key = "erank" if full_spectrum else "erank_topk"
    for i in range(1, len(paths)):
        start = time.perf_counter()
        kernels = final if i == len(paths) - 1 else monitor.module_kernels(load(i)[1], layout)
        stats = _module_stats(kernels, base, key, config_m, ref)
        shares = {n: np.asarray(v) for n, v in monitor.allocation(
            {n: s["update_norm"] for n, s in stats.items()}, module_layers).items()}
        for name in module_layers:
            s = stats[name]
            if prev is not None:
                s["overlap_prev_left"] = _overlap(s["u"], prev[name]["u"])
                s["overlap_prev_right"] = _overlap(s["v"], prev[name]["v"])
            for row_index, (layer, expert) in enumerate(module_rows[name]):
                row = {"checkpoint": names[i], "step": steps[i], "layer": layer, "module": name}
                if has_experts:
                    row["expert"] = "" if expert is None else expert
                value = lambda key: s[key][row_index]  # noqa: E731
                row.update(
                    update_norm=value("update_norm"), w0_norm=value("w0_norm"),
                    rel_update=value("rel_update"), alloc=shares[name][row_index],
                    energy=value("energy"), erank=value(erank_key),
                    overlap_final_left=value("overlap_left"), overlap_final_right=value("overlap_right"),
                    overlap_prev_left=value("overlap_prev_left") if prev is not None else "",
                    overlap_prev_right=value("overlap_prev_right") if prev is not None else "",
                )
                rows.append(row)
        summary.extend(_summarize(names[i], steps[i], stats, shares, prev is not None, erank_key,
                                  module_layers))
        prev = {name: {"u": stats[name]["u"], "v": stats[name]["v"]} for name in module_layers}
        _log(f"metrics {i}/{len(paths) - 1} {names[i]} in {time.perf_counter() - start:.1f} s")

    final_spectra = {name: np.asarray(final_stats[name]["spectrum"]) for name in module_layers}
    result = AnalysisResult(names, steps, rows, summary, final_spectra, k,
                            model_config.num_hidden_layers, module_layers)
    _write_csv(os.path.join(out_dir, "metrics.csv"), rows)
    _write_csv(os.path.join(out_dir, "summary.csv"), summary)
    _write_spectrum_csv(os.path.join(out_dir, "spectrum.csv"), final_spectra, module_rows, has_experts)
    _log(f"wrote metrics.csv ({len(rows)} rows), summary.csv, spectrum.csv to {out_dir}")
    if plots:
        for path in write_plots(result, out_dir):
            _log(f"wrote {path}")
    if rank_k_export is not None:
        result.export_dir = export_rank_k(
            model_config, base_params, final_params, rank_k_export, alpha,
            os.path.join(out_dir, f"rank_{rank_k_export}_alpha_{alpha:g}"), export_dtype, svd_method, seed,
            carry_from=paths[0] if checkpoint_format(paths[0]) == "hf" else None,
        )
    return result


def _summarize(name, step, stats, shares, has_prev, erank_key, module_layers) -> list[dict[str, Any]]:
    total_update2 = sum(float(np.sum(np.square(s["update_norm"]))) for s in stats.values())
    total_w02 = sum(float(np.sum(np.square(s["w0_norm"]))) for s in stats.values())
    out = []
    for module, s in stats.items():
        row = {
            "checkpoint": name, "step": step, "module": module,
            "update_norm": float(np.sqrt(np.sum(np.square(s["update_norm"])))),
            "rel_update": float(np.sqrt(np.sum(np.square(s["update_norm"])) / np.sum(np.square(s["w0_norm"])))),
            "alloc_model": float(np.sum(np.square(s["update_norm"])) / total_update2) if total_update2 > 0 else 0.0,
            # The module's share of a layer (its experts' shares added), averaged over layers.
            "alloc_layer_mean": float(np.sum(shares[module]) / len(set(module_layers[module]))),
            "energy": float(np.mean(s["energy"])), "erank": float(np.mean(s[erank_key])),
            "overlap_final_left": float(np.mean(s["overlap_left"])),
            "overlap_final_right": float(np.mean(s["overlap_right"])),
            "overlap_prev_left": float(np.mean(s["overlap_prev_left"])) if has_prev else "",
            "overlap_prev_right": float(np.mean(s["overlap_prev_right"])) if has_prev else "",
        }
        out.append(row)
    everything = {
        "checkpoint": name, "step": step, "module": "all", "update_norm": math.sqrt(total_update2),
        "rel_update": math.sqrt(total_update2 / total_w02) if total_w02 > 0 else 0.0,
        "alloc_model": 1.0, "alloc_layer_mean": "",
    }
    for column in ("energy", "erank", "overlap_final_left", "overlap_final_right", "overlap_prev_left", "overlap_prev_right"):
        values = [r[column] for r in out]
        everything[column] = float(np.mean(values)) if values[0] != "" else ""
    out.append(everything)
    return out


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (float(v) if isinstance(v, (np.floating, np.ndarray)) else v) for k, v in row.items()})


def _write_spectrum_csv(path: str, spectra: Mapping[str, np.ndarray],
                        module_rows: Mapping[str, tuple[tuple[int, int | None], ...]],
                        has_experts: bool = False) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "module"] + (["expert"] if has_experts else [])
                        + ["j", "sigma", "sigma_over_sigma1", "cumulative_energy"])
        for name, stacked in spectra.items():
            for (layer, expert), s in zip(module_rows[name], stacked):
                s = np.asarray(s, np.float64)
                energy = np.cumsum(s**2) / max(np.sum(s**2), np.finfo(np.float64).tiny)
                top = s[0] if s[0] > 0 else 1.0
                where = [layer, name] + (["" if expert is None else expert] if has_experts else [])
                for j, (value, cum) in enumerate(zip(s, energy), start=1):
                    writer.writerow(where + [j, float(value), float(value / top), float(cum)])


# ----------------------------------------------------------------------------------------------
# Plots


def write_plots(result: AnalysisResult, out_dir: str) -> list[str]:
    """Writes the four PNGs (see the module docstring); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    final_name = result.names[-1]
    final_label = f"{final_name} (step {result.steps[-1]})"
    final_rows = [r for r in result.rows if r["checkpoint"] == final_name]
    modules = list(result.module_layers)
    labels = [monitor.short_module_name(m) for m in modules]
    L = result.num_layers

    def grid(column, missing=0.0):
        """[layer, module] values; an expert module's rows are averaged over its experts, except
        its allocation shares, which add up. `missing`: cells of layers that do not hold the
        module (hybrid models, e.g. Qwen3.5's attention modules live in every 4th layer only)."""
        values = np.zeros((L, len(modules)))
        counts = np.zeros((L, len(modules)))
        for r in final_rows:
            values[r["layer"], modules.index(r["module"])] += float(r[column])
            counts[r["layer"], modules.index(r["module"])] += 1
        values = values if column == "alloc" else values / np.maximum(counts, 1)
        return np.where(counts > 0, values, missing)

    # 1. Relative update heatmap.
    rel = grid("rel_update", missing=np.nan)  # blank, not 0, where a layer has no such module
    fig, ax = plt.subplots(figsize=(1.2 * len(modules) + 2, 0.35 * L + 2))
    image = ax.imshow(rel, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(modules)), labels)
    ax.set_yticks(range(L))
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"relative update ‖ΔW‖_F / ‖W_0‖_F at {final_label}")
    fig.colorbar(image, ax=ax, label="‖ΔW‖_F / ‖W_0‖_F")
    if L * len(modules) <= 200:
        for (layer, col), value in np.ndenumerate(rel):
            if np.isfinite(value):
                ax.text(col, layer, f"{value:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if value < np.nanmax(rel) * 0.6 else "black")
    paths.append(_save(fig, out_dir, "relative_update_heatmap.png"))

    # 2. Overlap with the final subspace over training.
    summary = [r for r in result.summary]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, side in zip(axes, ("left", "right")):
        for module in modules + ["all"]:
            points = [(r["step"], r[f"overlap_final_{side}"]) for r in summary if r["module"] == module]
            xs, ys = zip(*points)
            style = dict(color="black", linewidth=2.5) if module == "all" else dict(linewidth=1.2)
            ax.plot(xs, ys, marker="o", markersize=3, label="mean" if module == "all" else monitor.short_module_name(module), **style)
        space = "U, output space" if side == "left" else "V, input space"
        ax.set_title(f"top-{result.k} overlap with the final update ({space})")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("‖U_tᵀ U_T‖_F² / k (mean over layers)")
    axes[1].legend(fontsize=8, loc="lower right")
    paths.append(_save(fig, out_dir, "overlap_with_final.png"))

    # 3. Spectrum decay of the final update.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for module in modules:
        s = np.asarray(result.final_spectra[module], np.float64)  # [L, r]
        normalized = s / np.maximum(s[:, :1], np.finfo(np.float64).tiny)
        energy = np.cumsum(s**2, axis=1) / np.maximum(np.sum(s**2, axis=1, keepdims=True), np.finfo(np.float64).tiny)
        j = np.arange(1, s.shape[1] + 1)
        axes[0].semilogy(j, np.mean(normalized, axis=0), label=monitor.short_module_name(module))
        axes[1].plot(j, np.mean(energy, axis=0), label=monitor.short_module_name(module))
    axes[0].set_title(f"σ_j/σ_1 of ΔW at {final_label} (mean over layers)")
    axes[0].set_xlabel("j")
    axes[1].axvline(result.k, color="gray", linestyle="--", label=f"k = {result.k}")
    axes[1].set_title("cumulative energy Σ_{i≤j} σ_i² / ‖ΔW‖_F²")
    axes[1].set_xlabel("j")
    axes[1].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, "spectrum_decay.png"))

    # 4. Module allocation per layer.
    alloc = grid("alloc")
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * L + 3), 4.5))
    bottom = np.zeros(L)
    for col, module in enumerate(modules):
        ax.bar(range(L), alloc[:, col], bottom=bottom, label=monitor.short_module_name(module))
        bottom += alloc[:, col]
    ax.set_xticks(range(L))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the layer's Σ‖ΔW‖_F²")
    ax.set_title(f"module allocation at {final_label}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    paths.append(_save(fig, out_dir, "module_allocation.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Rank-k export and marginal utility


def export_rank_k(
    config: ModelConfig,
    params_0: Any,
    params_t: Any,
    k: int,
    alpha: float,
    path: str,
    dtype: str | None = None,
    svd_method: monitor.SVDMethod = "auto",
    seed: int = 0,
    carry_from: str | None = None,
) -> str:
    """Writes the norm-preserving rank-k reconstruction of ``params_t`` (docs/foresight.md) as a
    HF checkpoint at ``path``.

    The layout's matrices become W_0 + α(‖ΔW‖_F/‖ΔW_k‖_F)ΔW_k; every other parameter is the
    base's (the authors' ``upd_rank.py``). ``config`` describes the params' layout
    (``scan_layers``); ``dtype``: storage dtype (default float32); ``carry_from``: the base HF
    checkpoint, whose tensors the model does not use (e.g. a vision tower) are copied unchanged.
    """
    start = time.perf_counter()
    layout = models.layout(config)
    check_k(monitor.module_kernels(params_0, layout), k, "--rank-k-export")
    new_params = monitor.rank_k_reconstruct_params(
        params_0, params_t, k, jax.random.PRNGKey(seed), layout=layout, alpha=alpha, method=svd_method
    )
    models.save_hf(config, new_params, path, dtype=None if dtype is None else jnp.dtype(dtype),
                   carry_from=carry_from)
    _log(f"wrote rank-{k} (alpha {alpha:g}) reconstruction to {path} in {time.perf_counter() - start:.1f} s")
    return path


def reset_modules(
    params_0: Mapping[str, Any],
    params_t: Mapping[str, Any],
    modules: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    layout: ModelLayout,
) -> dict[str, Any]:
    """``params_t`` with the given modules' matrices (in the given layers, default all) reset to W_0.

    Everything else (other modules, embeddings, norms, biases) stays at ``params_t``.
    """
    unknown = [m for m in modules if m not in layout.matrix_modules]
    if unknown:
        raise ValueError(f"unknown modules {unknown}; expected names from {layout.matrix_modules}")
    base = monitor.module_kernels(params_0, layout, tuple(modules))
    final = monitor.module_kernels(params_t, layout, tuple(modules))
    num_layers = 1 + max(max(layout.module_layers(m)) for m in layout.matrix_modules)
    selected = set(range(num_layers) if layers is None else layers)
    for layer in selected:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} out of range [0, {num_layers})")
    new = {}
    for m in modules:
        mask = np.asarray([layer in selected for layer in layout.module_layers(m)])
        new[m] = jnp.where(jnp.asarray(mask)[:, None, None], base[m], final[m]).astype(final[m].dtype)
    return monitor.replace_module_kernels(params_t, layout, new)


def marginal_utility(
    params_0: Mapping[str, Any],
    params_t: Mapping[str, Any],
    evaluate: Callable[[Any], float],
    groups: Mapping[str, Sequence[str]] | None = None,
    per_layer: bool = False,
    *,
    layout: ModelLayout,
) -> dict[str, float]:
    """Marginal utility of each module group's update: the score lost when its ΔW is reset.

    For every group g (default ``monitor.module_groups(layout)``: "attention", "mlp" and each
    matrix module alone by its short name, e.g. q, k, v, o, gate, up, down), the model
    ``reset_modules(params_0, params_t, groups[g])`` (the group's matrices back at W_0 in every
    layer, everything else at W_t) is scored with ``evaluate`` and
        utility[g] = evaluate(params_t) − evaluate(reset_g).
    With ``per_layer`` each layer ℓ (all its matrices) is a group too, ``layer_{ℓ}``.

    Args:
      params_0, params_t: base and trained params (same architecture and layout).
      evaluate: ``params -> float``, higher is better (e.g. validation accuracy). It receives a
        params tree in ``params_t``'s layout; it is called 2 + len(groups) (+ L) times.
      groups: {name: module names}.
      per_layer: also reset one layer at a time.
      layout: the params' layout (``effopd_jax.models.layout(config)``).

    Returns:
      {"score/full", "score/base", "score/reset_<g>", "utility/<g>"} as floats.
    """
    monitor.check_same_architecture(params_0, params_t, ("params_0", "params_t"))
    groups = monitor.module_groups(layout) if groups is None else groups
    resets: list[tuple[str, tuple[str, ...], list[int] | None]] = [
        (name, tuple(modules), None) for name, modules in groups.items()
    ]
    if per_layer:
        num_layers = 1 + max(max(layout.module_layers(m)) for m in layout.matrix_modules)
        resets += [(f"layer_{layer}", layout.matrix_modules, [layer]) for layer in range(num_layers)]
    full = float(evaluate(params_t))
    out = {"score/full": full, "score/base": float(evaluate(params_0))}
    for name, modules, layers in resets:
        score = float(evaluate(reset_modules(params_0, params_t, modules, layers, layout=layout)))
        out[f"score/reset_{name}"] = score
        out[f"utility/{name}"] = full - score
        _log(f"marginal utility {name}: score {score:.4f}, utility {full - score:+.4f}")
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m effopd_jax.analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoints", nargs="+", required=True, help="base first; HF or orbax dirs")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--k", type=int, default=8, help="top-k for energy and overlaps (default 8)")
    parser.add_argument("--rank-k-export", type=int, default=None, metavar="K",
                        help="write the rank-K reconstruction of the last checkpoint as a HF checkpoint")
    parser.add_argument("--alpha", type=float, default=1.0, help="α of the rank-K reconstruction")
    parser.add_argument("--export-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--svd-method", default="auto", choices=["auto", "randomized", "exact"])
    parser.add_argument("--topk-only", action="store_true",
                        help="randomized top-k SVD only (fast; erank_topk instead of the exact erank)")
    parser.add_argument("--keep-order", action="store_true", help="do not sort by the step number in the names")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    analyze(
        args.checkpoints, args.out, k=args.k, rank_k_export=args.rank_k_export, alpha=args.alpha,
        export_dtype=args.export_dtype, svd_method=args.svd_method, full_spectrum=not args.topk_only,
        keep_order=args.keep_order, seed=args.seed, plots=not args.no_plots,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
