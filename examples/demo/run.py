"""The embedded demo: OPD vs OPD+EffOPD on column addition, CPU only, measured.

    python -m examples.demo.prepare [--seed 0] [--out runs/demo] [--fast]
    python -m examples.demo.run [--seed 0] [--out runs/demo] [--fast]

1. **Assets** (cached under ``OUT/cache/<key>``, the key hashing the seed and every setting;
   :mod:`examples.demo.prepare` writes them, and :func:`run_demo` reuses them or, when missing,
   makes them): the task files (:mod:`examples.demo.tasks.arithmetic`), its tokenizer, a Qwen3
   teacher (wider, longer supervised warm-up, :mod:`examples.demo.sft`) and a smaller,
   shorter-trained student.
2. **Warm-up**: one throw-away step of each run, so both measured runs find every program
   already compiled (JAX's persistent compilation cache) and neither pays for compilation.
3. **Runs**: plain OPD (``examples/demo/configs/opd.py``) and OPD+EffOPD
   (``examples/demo/configs/effopd.py``)
   from the same student, same seed, same data order and step budget, through
   :class:`effopd_jax.train.Trainer`. Greedy test accuracy every ``eval_every`` steps.
4. **Summary**: ``OUT/summary.json``, ``OUT/accuracy.png`` and, for the OPD run, the foresight
   plots of ``python -m effopd_jax.analyze`` in ``OUT/foresight``.

Definitions (also written into ``summary.json``):
  target             = a_0 + 0.95 (a_OPD(T) - a_0), with a_0 the initial student's test
                       accuracy and a_OPD(T) plain OPD's final test accuracy;
  steps_to_target    = the first evaluated step whose test accuracy is >= target (None if never);
  seconds_to_target  = sum of the per-step wall-clock ``step_seconds`` up to that step: rollout,
                       teacher scoring, update and, for EffOPD, its validation sampling; the
                       test-set evaluations (identical for both runs) are left out;
  speedup_steps      = opd.steps_to_target / effopd.steps_to_target;
  speedup_wallclock  = opd.seconds_to_target / effopd.seconds_to_target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import ml_collections

from examples.demo.configs import demo_config
from examples.demo.prepare import enable_compilation_cache, prepare_assets
from examples.demo.settings import DEFAULT_OUT, REPO_ROOT, DemoSettings, as_json, fast_settings

TARGET_FRACTION = 0.95
# What the demo's pair must show (the teacher clearly better than the student). Checked and
# reported, not enforced: the fast test variant and other seeds may fall short.
TEACHER_MIN_ACCURACY = 0.9
MIN_ACCURACY_GAP = 0.3
TARGET_DEFINITION = (
    "initial student accuracy + 0.95 * (OPD final accuracy - initial student accuracy); "
    "steps_to_target = first evaluated step with test accuracy >= target"
)


# ---------------------------------------------------------------------------------------------
# Summary (pure)
# ---------------------------------------------------------------------------------------------


def accuracy_curve(records: Sequence[dict]) -> list[dict]:
    """``[{"step", "accuracy", "seconds"}]`` from a run's metrics records, ``seconds`` as defined above."""
    step_seconds = {r["step"]: float(r["step_seconds"]) for r in records if r.get("kind") != "eval"}
    curve = []
    for r in records:
        if r.get("kind") == "eval":
            seconds = sum(v for s, v in step_seconds.items() if s <= r["step"])
            curve.append({"step": int(r["step"]), "accuracy": float(r["eval/mean_at_n"]), "seconds": seconds})
    curve.sort(key=lambda p: p["step"])
    if not curve:
        raise ValueError("records: no evaluation records (kind='eval'); set config.eval_every and eval_files")
    return curve


def effopd_searches(records: Sequence[dict]) -> list[dict]:
    """Every EffOPD search of a run: step, multipliers tried, their scores (``exact`` False: a
    bound, decoding stopped early), the accepted multiplier."""
    return [{"step": r["step"], "multipliers": r["effopd/multipliers"], "scores": r["effopd/scores"],
             "exact": r.get("effopd/scores_exact", [True] * len(r["effopd/scores"])),
             "accepted": r["effopd/accepted_multiplier"]}
            for r in records if r.get("effopd/searched")]


def validation_cost(records: Sequence[dict]) -> dict:
    """What EffOPD's validation decoding cost over a run: searches, points scored, prompts decoded
    and skipped (early stop), response tokens decoded, seconds."""
    searched = [r for r in records if r.get("effopd/searched")]
    return {
        "searches": len(searched),
        "points_scored": sum(r["effopd/num_evals"] for r in searched),
        "prompts_decoded": sum(r.get("effopd/val_prompts_decoded", 0) for r in searched),
        "prompts_skipped": sum(r.get("effopd/val_prompts_skipped", 0) for r in searched),
        "tokens_decoded": sum(r.get("effopd/val_tokens", 0) for r in searched),
        "seconds": sum(r["effopd/seconds"] for r in searched),
    }


