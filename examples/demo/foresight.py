"""The paper's "foresight" findings, measured on the demo's OPD run (docs/foresight_findings.md).

    python -m examples.demo.foresight [--seed 0] [--run_seeds 0] [--out runs/demo/foresight_study]
                                      [--docs docs] [--fast]

The EffOPD abstract explains OPD's efficiency by foresight: the update's dominant subspace is
there early, and the update goes to the modules that matter. Four measurements on the demo's
teacher/student pair (asset ``--seed``), with the library's monitor and analyze tools:

(a) **Early overlap.** ``effopd_jax.analyze`` over the OPD run's checkpoints: the overlap
    ‖U_tᵀU_T‖²_F / k of the top-k (k = 4) singular subspace of ΔW_t = W_t − W_0 with that of the
    final update, per module type (mean over layers and over the left/right subspaces), against
    the fraction of training; the random-subspace baseline k/m for comparison.
(b) **The early update, scaled.** The checkpoint nearest 10% of training, its update scaled by s
    (W_0 + s·ΔW_t on every parameter) and its norm-preserving rank-k reconstruction
    (``monitor.rank_k_reconstruct_params``, α = s, k = 1 and 4, other parameters from W_0 as the
    authors do), each scored by greedy test accuracy; "gain recovered" = (acc − acc_0) /
    (acc_T − acc_0), the paper's claim being ≈ 80% at 10% of training.
(c) **Module allocation.** Each module type's share of the final update's squared norm
    (``alloc_model``) next to its share of the parameters, and its marginal utility
    (``analyze.marginal_utility``: the accuracy lost when that module's ΔW is reset to W_0) as a
    share of the final gain.
(d) **The referee's intervention.** The same OPD and OPD + EffOPD runs with the first N updates
    (10% of training) perturbed: in every attention/MLP matrix, the update's top-k (k = 4)
    singular subspace is replaced by a random one with the same singular values, and the matrix
    update rescaled to its original Frobenius norm. Adam's moments see the true gradients; only
    the trajectory changes. Measured: OPD's accuracy curve and steps to the unperturbed run's
    target, the early overlap with the final subspace, and EffOPD's accepted multipliers.

Figures go to ``--docs`` (``foresight_overlap.png``, ``foresight_early_update.png``,
``foresight_allocation.png``, ``foresight_intervention.png``); every number to
``OUT/foresight_results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax import analyze, data, models, monitor
from examples.demo import sft
from examples.demo.configs import demo_config
from examples.demo.prepare import enable_compilation_cache, prepare_assets
from examples.demo.run import accuracy_curve, effopd_searches, first_reaching
from examples.demo.settings import DEFAULT_OUT, Assets, DemoSettings, fast_settings

PyTree = Any
TOP_K = 4
EARLY_FRACTION = 0.1
SCALES = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0)
MODULE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


# ---------------------------------------------------------------------------------------------
# The intervention: the first N updates' top-k subspace replaced by a random one
# ---------------------------------------------------------------------------------------------


def replace_top_subspace(delta: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``delta`` [m, n] with its top-k singular subspace replaced by a random one (same singular
    values, random orthonormal left and right bases), rescaled to ``delta``'s Frobenius norm."""
    delta = np.asarray(delta, np.float64)
    norm = np.linalg.norm(delta)
    if norm == 0:
        return delta
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    k = min(k, len(s))
    top = (u[:, :k] * s[:k]) @ vt[:k]
    random_u = np.linalg.qr(rng.standard_normal((delta.shape[0], k)))[0]
    random_v = np.linalg.qr(rng.standard_normal((delta.shape[1], k)))[0]
    new = delta - top + (random_u * s[:k]) @ random_v.T
    return new * (norm / np.linalg.norm(new))


def perturb_update(before: PyTree, after: PyTree, layout, k: int, rng: np.random.Generator) -> dict:
    """``after`` with every attention/MLP matrix's update (after − before) top-k-replaced."""
    old = monitor.module_kernels(before, layout)
    new = monitor.module_kernels(after, layout)
    kernels = {}
    for module in layout.matrix_modules:
        w0, w1 = np.asarray(old[module], np.float64), np.asarray(new[module], np.float64)
        stacked = [w0[i] + replace_top_subspace(w1[i] - w0[i], k, rng) for i in range(w0.shape[0])]
        kernels[module] = jnp.asarray(np.stack(stacked), new[module].dtype)
    return monitor.replace_module_kernels(after, layout, kernels)


