"""The paper's standard OPD run with EffOPD on (docs/paper_runs.md#run-table, `run_qwen3-4b-g-opd.sh:17-78`).

Student Qwen/Qwen3-1.7B, teacher the Qwen3-4B math model, lr 1e-6, 1024 prompts per step,
one rollout each, responses up to 16k tokens, AdamW (0.9, 0.999, wd 0.01), clip 1.0, constant
LR; EffOPD scores candidates by sampled accuracy (T=1) on a small validation set at steps
1, 2, 4, 8, ...

Model and data paths are the user's: set them on the command line, e.g.
    python -m effopd_jax.train --config=configs/qwen3_1p7b_opd_effopd.py --workdir=gs://bucket/run \
      --config.student.path=/ckpt/Qwen3-1.7B '--config.teachers[0].path=/ckpt/Qwen3-4B-Non-Thinking-RL-Math' \
      --config.data.train_files='("/data/DeepMath-103K/train_filtered_level6.parquet",)' \
      --config.data.eval_files='("/data/aime24.parquet","/data/aime25.parquet")' \
      --config.effopd.val_files='("/data/effopd_val.parquet",)'
The verl Parquet layout (chat-list `prompt`, `reward_model.ground_truth`) is read as is.

Memory (README.md#memory-plan): plan a slice before renting it, with this file as it is,
    python -m effopd_jax.plan --config=configs/qwen3_1p7b_opd_effopd.py --topology=v5p:4x4x4
With today's programs (every phase takes all 1,024 rows at once, dense attention) it fits no slice:
on v5p:4x4x4 the rollout needs >= 133 GiB per chip, the teacher's scoring >= 660 GiB and the update
>= 544 GiB. One row per chip at a time fits v5p:4x4x4 (peak 42 GiB: the teacher's attention
scores), so the settings expected to make it fit there are `micro_batch_size=64` and the continuous
rollout engine with 64 or more `rollout.slots` (not set here: they come with the engines that
read them); v5e:16x16 and 8xH100-80GB also need blockwise attention.
"""

from effopd_jax.config import default_config, teacher_config


def get_config():
    c = default_config()
    c.seed = 42
    c.total_steps = 300  # the authors run len(dataloader) * 3 epochs; set to your data size
    c.checkpoint_every = 50
    c.eval_every = 10
    # The models this run was written for; the memory plan reads their shapes (path "" is then fine for
    # the plan only). The math teacher is an RL fine-tune of Qwen3-4B: the same architecture.
    c.student.update(path="", hf_name="Qwen/Qwen3-1.7B", param_dtype="float32", compute_dtype="bfloat16",
                     scan_layers=True, remat="full")
    c.teachers = (teacher_config(path="", hf_name="Qwen/Qwen3-4B", param_dtype="bfloat16", compute_dtype="bfloat16",
                                 scan_layers=True),)
    c.data.update(prompts_per_step=1024, max_prompt_length=2048, shuffle=True)
    c.rollout.update(max_new_tokens=16384, temperature=1.0, top_k=0, top_p=1.0, samples_per_prompt=1)
    c.loss.update(name="sampled_token", aggregation="seq-mean-token-mean", reward_scale=1.0, chunk_size=1024)
    c.optimizer.update(learning_rate=1e-6, schedule="constant", weight_decay=0.01, grad_clip=1.0)
    c.effopd.update(enabled=True, max_candidates=5, trigger="pow2", val_max_prompts=128)
    c.eval.update(samples_per_prompt=32, temperature=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
