"""EffOPD's speed-up over plain OPD on the demo task, over several seeds.

    python benchmarks/effopd_speedup.py [--seeds 0 1 2] [--asset_seed 0] [--out runs/demo_bench] [--fast]

For each seed, the demo's comparison (``examples.demo.run.run_demo``: OPD and OPD+EffOPD with
identical settings) runs once with that seed for the OPD runs (rollout sampling, data order),
from the teacher and student of ``--asset_seed`` (cached in ``runs/demo/cache``, shared with
``make demo``; pass ``--per_seed_assets`` to also re-make task, teacher and student per seed,
which costs two SFT runs per seed). EffOPD is not tuned per seed. Prints per-seed figures and mean ± std (population std over seeds) of the
step and wall-clock speed-ups and of both final accuracies. A seed where EffOPD never reaches
the target (or OPD gains nothing) has no speed-up; it is counted and left out of the means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the demo is a runnable example of the repository, not of the library

from examples.demo import run as demo  # noqa: E402
from examples.demo import settings as demo_settings  # noqa: E402


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "demo_bench"))
    parser.add_argument("--fast", action="store_true", help="the test-sized variant (numbers meaningless)")
    parser.add_argument("--asset_seed", type=int, default=0)
    parser.add_argument("--per_seed_assets", action="store_true")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        asset_seed = seed if args.per_seed_assets else args.asset_seed
        settings = demo_settings.fast_settings(asset_seed) if args.fast else demo_settings.DemoSettings(seed=asset_seed)
        settings = dataclasses.replace(settings, run_seed=seed)
        summary = demo.run_demo(settings, os.path.join(args.out, f"seed{seed}"), foresight=False,
                                assets_dir=demo_settings.DEFAULT_OUT, log=lambda *a, **k: None)
        row = {
            "seed": seed,
            "asset_seed": asset_seed,
            "teacher": summary["teacher_accuracy"],
            "student": summary["student_initial_accuracy"],
            "opd_final": summary["opd"]["final_accuracy"],
            "effopd_final": summary["effopd"]["final_accuracy"],
            "opd_steps": summary["opd"]["steps_to_target"],
            "effopd_steps": summary["effopd"]["steps_to_target"],
            "speedup_steps": summary["speedup_steps"],
            "speedup_wallclock": summary["speedup_wallclock"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    def present(key: str) -> list[float]:
        return [r[key] for r in rows if r[key] is not None]

    print(f"seeds: {args.seeds}")
    print(f"teacher accuracy:       {mean_std(present('teacher'))}")
    print(f"student initial:        {mean_std(present('student'))}")
    print(f"OPD final accuracy:     {mean_std(present('opd_final'))}")
    print(f"EffOPD final accuracy:  {mean_std(present('effopd_final'))}")
    print(f"speed-up (steps):       {mean_std(present('speedup_steps'))}")
    print(f"speed-up (wall-clock):  {mean_std(present('speedup_wallclock'))}")
    missing = [r["seed"] for r in rows if r["speedup_steps"] is None]
    if missing:
        print(f"no speed-up (target not reached by EffOPD, or no OPD gain) for seeds {missing}")


if __name__ == "__main__":
    main()
