"""EffOPD's speed-up over plain OPD on the demo task, over asset seeds x run seeds.

    python benchmarks/effopd_speedup.py [--asset_seeds 0 1 2 3 4] [--run_seeds 0 1 2] [--rule paper]
                                        [--full_scoring_check [RUN_SEED ...]] [--out runs/demo_bench] [--fast]
                                        [--json FILE] | --load FILE [FILE ...]

For every asset seed (task files, SFT teacher and student, cached in ``runs/demo/cache`` and
shared with ``make demo``) and every run seed (rollout sampling and data order of the OPD runs),
the demo's comparison runs once (``examples.demo.run.run_demo``: OPD and OPD + EffOPD with
identical settings, EffOPD not tuned per seed). Printed, as a table:

* per comparison: the pair (teacher, student), both final accuracies, steps and seconds to the
  target (initial + 95% of OPD's gain), the speed-ups, EffOPD's validation cost;
* over all comparisons: mean and 95% confidence interval (Student t over the comparisons, which
  treats them as independent; the asset seeds are the larger source of variation) of the step
  and wall-clock speed-ups, both final accuracies and their difference, and how many
  comparisons meet the goal (>= 3x steps, >= 2x wall-clock, EffOPD's final accuracy within 0.01
  of OPD's or better).

Wall-clock: the sum of per-step seconds (rollout, teacher, update and EffOPD's validation
decoding), measured in one process with the OPD run first; a shared machine makes it noisy, so
the load (``/proc/loadavg``) is printed before and after. ``--full_scoring_check`` reruns the
EffOPD arm of every comparison (or of the given run seeds) with ``effopd.val_early_stop=False`` and reports whether every decision was the same
and what early stopping saved (prompts, tokens, seconds). A comparison where EffOPD never
reaches the target (or OPD gains nothing) has no speed-up: it is counted and left out of the
speed-up means, never given a made-up value.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the demo is a runnable example of the repository, not of the library

from examples.demo import run as demo  # noqa: E402
from examples.demo import settings as demo_settings  # noqa: E402

GOAL_STEPS = 3.0
GOAL_WALLCLOCK = 2.0
GOAL_ACCURACY_GAP = 0.01


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the Student-t confidence interval of the mean (half-width NaN for n < 2)."""
    from scipy import stats  # noqa: PLC0415  (a dependency of jax)

    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(np.mean(values)) if len(values) else math.nan, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return float(np.mean(values)), float(half)


def format_ci(values: list[float], digits: int = 3) -> str:
    if not values:
        return "n/a"
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f} (n={len(values)})" if math.isfinite(half) else f"{mean:.{digits}f} (n=1)"


def machine() -> str:
    """CPU model and count: where the wall-clock figures come from."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def same_decisions(a: list[dict], b: list[dict]) -> bool:
    """Whether two EffOPD arms made the same searches: multipliers tried, accepted multiplier and
    every exactly computed score."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if (x["step"], x["multipliers"], x["accepted"]) != (y["step"], y["multipliers"], y["accepted"]):
            return False
        for sx, sy, ex, ey in zip(x["scores"], y["scores"], x["exact"], y["exact"]):
            if ex and ey and sx != sy:
                return False
    return True