def train_arm(config, workdir: str, *, perturb_steps: int, seed: int, log: Callable[..., None]) -> list[dict]:
    """One demo run through the trainer; with ``perturb_steps`` its first updates are perturbed
    (by wrapping the trainer's jitted update: the EffOPD search then sees the perturbed point)."""
    from effopd_jax import metrics, train  # noqa: PLC0415

    shutil.rmtree(workdir, ignore_errors=True)
    trainer = train.Trainer(config, workdir, devices=jax.devices()[:1], log=log)
    if perturb_steps:
        layout = models.layout(trainer.student_config)
        original = trainer.update
        rng = np.random.default_rng(seed)

        def perturbed(state, batch, frozen):
            before = jax.device_get(state.trainable_params)  # the update donates its input
            new_state, update_metrics = original(state, batch, frozen)
            if int(jax.device_get(new_state.step)) <= perturb_steps:
                params = perturb_update(before, jax.device_get(new_state.trainable_params), layout, TOP_K, rng)
                params = jax.device_put(params, trainer.state_shardings.trainable_params)
                new_state = new_state._replace(trainable_params=params)
            return new_state, update_metrics

        trainer.update = perturbed
    try:
        trainer.run()
    finally:
        trainer.close()
    return metrics.read_metrics(workdir)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


class Scorer:
    """Greedy test accuracy of a params tree (the demo's evaluation, on the test split)."""

    def __init__(self, assets: Assets):
        self.config, _ = models.load_hf(assets.student_dir, param_dtype=jnp.float32, scan_layers=False)
        self.tokenizer = data.load_tokenizer(assets.tokenizer_dir)
        self.rows = sft.read_rows(os.path.join(assets.task_dir, "test.jsonl"))
        self.max_new_tokens = assets.max_new_tokens
        self.calls = 0

    def __call__(self, params: PyTree) -> float:
        self.calls += 1
        return sft.greedy_accuracy(self.config, params, self.tokenizer, self.rows,
                                   max_new_tokens=self.max_new_tokens)


def checkpoint_dirs(workdir: str) -> list[str]:
    root = os.path.join(workdir, "checkpoints")
    return [os.path.join(root, d) for d in sorted((d for d in os.listdir(root) if d.isdigit()), key=int)]


def overlap_curves(base_dir: str, workdir: str, out_dir: str, total_steps: int) -> dict:
    """(a): per module type, the mean top-k overlap with the final update against the fraction of
    training, and the random baseline k/m."""
    result = analyze.analyze([base_dir, *checkpoint_dirs(workdir)], out_dir, k=TOP_K, plots=False)
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in result.summary:
        name = "all" if row["module"] == "all" else monitor.short_module_name(row["module"])
        overlap = 0.5 * (row["overlap_final_left"] + row["overlap_final_right"])
        curves.setdefault(name, []).append((row["step"] / total_steps, overlap))
    config, params = analyze.load_checkpoint(base_dir)
    kernels = monitor.module_kernels(params, models.layout(config))
    baseline = {monitor.short_module_name(m): 0.5 * (TOP_K / w.shape[1] + TOP_K / w.shape[2])
                for m, w in kernels.items()}
    return {"curves": curves, "baseline": baseline, "summary": result.summary}


def scaled_update(params_0: PyTree, params_t: PyTree, scale: float) -> PyTree:
    return jax.tree.map(lambda a, b: a + scale * (b - a), params_0, params_t)


