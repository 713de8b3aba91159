"""The authors' on-policy context distillation (docs/paper_runs.md#run-table,
`run_qwen3-4b-context-distill.sh:17-80`, docs/opd_loss.md#context-distillation): Qwen3-4B is its
own teacher. The teacher is the student's initial weights, frozen, scoring the student's
response under a privileged prompt: the problem, a reference solution, and an instruction to
solve the problem in its own way (our wording: `effopd_jax.config.DEFAULT_CONTEXT_TEMPLATE`). lambda = 1,
lr 1e-5, 128 prompts x 8 rollouts per step, one epoch.

Rows without a reference solution (`extra_info.ref_solution`, the authors' field) are skipped and
counted (`skipped_rows/self` in metrics.jsonl); `--config.teachers[0].missing_solution=raise`
refuses them before training instead. The privileged prompt is longer than the student's, so
the teacher has its own static prompt length (`max_prompt_length`; longer ones are refused
before training). For the live student as teacher (no second copy of the weights; see
README#self-distillation-with-privileged-context) set `--config.teachers[0].model=student_live`.

Model and data paths are the user's:
    python -m effopd_jax.train --config=configs/qwen3_4b_context_distill.py --workdir=gs://bucket/run \
      --config.student.path=/ckpt/Qwen3-4B \
      --config.data.train_files='("/data/DeepMath-103K/train_filtered_level6_with_one_correct_solution.parquet",)' \
      --config.data.eval_files='("/data/aime24.parquet","/data/aime25.parquet")'
"""

from effopd_jax.config import DEFAULT_CONTEXT_TEMPLATE, default_config, teacher_config


def get_config():
    c = default_config()
    c.seed = 42
    c.total_steps = 100  # the authors run len(dataloader) * 1 epoch; set to your data size
    c.checkpoint_every = 50
    c.eval_every = 10
    c.student.update(path="", param_dtype="float32", compute_dtype="bfloat16", scan_layers=True, remat="full")
    c.teachers = (teacher_config(name="self", model="student_initial", context_template=DEFAULT_CONTEXT_TEMPLATE,
                                 missing_solution="skip", max_prompt_length=6144),)
    c.data.update(prompts_per_step=128, max_prompt_length=2048, shuffle=True, solution_key="extra_info.ref_solution")
    c.rollout.update(max_new_tokens=16384, temperature=1.0, top_k=0, top_p=1.0, samples_per_prompt=8)
    c.loss.update(name="sampled_token", aggregation="seq-mean-token-mean", reward_scale=1.0, chunk_size=1024)
    c.optimizer.update(learning_rate=1e-5, schedule="constant", weight_decay=0.01, grad_clip=1.0)
    c.eval.update(samples_per_prompt=32, temperature=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
