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

import functools
import os

from effopd_jax.config import default_config
from effopd_jax.testing import tiny_qwen3_config, write_random_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3_TOKENIZER_DIR = os.path.join(REPO_ROOT, "third_party", "qwen3_tokenizer")
GSM8K_FILE = os.path.join(REPO_ROOT, "third_party", "gsm8k", "gsm8k_test_100.jsonl")
# The random checkpoints carry the repository's Qwen3 tokenizer files.
ensure_random_checkpoint = functools.partial(write_random_checkpoint, tokenizer_dir=QWEN3_TOKENIZER_DIR)


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
    c.teacher.update(path=teacher, param_dtype="float32", compute_dtype="float32")
    c.data.update(train_files=(GSM8K_FILE,), eval_files=(GSM8K_FILE,), prompts_per_step=8,
                  max_prompt_length=256, max_eval_prompts=8)
    c.rollout.update(max_new_tokens=24, temperature=1.0)
    c.loss.update(chunk_size=32)
    c.optimizer.update(learning_rate=1e-3)
    c.effopd.update(enabled=True, val_files=(GSM8K_FILE,), val_max_prompts=8)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