def early_update_gain(scorer: Scorer, params_0: PyTree, params_t: PyTree, params_final: PyTree, layout,
                      *, acc_0: float, acc_final: float) -> dict:
    """(b): accuracy and gain recovered of the early update scaled by each s, full and rank-k."""
    gain = acc_final - acc_0
    norm = lambda tree: float(np.sqrt(sum(np.sum((np.asarray(b) - np.asarray(a)) ** 2)  # noqa: E731
                                          for a, b in zip(jax.tree.leaves(params_0), jax.tree.leaves(tree)))))
    out = {"norm_ratio": norm(params_final) / max(norm(params_t), 1e-30), "variants": {}}
    key = jax.random.key(0)
    for variant in ("full", "rank1", "rank4"):
        points = []
        for scale in SCALES:
            if variant == "full":
                params = scaled_update(params_0, params_t, scale)
            else:
                params = monitor.rank_k_reconstruct_params(params_0, params_t, int(variant[4:]), key,
                                                           layout=layout, alpha=scale)
            accuracy = scorer(params)
            points.append({"scale": scale, "accuracy": accuracy, "gain_recovered": (accuracy - acc_0) / gain})
        out["variants"][variant] = points
    for k in (1, 4):  # the final update's own rank-k reconstruction, for reference
        accuracy = scorer(monitor.rank_k_reconstruct_params(params_0, params_final, k, key, layout=layout))
        out[f"final_rank{k}"] = {"accuracy": accuracy, "gain_recovered": (accuracy - acc_0) / gain}
    return out


