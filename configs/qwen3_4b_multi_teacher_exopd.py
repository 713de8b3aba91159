"""The authors' multi-teacher G-OPD / ExOPD run (docs/paper_runs.md#run-table,
`run_qwen3-4b-g-opd-multi-teacher.sh:17-82`): Qwen3-4B distilled from a math teacher and a code
teacher, each row scored by the teacher of its tag, lambda = 1.25 with pi_B the initial student.

    A_t = lambda (T_j,t - B_t) - (s_t - B_t),   T_j the row's teacher  (docs/opd_loss.md#advantage)

Routing (README#several-teachers): the authors tag each row with `extra_info.opd_teacher`
("math" or "code"); `routing.key` reads that field. Rows with another tag or none go to the math
teacher, as in the authors' code, but here because `routing.default_teacher` says so: one
difference, the authors give such rows the plain OPD advantage T - s even with lambda != 1,
while here they get the same G-OPD advantage as every other row. Each teacher forwards only its
rows (sub-batches of `rows_per_forward`, docs in `effopd_jax/teachers.py`).

The authors run no EffOPD here; add `--config.effopd.enabled=True --config.effopd.val_files=...`
for it. Model and data paths are the user's:
    python -m effopd_jax.train --config=configs/qwen3_4b_multi_teacher_exopd.py --workdir=gs://bucket/run \
      --config.student.path=/ckpt/Qwen3-4B \
      '--config.teachers[0].path=/ckpt/Qwen3-4B-Non-Thinking-RL-Math' \
      '--config.teachers[1].path=/ckpt/Qwen3-4B-Non-Thinking-RL-Code' \
      --config.data.train_files='("/data/math_and_code/train.parquet",)' \
      --config.data.eval_files='("/data/aime24.parquet","/data/aime25.parquet")'
(The authors also validate on Eurus code problems; our evaluation grades math answers only.)
"""

from effopd_jax.config import default_config, teacher_config


def get_config():
    c = default_config()
    c.seed = 42
    c.total_steps = 300  # the authors run len(dataloader) * 3 epochs; set to your data size
    c.checkpoint_every = 50
    c.eval_every = 10
    c.student.update(path="", param_dtype="float32", compute_dtype="bfloat16", scan_layers=True, remat="full")
    teacher = dict(path="", param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True)
    c.teachers = (teacher_config(name="math", data_sources=("math",), **teacher),
                  teacher_config(name="code", data_sources=("code",), **teacher))
    c.routing.update(mode="data_source", key="extra_info.opd_teacher", default_teacher="math")
    c.data.update(prompts_per_step=1024, max_prompt_length=2048, shuffle=True)
    c.rollout.update(max_new_tokens=16384, temperature=1.0, top_k=0, top_p=1.0, samples_per_prompt=1)
    c.loss.update(name="sampled_token", aggregation="seq-mean-token-mean", reward_scale=1.25, base_path="",
                  chunk_size=1024)
    c.optimizer.update(learning_rate=1e-5, schedule="constant", weight_decay=0.01, grad_clip=1.0)
    c.eval.update(samples_per_prompt=1, temperature=1.0)  # the authors' val_kwargs.n=1 for this run
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
