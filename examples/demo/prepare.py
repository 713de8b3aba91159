"""Builds the demo's assets: task files, tokenizer, SFT teacher and student, into the cache.

    python -m examples.demo.prepare [--seed 0] [--out runs/demo] [--fast]

Writes (or reuses) ``OUT/cache/seed<seed>-<key>/{task,teacher,student}`` for the default
settings (``--fast``: the seconds-scale test variant), the key hashing every setting that
shapes them (:meth:`examples.demo.settings.DemoSettings.cache_key`). ``make demo`` runs this
first; the trainer configs ``examples/demo/configs/{opd,effopd}.py`` then only read the assets.
Compiled programs go to JAX's persistent compilation cache in ``OUT/cache/xla``, shared with
:mod:`examples.demo.run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

from effopd_jax import data
from examples.demo import sft
from examples.demo.settings import (
    DEFAULT_OUT,
    Assets,
    DemoSettings,
    ModelSpec,
    asset_root,
    fast_settings,
    load_assets,
)
from examples.demo.tasks import arithmetic


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache at ``path`` (unless one is set), for every program."""
    import jax  # noqa: PLC0415

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _model_config(spec: ModelSpec, tokenizer):
    return sft.qwen3_for_task(
        len(tokenizer), hidden_size=spec.hidden_size, num_layers=spec.num_layers, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, intermediate_size=spec.intermediate_size or None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def prepare_assets(settings: DemoSettings, out_dir: str = DEFAULT_OUT, *, log: Callable[..., None] = print) -> Assets:
    """Writes (or reuses) the task files, tokenizer, teacher and student under ``out_dir/cache``."""
    root = asset_root(settings, out_dir)
    task_dir = os.path.join(root, "task")
    tokenizer_dir = os.path.join(task_dir, "tokenizer")
    if not os.path.exists(os.path.join(task_dir, "test.jsonl")):
        log(f"== task: writing {settings.n_train}/{settings.n_val}/{settings.n_test} problems to {task_dir}")
        arithmetic.make_task_files(
            task_dir, settings.seed, settings.n_train, settings.n_val, settings.n_test, max_digits=settings.max_digits
        )
        arithmetic.save_tokenizer(tokenizer_dir)
    tokenizer = data.load_tokenizer(tokenizer_dir)
    for role, spec, sft_settings in (
        ("teacher", settings.teacher, settings.teacher_sft),
        ("student", settings.student, settings.student_sft),
    ):
        log(f"== {role}: Qwen3 hidden {spec.hidden_size} x {spec.num_layers} layers, {sft_settings.steps} SFT steps")
        sft.run_sft(
            _model_config(spec, tokenizer), task_dir, tokenizer_dir, os.path.join(root, role),
            dataclasses.replace(sft_settings, seed=settings.seed), log=log,
        )
    # Read back exactly as the trainer configs will (the SFT markers hold the same results).
    return load_assets(settings, out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="the assets go to OUT/cache (as for examples.demo.run)")
    parser.add_argument("--fast", action="store_true", help="seconds-scale variant (tiny models, few SFT steps)")
    args = parser.parse_args(argv)
    settings = fast_settings(args.seed) if args.fast else DemoSettings(seed=args.seed)
    t_start = time.perf_counter()
    enable_compilation_cache(os.path.join(args.out, "cache", "xla"))
    assets = prepare_assets(settings, args.out)
    print(f"teacher test accuracy {assets.teacher_accuracy:.3f}, student {assets.student_accuracy:.3f}")
    print(f"demo assets (seed {settings.seed}) ready in {asset_root(settings, args.out)} "
          f"({time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
