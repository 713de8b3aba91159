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
Changed to fit (measured by the plan on v5p:4x4x4, per chip): the continuous rollout engine with
64 slots (`rollout.engine="continuous"`, `rollout.slots=64`: KV memory follows the slots, not the
1,024 rows; `rollout_step` 6.71 GiB, against >= 133 GiB for the static engine's dense cache),
`micro_batch_size=64` (one row per chip per micro-batch; teacher scoring and the update accumulate
16 micro-batches in one program: 2.53 and 7.01 GiB, against >= 660 and >= 544 GiB with the whole
step at once) and the blockwise attention (`attention="auto"`, the default: no [heads, seq, seq]
scores). Slots and micro-batches are multiples of the batch shards (here every device), so other
slices set their own: v5e:16x16 `--config.rollout.slots=256 --config.micro_batch_size=256`
(rollout 4.57, scoring 2.16, update 6.28 GiB per chip of 16); 8xH100-80GB
`--config.rollout.slots=32 --config.micro_batch_size=8` (XLA:CPU estimate: rollout 45.72, scoring
9.15, update 16.09 GiB per GPU of 59.7 usable).
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
    # Changed to fit (see the docstring): slots over a paged KV cache, and one row per v5p:4x4x4 chip
    # per micro-batch of scoring and update.
    c.rollout.update(engine="continuous", slots=64)
    c.micro_batch_size = 64
    return c