def compare(asset_seed: int, run_seed: int, args) -> dict:
    base = demo_settings.fast_settings(asset_seed) if args.fast else demo_settings.DemoSettings(seed=asset_seed)
    settings = dataclasses.replace(base, run_seed=run_seed, effopd_rule=args.rule)
    out = os.path.join(args.out, f"asset{asset_seed}_run{run_seed}")
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' progress bars
        summary = demo.run_demo(settings, out, foresight=False, assets_dir=demo_settings.DEFAULT_OUT,
                                log=lambda *a, **k: None)
    validation = summary["effopd"]["validation"]
    row = {
        "asset_seed": asset_seed,
        "run_seed": run_seed,
        "teacher": summary["teacher_accuracy"],
        "student": summary["student_initial_accuracy"],
        "pair_meets_bar": summary["pair_meets_bar"],
        "opd_final": summary["opd"]["final_accuracy"],
        "effopd_final": summary["effopd"]["final_accuracy"],
        "opd_steps": summary["opd"]["steps_to_target"],
        "effopd_steps": summary["effopd"]["steps_to_target"],
        "speedup_steps": summary["speedup_steps"],
        "speedup_wallclock": summary["speedup_wallclock"],
        "opd_seconds": summary["opd"]["total_seconds"],
        "effopd_seconds": summary["effopd"]["total_seconds"],
        "val_seconds": validation["seconds"],
        "val_points": validation["points_scored"],
        "val_prompts": validation["prompts_decoded"],
        "val_skipped": validation["prompts_skipped"],
        "val_tokens": validation["tokens_decoded"],
        "accepted": [s["accepted"] for s in summary["effopd"]["searches"]],
    }
    if args.full_scoring_check is not None and (not args.full_scoring_check or run_seed in args.full_scoring_check):
        from examples.demo.configs import demo_config  # noqa: PLC0415

        full_settings = dataclasses.replace(settings, effopd_val_early_stop=False)
        config = demo_config(effopd=True, settings=full_settings,
                             assets=demo_settings.load_assets(full_settings, demo_settings.DEFAULT_OUT))
        workdir = os.path.join(out, "effopd_full_scoring")
        import shutil  # noqa: PLC0415

        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):
            records = demo._train(config, workdir, lambda *a, **k: None)
        full = demo.validation_cost(records)
        row["full_same_decisions"] = same_decisions(summary["effopd"]["searches"], demo.effopd_searches(records))
        row["full_same_curve"] = [p["accuracy"] for p in summary["effopd"]["curve"]] == [
            p["accuracy"] for p in demo.accuracy_curve(records)]
        row["full_val_prompts"] = full["prompts_decoded"]
        row["full_val_tokens"] = full["tokens_decoded"]
        row["full_val_seconds"] = full["seconds"]
    return row


def print_table(rows: list[dict]) -> None:
    full_check = any("full_same_decisions" in r for r in rows)
    header = (f"{'asset':>5} {'run':>3} | {'teacher':>7} {'student':>7} {'bar':>3} | {'OPD fin':>7} {'Eff fin':>7} | "
              f"{'OPD st':>6} {'Eff st':>6} {'x steps':>7} {'x wall':>6} | {'val pts':>7} {'decoded':>7} "
              f"{'skipped':>7} {'val s':>6}")
    if full_check:
        header += f" | {'same':>4} {'saved tok':>9}"
    print(header)
    fmt = lambda v, spec: "   -" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        line = (f"{r['asset_seed']:>5} {r['run_seed']:>3} | {r['teacher']:7.3f} {r['student']:7.3f} "
                f"{'yes' if r['pair_meets_bar'] else 'NO':>3} | {r['opd_final']:7.3f} {r['effopd_final']:7.3f} | "
                f"{fmt(r['opd_steps'], '6d'):>6} {fmt(r['effopd_steps'], '6d'):>6} {fmt(r['speedup_steps'], '7.2f'):>7} "
                f"{fmt(r['speedup_wallclock'], '6.2f'):>6} | {r['val_points']:7d} {r['val_prompts']:7d} "
                f"{r['val_skipped']:7d} {r['val_seconds']:6.1f}")
        if "full_same_decisions" in r:
            saved = 1 - r["val_tokens"] / r["full_val_tokens"] if r["full_val_tokens"] else 0.0
            line += f" | {'yes' if r['full_same_decisions'] and r['full_same_curve'] else 'NO':>4} {saved:9.1%}"
        print(line)


