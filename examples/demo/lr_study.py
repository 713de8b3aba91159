"""Learning rate vs the exact held-out reverse KL on the demo's models (the README's LR guidance).

    python -m examples.demo.lr_study [--seed 0] [--steps 16] [--lrs 1e-3 1e-4 1e-5 1e-6] [--out DIR]

Plain OPD (no EffOPD) with AdamW at each learning rate, for two pairs built from the demo's assets:

* ``demo``: the demo's SFT student -> its teacher (a weaker, differently sized student);
* ``noisy_teacher``: the teacher's own weights plus Gaussian noise (relative std ``--noise`` per
  tensor) -> the teacher, the tiny counterpart of "teacher = the real model, student = the same
  weights with noise" (a student that starts close to its teacher).

Every ``--eval_every`` steps the trainer's exact held-out reverse KL(student || teacher) on the
initial student's responses to 64 test prompts (``eval.kl_prompts``) and the greedy test accuracy
are recorded; the table shows both per step, and whether the trainer's rising-KL warning fired.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from effopd_jax import metrics, models, train
from examples.demo.configs import demo_config
from examples.demo.prepare import enable_compilation_cache, prepare_assets
from examples.demo.settings import DEFAULT_OUT, DemoSettings


def noisy_copy(source_dir: str, out_dir: str, relative_std: float, seed: int) -> str:
    """``source_dir``'s weights plus N(0, (relative_std * rms(tensor))^2) noise, as an HF checkpoint."""
    from effopd_jax import data  # noqa: PLC0415

    config, params = models.load_hf(source_dir, param_dtype=jnp.float32, scan_layers=False)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + relative_std * jnp.sqrt(jnp.mean(x ** 2)) * jax.random.normal(k, x.shape, x.dtype)
             for x, k in zip(leaves, keys)]
    models.save_hf(config, jax.device_get(jax.tree.unflatten(treedef, noisy)), out_dir)
    data.load_tokenizer(source_dir).save_pretrained(out_dir)
    return out_dir


def run(settings: DemoSettings, lrs: Sequence[float], steps: int, eval_every: int, noise: float,
        out_dir: str) -> list[dict]:
    enable_compilation_cache(os.path.join(DEFAULT_OUT, "cache", "xla"))
    assets = prepare_assets(settings, DEFAULT_OUT, log=lambda *a, **k: None)
    students = {"demo": assets.student_dir,
                "noisy_teacher": noisy_copy(assets.teacher_dir, os.path.join(out_dir, "noisy_teacher"), noise,
                                            settings.seed)}
    rows = []
    for pair, student_dir in students.items():
        for lr in lrs:
            run_settings = dataclasses.replace(settings, opd_steps=steps, eval_every=eval_every, learning_rate=lr)
            config = demo_config(effopd=False, settings=run_settings, assets=assets)
            config.student.path = student_dir
            config.keep_checkpoints = 1
            workdir = os.path.join(out_dir, f"{pair}_lr{lr:g}")
            shutil.rmtree(workdir, ignore_errors=True)
            warnings = []
            trainer = train.Trainer(config, workdir, devices=jax.devices()[:1],
                                    log=lambda line, *a, **k: warnings.append(line) if "WARNING" in str(line) else None)
            try:
                trainer.run()
            finally:
                trainer.close()
            evals = [r for r in metrics.read_metrics(workdir) if r.get("kind") == "eval"]
            row = {"pair": pair, "lr": lr, "steps": [r["step"] for r in evals],
                   "kl": [r["eval/exact_reverse_kl"] for r in evals],
                   "accuracy": [r["eval/mean_at_n"] for r in evals], "warned": bool(warnings)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_table(rows: Sequence[dict]) -> None:
    steps = rows[0]["steps"]
    print(f"{'pair':>13} {'lr':>6} | exact held-out KL at steps {steps} | accuracy first -> last | warned")
    for r in rows:
        kl = " ".join(f"{v:7.4f}" for v in r["kl"])
        print(f"{r['pair']:>13} {r['lr']:6.0e} | {kl} | {r['accuracy'][0]:.3f} -> {r['accuracy'][-1]:.3f} | "
              f"{'yes' if r['warned'] else 'no'}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--eval_every", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6])
    parser.add_argument("--noise", type=float, default=0.1, help="relative noise std of the noisy-teacher student")
    parser.add_argument("--out", default=os.path.join(DEFAULT_OUT, "lr_study"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = run(DemoSettings(seed=args.seed), args.lrs, args.steps, args.eval_every, args.noise, args.out)
    with open(os.path.join(args.out, "lr_study.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print_table(rows)


if __name__ == "__main__":
    main()
