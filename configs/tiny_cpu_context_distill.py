"""Smoke-size on-policy self-distillation on CPU: the tiny random Qwen3 student of
``configs/tiny_cpu.py`` is its own teacher, scoring its responses to the bundled GSM8K problems
with each problem's worked solution in the teacher's prompt.

    python -m effopd_jax.train --config=configs/tiny_cpu_context_distill.py --workdir=runs/tiny_distill

The teacher is the live student (`model="student_live"`: its current weights, stop-gradient, no
second copy), so the two differ only in the prompt: the student sees the problem, the teacher
the problem, the reference solution (the GSM8K file's `solution` field) and an instruction to
solve it its own way (`effopd_jax.config.DEFAULT_CONTEXT_TEMPLATE`), rendered with the same Qwen3 chat
template and joined to the student's response ids. `reverse_kl/self` in metrics.jsonl is the
sampled reverse KL between the two. The model is random, so this shows that every piece runs,
not that anything is learnt. About a minute on a 2-core CPU.
"""

import os

from effopd_jax.config import DEFAULT_CONTEXT_TEMPLATE, default_config, teacher_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODELS = os.path.join(REPO_ROOT, "configs", "tiny")
QWEN3_TOKENIZER_DIR = os.path.join(REPO_ROOT, "third_party", "qwen3_tokenizer")
GSM8K_FILE = os.path.join(REPO_ROOT, "third_party", "gsm8k", "gsm8k_test_100.jsonl")


def get_config():
    c = default_config()
    c.seed = 0
    c.total_steps = 8
    c.checkpoint_every = 4
    c.export_hf = False
    c.student.update(path=os.path.join(TINY_MODELS, "qwen3_h32.json"), init="random", init_seed=1,
                     param_dtype="float32", compute_dtype="float32")
    # GSM8K prompts are at most 167 tokens; with the solution in context at most 398.
    c.teachers = (teacher_config(name="self", model="student_live", context_template=DEFAULT_CONTEXT_TEMPLATE,
                                 missing_solution="raise", max_prompt_length=448),)
    c.tokenizer = QWEN3_TOKENIZER_DIR
    c.data.update(train_files=(GSM8K_FILE,), prompts_per_step=8, max_prompt_length=192, solution_key="solution")
    c.rollout.update(max_new_tokens=24, temperature=1.0)
    c.loss.update(chunk_size=32)
    c.optimizer.update(learning_rate=1e-3)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
