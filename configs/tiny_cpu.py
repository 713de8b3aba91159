"""Smoke-size OPD on CPU: tiny random Qwen3 student and teacher, real Qwen3 tokenizer, GSM8K prompts.

    python -m effopd_jax.train --config=configs/tiny_cpu.py --workdir=runs/tiny_cpu

Runs in about a minute on a 2-core CPU. On first use it writes two random-init Qwen3
checkpoints (Qwen3's 151,936-token vocabulary, hidden 32 / 64) under ``$EFFOPD_CACHE``
(default ``.cache/`` in the repository) and reuses them afterwards. The prompts are the 100
GSM8K problems in ``third_party/gsm8k`` through the official Qwen3 chat template. The models are
random, so the numbers only show that every piece runs (rollout, teacher scoring, loss,
update, EffOPD search, evaluation, checkpoints, HF export), not that anything is learnt; for
that, see ``make demo``.
"""

import os

from effopd_jax.config import default_config, teacher_config
from effopd_jax.tiny import GSM8K_FILE, REPO_ROOT, ensure_random_checkpoint, tiny_qwen3_config


def get_config():
    cache = os.environ.get("EFFOPD_CACHE", os.path.join(REPO_ROOT, ".cache"))
    student = ensure_random_checkpoint(
        os.path.join(cache, "tiny_cpu", "student"), tiny_qwen3_config(hidden_size=32), seed=1
    )
    teacher = ensure_random_checkpoint(
        os.path.join(cache, "tiny_cpu", "teacher"), tiny_qwen3_config(hidden_size=64), seed=2
    )
    c = default_config()
    c.seed = 0
    c.total_steps = 8
    c.checkpoint_every = 4
    c.eval_every = 0
    c.student.update(path=student, param_dtype="float32", compute_dtype="float32")
    c.teachers = (teacher_config(path=teacher, param_dtype="float32", compute_dtype="float32"),)
    c.data.update(train_files=(GSM8K_FILE,), eval_files=(GSM8K_FILE,), prompts_per_step=8,
                  max_prompt_length=256, max_eval_prompts=8)
    c.rollout.update(max_new_tokens=24, temperature=1.0)
    c.loss.update(chunk_size=32)
    c.optimizer.update(learning_rate=1e-3)
    c.effopd.update(enabled=True, val_files=(GSM8K_FILE,), val_max_prompts=8)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