def first_reaching(curve: Sequence[dict], target: float) -> dict | None:
    """The first point of ``curve`` with ``accuracy >= target`` (None if none)."""
    return next((p for p in curve if p["accuracy"] >= target), None)


def summarize(
    opd_curve: Sequence[dict], effopd_curve: Sequence[dict], *, teacher_accuracy: float
) -> dict:
    """The ``summary.json`` fields from both accuracy curves (see the module docstring)."""
    initial = opd_curve[0]["accuracy"]
    if opd_curve[0]["step"] != 0 or effopd_curve[0]["step"] != 0:
        raise ValueError("curves: both runs need a step-0 evaluation (the initial student)")
    opd_final = opd_curve[-1]["accuracy"]
    gain = opd_final - initial
    # Without a gain there is nothing to accelerate: no target, no speed-up.
    target = initial + TARGET_FRACTION * gain if gain > 0 else None
    arms = {}
    for name, curve in (("opd", opd_curve), ("effopd", effopd_curve)):
        hit = first_reaching(curve, target) if target is not None else None
        arms[name] = {
            "final_accuracy": curve[-1]["accuracy"],
            "steps_to_target": hit["step"] if hit else None,
            "seconds_to_target": hit["seconds"] if hit else None,
            "total_seconds": curve[-1]["seconds"],
            "curve": list(curve),
        }

    def ratio(key: str) -> float | None:
        a, b = arms["opd"][key], arms["effopd"][key]
        return a / b if a is not None and b else None

    return {
        "teacher_accuracy": teacher_accuracy,
        "student_initial_accuracy": initial,
        "opd": arms["opd"],
        "effopd": arms["effopd"],
        "target": target,
        "target_definition": TARGET_DEFINITION,
        "speedup_steps": ratio("steps_to_target"),
        "speedup_wallclock": ratio("seconds_to_target"),
        "wallclock_definition": "sum of step_seconds (rollout, teacher, update, EffOPD validation) up to the step",
    }


def format_table(summary: dict) -> str:
    """Test accuracy vs step for both runs, as a text table."""
    opd = {p["step"]: p for p in summary["opd"]["curve"]}
    eff = {p["step"]: p for p in summary["effopd"]["curve"]}
    lines = [f"{'step':>5} | {'OPD acc':>8} {'time s':>7} | {'EffOPD acc':>10} {'time s':>7}"]
    for step in sorted(set(opd) | set(eff)):
        a, b = opd.get(step), eff.get(step)
        left = f"{a['accuracy']:8.3f} {a['seconds']:7.1f}" if a else " " * 16
        right = f"{b['accuracy']:10.3f} {b['seconds']:7.1f}" if b else ""
        lines.append(f"{step:5d} | {left} | {right}")
    return "\n".join(lines)


