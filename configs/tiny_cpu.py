"""Smoke-size OPD on CPU: tiny random Qwen3 student and teacher, real Qwen3 tokenizer, GSM8K prompts.

    python -m effopd_jax.train --config=configs/tiny_cpu.py --workdir=runs/tiny_cpu

Runs in about a minute on a 2-core CPU and writes nothing before training starts: the student
(hidden 32) and teacher (hidden 64) are Qwen3 architectures described by the `config.json` files
in ``configs/tiny/`` (Qwen3's 151,936-token vocabulary) and randomly initialised by the trainer
(``init="random"``, seeds 1 and 2). The prompts are the 100 GSM8K problems in
``third_party/gsm8k`` through the official Qwen3 chat template. The models are random, so the
numbers only show that every piece runs (rollout, teacher scoring, loss, update, EffOPD search,
evaluation, checkpoints, HF export), not that anything is learnt; for that, see ``make demo``.
"""

import os

from effopd_jax.config import default_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODELS = os.path.join(REPO_ROOT, "configs", "tiny")
QWEN3_TOKENIZER_DIR = os.path.join(REPO_ROOT, "third_party", "qwen3_tokenizer")
GSM8K_FILE = os.path.join(REPO_ROOT, "third_party", "gsm8k", "gsm8k_test_100.jsonl")


def get_config():
    c = default_config()
    c.seed = 0
    c.total_steps = 8
    c.checkpoint_every = 4
    c.eval_every = 0
    c.student.update(path=os.path.join(TINY_MODELS, "qwen3_h32.json"), init="random", init_seed=1,
                     param_dtype="float32", compute_dtype="float32")
    c.teachers[0].update(path=os.path.join(TINY_MODELS, "qwen3_h64.json"), init="random", init_seed=2,
                         param_dtype="float32", compute_dtype="float32")
    c.tokenizer = QWEN3_TOKENIZER_DIR
    c.data.update(train_files=(GSM8K_FILE,), eval_files=(GSM8K_FILE,), prompts_per_step=8,
                  max_prompt_length=256, max_eval_prompts=8)
    c.rollout.update(max_new_tokens=24, temperature=1.0)
    c.loss.update(chunk_size=32)
    c.optimizer.update(learning_rate=1e-3)
    c.effopd.update(enabled=True, val_files=(GSM8K_FILE,), val_max_prompts=8)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
