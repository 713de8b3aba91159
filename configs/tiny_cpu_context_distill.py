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

from effopd_jax.config import DEFAULT_CONTEXT_TEMPLATE, default_config, load_config_file, teacher_config


def get_config():
    # configs/tiny_cpu.py's student, tokenizer, prompts, rollout and optimizer ...
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_cpu.py"))
    defaults = default_config()
    c.export_hf = False
    # ... with no evaluation and no EffOPD (their settings back at the defaults: the schema refuses
    # settings that a mode ignores) ...
    c.data.update(eval_files=(), max_eval_prompts=defaults.data.max_eval_prompts)
    c.effopd = defaults.effopd
    # ... and the live student as its own teacher, the solution in the teacher's prompt. GSM8K
    # prompts are at most 167 tokens; with the solution in context at most 398.
    c.teachers = (teacher_config(name="self", model="student_live", context_template=DEFAULT_CONTEXT_TEMPLATE,
                                 missing_solution="raise", max_prompt_length=448),)
    c.data.update(max_prompt_length=192, solution_key="solution")
    return c
