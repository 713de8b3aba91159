"""The trainer configs of the demo's two arms (``opd.py``, ``effopd.py`` call :func:`demo_config`).

Building a config is pure: it reads the prepared assets (:func:`examples.demo.settings.load_assets`)
and raises, naming ``python -m examples.demo.prepare``, when they are missing.
"""

from __future__ import annotations

import os

import ml_collections

from effopd_jax.config import default_config
from examples.demo.settings import DEFAULT_OUT, Assets, DemoSettings, load_assets


def demo_config(
    *, effopd: bool, settings: DemoSettings | None = None, assets: Assets | None = None, out_dir: str = DEFAULT_OUT
) -> ml_collections.ConfigDict:
    """The trainer config of one demo arm; reads the (prepared) assets when not given."""
    settings = settings or DemoSettings()
    assets = assets or load_assets(settings, out_dir)
    c = default_config()
    c.seed = settings.seed if settings.run_seed is None else settings.run_seed
    c.total_steps = settings.opd_steps
    c.eval_every = settings.eval_every
    c.checkpoint_every = settings.eval_every
    c.keep_checkpoints = settings.opd_steps // settings.eval_every + 1  # all of them: foresight reads them
    c.export_hf = False
    c.student.update(path=assets.student_dir, param_dtype="float32", compute_dtype="float32")
    c.teachers[0].update(path=assets.teacher_dir, param_dtype="float32", compute_dtype="float32")
    c.tokenizer = assets.student_dir
    split = lambda name: os.path.join(assets.task_dir, f"{name}.jsonl")  # noqa: E731
    c.data.update(
        train_files=(split("train"),), eval_files=(split("test"),), prompts_per_step=settings.prompts_per_step,
        max_prompt_length=24, chat_template_kwargs={}, max_eval_prompts=0,
    )
    c.rollout.update(max_new_tokens=assets.max_new_tokens, temperature=1.0)
    c.eval.update(temperature=0.0, samples_per_prompt=1, kl_prompts=settings.kl_prompts)  # greedy, as for SFT
    c.loss.update(chunk_size=64)
    c.optimizer.update(learning_rate=settings.learning_rate)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    if effopd:
        c.effopd.update(
            enabled=True, val_files=(split("validation"),), val_max_prompts=settings.effopd_val_prompts,
            max_candidates=settings.effopd_max_candidates, val_temperature=settings.effopd_val_temperature,
            val_batch_prompts=settings.effopd_val_batch_prompts, rule=settings.effopd_rule,
            val_early_stop=settings.effopd_val_early_stop,
        )
    else:
        # Plain OPD sets no other EffOPD field: the trainer ignores them when it is off, and the
        # config schema refuses settings the chosen mode ignores.
        c.effopd.enabled = False
    return c
