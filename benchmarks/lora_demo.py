"""LoRA students vs full OPD on the demo task, each with and without EffOPD, over seeds.

    python -m examples.demo.prepare                      # once: the seed-0 teacher and student
    python benchmarks/lora_demo.py [--seeds 0 1 2] [--rank 8] [--lora-lr 1e-4] [--out runs/lora_bench]

Four arms per run seed, from the demo's seed-0 teacher and student (``runs/demo/cache``) with the
demo's settings (48 steps, 64 prompts per step, T = 1 rollouts, greedy test accuracy every 2
steps; EffOPD scored by greedy accuracy on 64 validation prompts):

  full         full OPD (``examples/demo/configs/opd.py``), AdamW at the demo's 1e-5;
  full+effopd  the same with EffOPD (``examples/demo/configs/effopd.py``);
  lora         ``lora.enabled``: rank ``--rank`` adapters on every attention and MLP projection,
               alpha = 2·rank, a float32 frozen base (the demo's dtype, so only the
               parameterization differs), AdamW at ``--lora-lr``;
  lora+effopd  the same with EffOPD on the adapters, extrapolating the factors A and B
               (``lora.effopd_space="factors"``, the default);
  lora+effopd-merged  (with ``--merged``) EffOPD extrapolating the merged update A·B, re-factored
               to rank r (``lora.effopd_space="merged"``).

For each arm: final test accuracy, steps to target and wall-clock to target (the demo's
definitions: target = initial + 0.95·(full OPD's final − initial) of the same seed; wall-clock =
the sum of ``step_seconds``: rollout, teacher, update and EffOPD's validation decoding), total
wall-clock, and the optimizer state's bytes (every array of ``TrainState.opt_state``: Adam's two
moments, and EffOPD's anchor when it is on). Every arm runs one throw-away step first, so no
measured run pays for compilation. Also printed: how much of full OPD's final update the top
``rank`` directions hold (``effopd_jax.analyze``'s energy, mean over matrices) — the question a
rank has to answer. Per-seed rows, then mean ± std (population) over seeds.

The machine is shared: the load average is printed before and after; wall-clock figures are only
comparable within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # the demo is a runnable example of the repository, not of the library

from examples.demo import run as demo  # noqa: E402
from examples.demo import settings as demo_settings  # noqa: E402
from examples.demo.configs import demo_config  # noqa: E402
from examples.demo.prepare import enable_compilation_cache  # noqa: E402

ARMS = ("full", "full+effopd", "lora", "lora+effopd")
MERGED_ARM = "lora+effopd-merged"


def arm_config(arm: str, settings, assets, args):
    effopd = "+effopd" in arm
    config = demo_config(effopd=effopd, settings=settings, assets=assets)
    if arm.startswith("lora"):
        config.lora.update(enabled=True, rank=args.rank, alpha=2.0 * args.rank, base_dtype="float32")
        config.optimizer.learning_rate = args.lora_lr
        if effopd:
            config.lora.effopd_space = "merged" if arm == MERGED_ARM else "factors"
    return config


def train(config, workdir: str) -> tuple[list[dict], int]:
    """Runs one arm; (metrics records, optimizer-state bytes)."""
    import jax

    from effopd_jax import metrics, train as train_lib

    trainer = train_lib.Trainer(config, workdir, devices=jax.devices()[:1], log=lambda *a, **k: None)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state.opt_state))
    try:
        trainer.run()
    finally:
        trainer.close()
    return metrics.read_metrics(workdir), opt_bytes


def top_rank_energy(student_dir: str, workdir: str, out_dir: str, rank: int) -> float:
    """Mean over the matrices of the share of full OPD's final update in its top ``rank`` directions."""
    from effopd_jax import analyze

    steps = sorted((d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()), key=int)
    result = analyze.analyze([student_dir, os.path.join(workdir, "checkpoints", steps[-1])], out_dir, k=rank,
                             plots=False)
    return float(np.mean([row["energy"] for row in result.rows]))