def print_summary(rows: list[dict]) -> None:
    present = lambda key: [r[key] for r in rows if r[key] is not None]  # noqa: E731
    gaps = [r["effopd_final"] - r["opd_final"] for r in rows]
    print(f"pairs meeting the bar (teacher >= 0.9, student >= 0.3 below): "
          f"{len({r['asset_seed'] for r in rows if r['pair_meets_bar']})} of {len({r['asset_seed'] for r in rows})} asset seeds")
    print(f"teacher accuracy            {format_ci(present('teacher'))}")
    print(f"student initial accuracy    {format_ci(present('student'))}")
    print(f"OPD final accuracy          {format_ci(present('opd_final'))}")
    print(f"EffOPD final accuracy       {format_ci(present('effopd_final'))}")
    print(f"EffOPD - OPD final          {format_ci(gaps)}")
    print(f"speed-up in steps           {format_ci(present('speedup_steps'), 2)}")
    print(f"speed-up in wall-clock      {format_ci(present('speedup_wallclock'), 2)}")
    print(f"EffOPD validation seconds   {format_ci(present('val_seconds'), 2)} "
          f"(of {format_ci(present('effopd_seconds'), 1)} s per EffOPD run)")
    for asset_seed in sorted({r["asset_seed"] for r in rows}):
        mine = [r for r in rows if r["asset_seed"] == asset_seed]
        steps = [r["speedup_steps"] for r in mine if r["speedup_steps"] is not None]
        wall = [r["speedup_wallclock"] for r in mine if r["speedup_wallclock"] is not None]
        print(f"  asset seed {asset_seed}: speed-up in steps {format_ci(steps, 2)}, wall-clock {format_ci(wall, 2)}, "
              f"EffOPD - OPD final {format_ci([r['effopd_final'] - r['opd_final'] for r in mine])}")
    missing = [(r["asset_seed"], r["run_seed"]) for r in rows if r["speedup_steps"] is None]
    if missing:
        print(f"no speed-up (EffOPD never reached the target, or OPD gained nothing): {missing}")
    goal = [r for r in rows if r["speedup_steps"] is not None and r["speedup_steps"] >= GOAL_STEPS
            and (r["speedup_wallclock"] or 0) >= GOAL_WALLCLOCK
            and r["effopd_final"] >= r["opd_final"] - GOAL_ACCURACY_GAP]
    print(f"comparisons meeting the goal (>= {GOAL_STEPS:g}x steps, >= {GOAL_WALLCLOCK:g}x wall-clock, final "
          f"within {GOAL_ACCURACY_GAP} of OPD or better): {len(goal)} of {len(rows)}")
    skipped = sum(r["val_skipped"] for r in rows)
    decoded = sum(r["val_prompts"] for r in rows)
    print(f"early-stopped validation: {skipped} of {skipped + decoded} prompt decodes skipped "
          f"({skipped / max(skipped + decoded, 1):.1%})")
    checked = [r for r in rows if "full_same_decisions" in r]
    if checked:
        same = all(r["full_same_decisions"] and r["full_same_curve"] for r in checked)
        tokens = sum(r["val_tokens"] for r in checked)
        full_tokens = sum(r["full_val_tokens"] for r in checked)
        seconds, full_seconds = sum(r["val_seconds"] for r in checked), sum(r["full_val_seconds"] for r in checked)
        print(f"full-scoring rerun of {len(checked)} comparisons: decisions and accuracy curves identical in every "
              f"one: {same}; "
              f"validation tokens {tokens} vs {full_tokens} ({1 - tokens / max(full_tokens, 1):.1%} saved), "
              f"validation seconds {seconds:.1f} vs {full_seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--asset_seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--run_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rule", choices=("paper", "followup"), default="paper", help="EffOPD's rule (effopd.rule)")
    parser.add_argument("--full_scoring_check", type=int, nargs="*", default=None, metavar="RUN_SEED",
                        help="rerun the EffOPD arm without early-stopped validation and compare, for these run "
                             "seeds (no seed given: all)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "demo_bench"))
    parser.add_argument("--fast", action="store_true", help="the test-sized variant (numbers meaningless)")
    parser.add_argument("--json", default="", help="also write every row to this JSON file")
    parser.add_argument("--load", nargs="+", default=[], metavar="JSON",
                        help="run nothing: print the table and summary of the rows in these --json files "
                             "(e.g. run seeds measured in separate invocations)")
    args = parser.parse_args()

    if args.load:
        rows, rules = [], set()
        for path in args.load:
            with open(path) as f:
                saved = json.load(f)
            rows += saved["rows"]
            rules.add(saved["rule"])
            print(f"{path}: {len(saved['rows'])} comparisons, rule {saved['rule']}, measured on {saved['machine']}")
        if len(rules) > 1:
            raise SystemExit(f"--load: the files mix EffOPD rules {sorted(rules)}; load one rule at a time")
        print()
        print_table(rows)
        print()
        print_summary(rows)
        return

    print(f"machine: {machine()}; load before: {load()}; rule: {args.rule}; "
          f"{'fast' if args.fast else 'full'} settings", flush=True)
    t_start = time.perf_counter()
    rows = []
    for asset_seed in args.asset_seeds:
        for run_seed in args.run_seeds:
            row = compare(asset_seed, run_seed, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print_table(rows)
    print()
    print_summary(rows)
    print(f"load after: {load()}; {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rule": args.rule, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