def allocation(summary: Sequence[dict], final_step: int, early_step: int, params_0: PyTree, layout,
               utility: dict, gain: float) -> dict:
    """(c): update share (final and early), parameter share and utility share per module type."""
    kernels = monitor.module_kernels(params_0, layout)
    sizes = {monitor.short_module_name(m): int(np.prod(w.shape)) for m, w in kernels.items()}
    total = sum(sizes.values())
    out = {}
    for row in summary:
        if row["module"] == "all" or row["step"] not in (final_step, early_step):
            continue
        name = monitor.short_module_name(row["module"])
        entry = out.setdefault(name, {"param_share": sizes[name] / total,
                                      "rel_update_final": None, "utility_share": utility[f"utility/{name}"] / gain})
        entry["update_share_final" if row["step"] == final_step else "update_share_early"] = row["alloc_model"]
        if row["step"] == final_step:
            entry["rel_update_final"] = row["rel_update"]
    out["attention_utility_share"] = utility["utility/attention"] / gain
    out["mlp_utility_share"] = utility["utility/mlp"] / gain
    return out


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_overlap(results: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.get_cmap("tab10")
    overlap = results["overlap"]
    for i, name in enumerate(MODULE_ORDER):
        xs, ys = zip(*overlap["curves"][name])
        ax.plot(xs, ys, marker=".", color=colors(i), label=name)
        ax.axhline(overlap["baseline"][name], color=colors(i), linestyle=":", linewidth=0.8)
    if "perturbed_overlap" in results:
        xs, ys = zip(*results["perturbed_overlap"]["curves"]["all"])
        ax.plot(xs, ys, color="black", linestyle="--", label="all, first 10% perturbed (d)")
    xs, ys = zip(*overlap["curves"]["all"])
    ax.plot(xs, ys, color="black", linewidth=2, label="all modules")
    ax.axvline(EARLY_FRACTION, color="grey", linewidth=1)
    ax.set_xlabel("fraction of training (OPD)")
    ax.set_ylabel(f"top-{TOP_K} overlap with the final update")
    ax.set_ylim(0, 1.02)
    ax.set_title("(a) early overlap with the final subspace (dotted: random baseline k/m)")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_early_update(results: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    early = results["early_update"]
    styles = {"full": ("C0", "early ΔW × s (all parameters)"), "rank1": ("C1", "rank-1, α = s"),
              "rank4": ("C2", "rank-4, α = s")}
    for name, (color, label) in styles.items():
        points = early["main"]["variants"][name]
        ax.plot([p["scale"] for p in points], [p["gain_recovered"] for p in points], marker="o", color=color,
                label=f"{label}, step {early['main']['step']}")
        if "other" in early:
            points = early["other"]["variants"][name]
            ax.plot([p["scale"] for p in points], [p["gain_recovered"] for p in points], marker=".", color=color,
                    linestyle=":", label=f"{label}, step {early['other']['step']}")
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=1, label="80% (the paper's claim)")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.axvline(early["main"]["norm_ratio"], color="C0", linestyle=":", linewidth=1,
               label=f"‖ΔW_T‖/‖ΔW_t‖ = {early['main']['norm_ratio']:.1f}")
    ax.set_xlabel("scale s of the early update")
    ax.set_ylabel("share of OPD's final gain recovered")
    ax.set_title("(b) the early checkpoint's update, scaled")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_allocation(results: dict, path: str) -> None:
    plt = _pyplot()
    alloc = results["allocation"]
    names = [m for m in MODULE_ORDER if m in alloc]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = (("param_share", "share of parameters"), ("update_share_early", "share of ‖ΔW‖² (10%)"),
            ("update_share_final", "share of ‖ΔW‖² (final)"), ("utility_share", "marginal utility / final gain"))
    width = 0.2
    for i, (key, label) in enumerate(bars):
        ax.bar(x + (i - 1.5) * width, [alloc[m][key] for m in names], width, label=label)
    ax.set_xticks(x, names)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("share")
    ax.set_title("(c) module allocation of the OPD update")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_intervention(results: dict, path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    arms = results["intervention"]["arms"]
    styles = {"opd": ("C0", "-", "OPD"), "opd_perturbed": ("C0", "--", "OPD, first 10% perturbed"),
              "effopd": ("C1", "-", "OPD + EffOPD"), "effopd_perturbed": ("C1", "--", "OPD + EffOPD, perturbed")}
    for name, (color, linestyle, label) in styles.items():
        curves = arms[name]["curves"]
        steps = [p["step"] for p in curves[0]]
        mean = np.mean([[p["accuracy"] for p in c] for c in curves], axis=0)
        axes[0].plot(steps, mean, color=color, linestyle=linestyle, marker=".", label=label)
    axes[0].axvline(results["intervention"]["perturb_steps"], color="grey", linewidth=1)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("greedy test accuracy (mean over run seeds)")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    for name, offset in (("effopd", -0.15), ("effopd_perturbed", 0.15)):
        for searches in arms[name]["searches"]:
            xs = [np.log2(s["step"]) + offset for s in searches]
            axes[1].scatter(xs, [s["accepted"] for s in searches], color="C1",
                            marker="o" if name == "effopd" else "x", label=styles[name][2])
    handles, labels = axes[1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[1].legend(unique.values(), unique.keys(), fontsize=7)
    axes[1].set_xlabel("log2(search step)")
    axes[1].set_ylabel("accepted multiplier (1 = θ kept)")
    axes[1].grid(alpha=0.3)
    fig.suptitle("(d) perturbing the first 10% of updates' top-4 subspace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def run_study(settings: DemoSettings, run_seeds: Sequence[int], out_dir: str, docs_dir: str,
              *, log: Callable[..., None] = print) -> dict:
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    enable_compilation_cache(os.path.join(DEFAULT_OUT, "cache", "xla"))
    assets = prepare_assets(settings, DEFAULT_OUT, log=log)
    total = settings.opd_steps
    perturb_steps = max(1, round(EARLY_FRACTION * total))
    quiet = lambda *a, **k: None  # noqa: E731

    # (d) first: the runs, including the unperturbed OPD run whose checkpoints (a)-(c) analyse.
    arms: dict[str, dict] = {}
    for run_seed in run_seeds:
        run_settings = dataclasses.replace(settings, run_seed=run_seed)
        for name in ("opd", "opd_perturbed", "effopd", "effopd_perturbed"):
            log(f"== run seed {run_seed}: {name}")
            config = demo_config(effopd=name.startswith("effopd"), settings=run_settings, assets=assets)
            records = train_arm(config, os.path.join(out_dir, f"run{run_seed}", name),
                                perturb_steps=perturb_steps if name.endswith("perturbed") else 0,
                                seed=1000 + run_seed, log=quiet)
            arm = arms.setdefault(name, {"curves": [], "searches": []})
            arm["curves"].append(accuracy_curve(records))
            if name.startswith("effopd"):
                arm["searches"].append(effopd_searches(records))
    for run_index in range(len(run_seeds)):  # OPD efficiency against the unperturbed run's target
        reference = arms["opd"]["curves"][run_index]
        target = reference[0]["accuracy"] + 0.95 * (reference[-1]["accuracy"] - reference[0]["accuracy"])
        for name, arm in arms.items():
            hit = first_reaching(arm["curves"][run_index], target)
            arm.setdefault("steps_to_opd_target", []).append(hit["step"] if hit else None)
            arm.setdefault("final_accuracy", []).append(arm["curves"][run_index][-1]["accuracy"])
    results: dict[str, Any] = {"settings": dataclasses.asdict(settings), "run_seeds": list(run_seeds),
                               "intervention": {"perturb_steps": perturb_steps, "k": TOP_K, "arms": arms}}

    # (a) on the first run seed's OPD run (and its perturbed twin).
    first = os.path.join(out_dir, f"run{run_seeds[0]}")
    log("== (a) overlap with the final subspace")
    overlap = overlap_curves(assets.student_dir, os.path.join(first, "opd"), os.path.join(out_dir, "analyze_opd"),
                             total)
    summary = overlap.pop("summary")
    results["overlap"] = overlap
    perturbed = overlap_curves(assets.student_dir, os.path.join(first, "opd_perturbed"),
                               os.path.join(out_dir, "analyze_opd_perturbed"), total)
    perturbed.pop("summary")
    results["perturbed_overlap"] = perturbed

    # (b) and (c): the early and final checkpoints of that run.
    log("== (b) the early update, scaled; (c) module allocation")
    scorer = Scorer(assets)
    config, params_0 = analyze.load_checkpoint(assets.student_dir)
    layout = models.layout(config)
    dirs = {int(os.path.basename(d)): d for d in checkpoint_dirs(os.path.join(first, "opd"))}
    steps_available = sorted(dirs)
    early_steps = sorted(steps_available, key=lambda s: (abs(s / total - EARLY_FRACTION), s))[:2]
    params_final = analyze.load_checkpoint(dirs[total])[1]
    acc_0, acc_final = scorer(params_0), scorer(params_final)
    results["accuracy_initial"], results["accuracy_final"] = acc_0, acc_final
    results["early_update"] = {}
    for label, step in zip(("main", "other"), sorted(early_steps, key=lambda s: abs(s / total - EARLY_FRACTION))):
        params_t = analyze.load_checkpoint(dirs[step])[1]
        entry = early_update_gain(scorer, params_0, params_t, params_final, layout, acc_0=acc_0, acc_final=acc_final)
        entry["step"], entry["fraction"] = step, step / total
        entry["accuracy_unscaled"] = scorer(params_t)
        results["early_update"][label] = entry
    utility = analyze.marginal_utility(params_0, params_final, scorer, layout=layout)
    results["utility"] = utility
    results["allocation"] = allocation(summary, total, results["early_update"]["main"]["step"], params_0, layout,
                                       utility, acc_final - acc_0)

    os.makedirs(docs_dir, exist_ok=True)
    plot_overlap(results, os.path.join(docs_dir, "foresight_overlap.png"))
    plot_early_update(results, os.path.join(docs_dir, "foresight_early_update.png"))
    plot_allocation(results, os.path.join(docs_dir, "foresight_allocation.png"))
    plot_intervention(results, os.path.join(docs_dir, "foresight_intervention.png"))
    results["seconds"] = time.perf_counter() - t_start
    with open(os.path.join(out_dir, "foresight_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="asset seed (task, teacher, student)")
    parser.add_argument("--run_seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=os.path.join(DEFAULT_OUT, "foresight_study"))
    parser.add_argument("--docs", default=os.path.join(DEFAULT_OUT, "foresight_study", "figures"),
                        help="where the four PNGs go (the repository's copies live in docs/)")
    parser.add_argument("--fast", action="store_true", help="the test-sized settings (numbers meaningless)")
    args = parser.parse_args(argv)
    settings = fast_settings(args.seed) if args.fast else DemoSettings(seed=args.seed)
    results = run_study(settings, args.run_seeds, args.out, args.docs)
    print(json.dumps({k: results[k] for k in ("accuracy_initial", "accuracy_final", "seconds")}))
    print(f"wrote {args.out}/foresight_results.json and the figures in {args.docs}")


if __name__ == "__main__":
    main()