def run_seed(seed: int, args, assets_settings) -> dict:
    settings = demo_settings.DemoSettings(seed=assets_settings.seed, run_seed=seed)
    assets = demo_settings.load_assets(settings, demo_settings.DEFAULT_OUT)
    root = os.path.join(args.out, f"seed{seed}")
    shutil.rmtree(root, ignore_errors=True)
    arms = ARMS + ((MERGED_ARM,) if args.merged else ())
    for arm in arms:  # compile everything first
        warm = arm_config(arm, settings, assets, args)
        warm.total_steps, warm.data.max_eval_prompts, warm.keep_checkpoints = 1, 1, 1
        train(warm, os.path.join(root, f"warmup_{arm}"))
    results = {}
    for arm in arms:
        start = time.perf_counter()
        records, opt_bytes = train(arm_config(arm, settings, assets, args), os.path.join(root, arm))
        curve = demo.accuracy_curve(records)
        searches = [(r["step"], r["effopd/accepted_multiplier"]) for r in records if r.get("effopd/searched")]
        results[arm] = {"curve": curve, "opt_bytes": opt_bytes, "run_seconds": time.perf_counter() - start,
                        "accepted": [(s, m) for s, m in searches if m != 1.0],
                        "refactor_error": [r["effopd/lora_refactor_error"] for r in records
                                           if "effopd/lora_refactor_error" in r]}
    initial = results["full"]["curve"][0]["accuracy"]
    gain = results["full"]["curve"][-1]["accuracy"] - initial
    target = initial + demo.TARGET_FRACTION * gain if gain > 0 else None
    row = {"seed": seed, "initial": initial, "target": target}
    for arm, result in results.items():
        hit = demo.first_reaching(result["curve"], target) if target is not None else None
        row[arm] = {
            "final": result["curve"][-1]["accuracy"],
            "steps_to_target": hit["step"] if hit else None,
            "seconds_to_target": hit["seconds"] if hit else None,
            "train_seconds": result["curve"][-1]["seconds"],
            "opt_bytes": result["opt_bytes"],
            "accepted": result["accepted"],
            "refactor_error": result["refactor_error"],
        }
    row["full_update_top_rank_energy"] = top_rank_energy(
        assets.student_dir, os.path.join(root, "full"), os.path.join(root, "foresight"), args.rank)
    return row


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" + ("" if len(values) == 3 else f" (n={len(values)})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-4)
    parser.add_argument("--merged", action="store_true", help="also run EffOPD in the merged space")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "lora_bench"))
    args = parser.parse_args(argv)
    enable_compilation_cache(os.path.join(demo_settings.DEFAULT_OUT, "cache", "xla"))
    print(f"load average before: {os.getloadavg()}; rank {args.rank}, LoRA lr {args.lora_lr}", flush=True)
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, args, demo_settings.DemoSettings(seed=0))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"\nseeds {args.seeds} (mean ± std); target = initial + 0.95·(full OPD final − initial)")
    print(f"initial accuracy {mean_std([r['initial'] for r in rows])}; top-{args.rank} energy of full OPD's "
          f"final update {mean_std([r['full_update_top_rank_energy'] for r in rows])}")
    print("| arm | final accuracy | steps to target | reached | wall-clock to target s | train wall-clock s "
          "| optimizer state |")
    print("|---|---|---|---|---|---|---|")
    for arm in ARMS + ((MERGED_ARM,) if args.merged else ()):
        cells = [r[arm] for r in rows]
        reached = sum(c["steps_to_target"] is not None for c in cells)
        print(f"| {arm} | {mean_std([c['final'] for c in cells])} | {mean_std([c['steps_to_target'] for c in cells])} "
              f"| {reached}/{len(cells)} | {mean_std([c['seconds_to_target'] for c in cells])} "
              f"| {mean_std([c['train_seconds'] for c in cells])} | {cells[0]['opt_bytes'] / 1024:.1f} KiB |")


if __name__ == "__main__":
    main()