def plot_accuracy(summary: dict, path: str) -> None:
    """``path``: test accuracy vs step (left) and vs wall-clock seconds (right), both runs."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in (("opd", "OPD"), ("effopd", "OPD + EffOPD")):
        curve = summary[name]["curve"]
        axes[0].plot([p["step"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=label)
        axes[1].plot([p["seconds"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=label)
    for ax, xlabel in zip(axes, ("training step", "wall-clock seconds (eval excluded)")):
        if summary["target"] is not None:
            ax.axhline(summary["target"], color="grey", linestyle="--", linewidth=1, label="target")
        ax.axhline(summary["teacher_accuracy"], color="black", linestyle=":", linewidth=1, label="teacher")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("greedy test accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _train(config: ml_collections.ConfigDict, workdir: str, log: Callable[..., None]) -> list[dict]:
    import jax  # noqa: PLC0415

    from effopd_jax import metrics, train  # noqa: PLC0415

    trainer = train.Trainer(config, workdir, devices=jax.devices()[:1], log=log)
    try:
        trainer.run()
    finally:
        trainer.close()
    return metrics.read_metrics(workdir)


def run_demo(settings: DemoSettings, out_dir: str = DEFAULT_OUT, *, foresight: bool = True,
             assets_dir: str | None = None, log: Callable[..., None] = print) -> dict:
    """Assets -> warm-up -> OPD -> EffOPD -> summary.json, accuracy.png (and foresight plots).

    ``assets_dir`` (default ``out_dir``) holds the ``cache/`` of task files and models, so several
    output directories can share one teacher and student.
    """
    import shutil  # noqa: PLC0415

    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    assets_dir = assets_dir or out_dir
    enable_compilation_cache(os.path.join(assets_dir, "cache", "xla"))
    assets = prepare_assets(settings, assets_dir, log=log)
    log(f"teacher test accuracy {assets.teacher_accuracy:.3f}, student {assets.student_accuracy:.3f}")
    pair_ok = (
        assets.teacher_accuracy >= TEACHER_MIN_ACCURACY
        and assets.teacher_accuracy - assets.student_accuracy >= MIN_ACCURACY_GAP
    )
    if not pair_ok:
        log(
            f"WARNING: this teacher/student pair does not meet the demo's bar (teacher >= "
            f"{TEACHER_MIN_ACCURACY}, student at least {MIN_ACCURACY_GAP} lower); the comparison below "
            "still runs, but read it with that in mind (seed 0 is the measured default)"
        )
    run_seed = settings.seed if settings.run_seed is None else settings.run_seed
    runs_dir = os.path.join(out_dir, f"seed{settings.seed}_run{run_seed}")
    # Fresh run directories: the trainer would otherwise resume a finished run.
    shutil.rmtree(runs_dir, ignore_errors=True)
    quiet = lambda *a, **k: None  # noqa: E731

    log("== compiling (one throw-away step of each run)")
    for name in ("opd", "effopd"):
        warm = demo_config(effopd=name == "effopd", settings=settings, assets=assets)
        warm.total_steps = 1
        warm.data.max_eval_prompts = 1
        warm.keep_checkpoints = 1
        _train(warm, os.path.join(runs_dir, f"warmup_{name}"), quiet)

    curves, records = {}, {}
    for name in ("opd", "effopd"):
        log(f"== {name}: {settings.opd_steps} steps")
        config = demo_config(effopd=name == "effopd", settings=settings, assets=assets)
        records[name] = _train(config, os.path.join(runs_dir, name), log if name == "effopd" else quiet)
        curves[name] = accuracy_curve(records[name])
    summary = summarize(curves["opd"], curves["effopd"], teacher_accuracy=assets.teacher_accuracy)
    summary["effopd"]["searches"] = effopd_searches(records["effopd"])
    summary["effopd"]["validation"] = validation_cost(records["effopd"])
    for name in ("opd", "effopd"):
        summary[name]["exact_reverse_kl"] = [
            {"step": r["step"], "kl": r["eval/exact_reverse_kl"]} for r in records[name]
            if r.get("kind") == "eval" and "eval/exact_reverse_kl" in r]
    summary["student_sft_accuracy"] = assets.student_accuracy
    summary["pair_meets_bar"] = pair_ok
    summary["settings"] = as_json(settings)
    summary["demo_seconds"] = time.perf_counter() - t_start

    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_accuracy(summary, os.path.join(out_dir, "accuracy.png"))
    if foresight:
        summary["foresight"] = run_foresight(assets.student_dir, os.path.join(runs_dir, "opd"),
                                             os.path.join(out_dir, "foresight"), log=log)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def run_foresight(base_dir: str, workdir: str, out_dir: str, *, log: Callable[..., None] = print) -> str | None:
    """``python -m effopd_jax.analyze`` over the OPD run's checkpoints; returns out_dir or None on failure."""
    ckpt_root = os.path.join(workdir, "checkpoints")
    steps = sorted((d for d in os.listdir(ckpt_root) if d.isdigit()), key=int) if os.path.isdir(ckpt_root) else []
    if not steps:
        log("foresight: no checkpoints to analyse")
        return None
    cmd = [sys.executable, "-m", "effopd_jax.analyze", "--checkpoints", base_dir,
           *(os.path.join(ckpt_root, s) for s in steps), "--out", out_dir, "--k", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        # Reported, not hidden: the demo's own numbers stand without the foresight plots.
        log(f"foresight: analyze failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return None
    log(f"foresight plots in {out_dir}")
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--fast", action="store_true", help="seconds-scale variant (tiny models, 4 steps)")
    parser.add_argument("--no_foresight", action="store_true")
    args = parser.parse_args(argv)
    settings = fast_settings(args.seed) if args.fast else DemoSettings(seed=args.seed)
    summary = run_demo(settings, args.out, foresight=not args.no_foresight)
    print(format_table(summary))
    keys = ("teacher_accuracy", "student_initial_accuracy", "target", "speedup_steps", "speedup_wallclock")
    for key in keys:
        print(f"{key}: {summary[key]}")
    for name in ("opd", "effopd"):
        arm = summary[name]
        print(f"{name}: final accuracy {arm['final_accuracy']:.3f}, steps_to_target {arm['steps_to_target']}, "
              f"seconds_to_target {arm['seconds_to_target']}")
    print(f"wrote {os.path.join(args.out, 'summary.json')} and accuracy.png ({summary['demo_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
