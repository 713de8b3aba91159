"""OPD with EffOPD on Qwen3.5: student Qwen/Qwen3.5-0.8B, teacher Qwen/Qwen3.5-9B.

The paper's standard recipe (`qwen3_1p7b_opd_effopd.py`: sampled-token reverse-KL loss, lr 1e-6,
AdamW (0.9, 0.999, wd 0.01), clip 1.0, T = 1 rollouts, EffOPD at steps 1, 2, 4, 8, ...) on the
hybrid Gated DeltaNet + gated-attention family (effopd_jax/models/qwen3_5.py). Both models are
the published multimodal checkpoints (`Qwen3_5ForConditionalGeneration`): only the language
model is loaded; the vision tower and the MTP head are left untouched, reported in one log line,
and copied unchanged into the exported student (`WORKDIR/hf`), which `transformers` loads as the
class it came from. The two share the 248,320-token vocabulary and chat template. Qwen3.6
checkpoints have the same `model_type` and load the same way.

Architecture facts (third_party/qwen_configs/qwen3_5_configs.json): 0.8B = hidden 1024, 24 layers
(18 Gated DeltaNet, 6 gated attention), tied embeddings; 9B = hidden 4096, 32 layers (24 + 8),
untied. EffOPD extrapolates the attention, linear-attention (conv included) and MLP weights and
their norms, not A_log / dt_bias (docs/effopd_rule.md#qwen35-hybrids).

Memory (README.md#memory-plan): the models are named by `hf_name`, so the plan runs on this
file as it is:
    python -m effopd_jax.plan --config=configs/qwen3p5_0p8b_from_9b_opd_effopd.py --topology=v5p:4x4x4
Shipped with `micro_batch_size=64` (one row per v5p:4x4x4 chip per micro-batch of teacher
scoring and the update, as the Qwen3 configs); the rollout stays on the static engine (the
continuous engine needs a paged cache, which this family does not have yet) and still fits,
because only 6 of 24 layers keep KV. Peak GiB per v5p chip (XLA:TPU compiled on this CPU
machine, 2026-11-29; table in the README): optimizer_init 0.42, rollout 31.52 (all 1,024 rows;
the largest buffer is the prefill's dense attention scores, 18 GiB), teacher_scoring 5.78,
update 20.67, effopd_candidate 0.51, effopd_validation_rollout 31.57, eval_rollout 31.52: every
program fits (95 GiB). Why the hybrid is cheap to roll out: only the 6 gated attention layers of
24 keep KV (2 heads x 256, bfloat16: 12 KiB per position, 0.23 GB per row of 18,432 positions,
~3.6 GB per chip for 1,024 rows over 64 chips); the 18 linear layers keep a fixed float32 state
(18 x 16 x 128 x 128 x 4 B = 19 MB per row) whatever the length.

Model and data paths are the user's: set them on the command line, e.g.
    python -m effopd_jax.train --config=configs/qwen3p5_0p8b_from_9b_opd_effopd.py --workdir=gs://b/run \
      --config.student.path=/ckpt/Qwen3.5-0.8B '--config.teachers[0].path=/ckpt/Qwen3.5-9B' \
      --config.data.train_files='("/data/DeepMath-103K/train_filtered_level6.parquet",)' \
      --config.data.eval_files='("/data/aime24.parquet","/data/aime25.parquet")' \
      --config.effopd.val_files='("/data/effopd_val.parquet",)'
"""

from effopd_jax.config import default_config, teacher_config


def get_config():
    c = default_config()
    c.seed = 42
    c.total_steps = 300
    c.checkpoint_every = 50
    c.eval_every = 10
    c.student.update(path="", hf_name="Qwen/Qwen3.5-0.8B", param_dtype="float32", compute_dtype="bfloat16", scan_layers=True, remat="full")
    c.teachers = (teacher_config(path="", hf_name="Qwen/Qwen3.5-9B", param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True),)
    c.data.update(prompts_per_step=1024, max_prompt_length=2048, shuffle=True)
    c.rollout.update(max_new_tokens=16384, temperature=1.0, top_k=0, top_p=1.0, samples_per_prompt=1)
    c.loss.update(name="sampled_token", aggregation="seq-mean-token-mean", reward_scale=1.0, chunk_size=1024)
    c.optimizer.update(learning_rate=1e-6, schedule="constant", weight_decay=0.01, grad_clip=1.0)
    c.effopd.update(enabled=True, max_candidates=5, trigger="pow2", val_max_prompts=128)
    c.eval.update(samples_per_prompt=32, temperature=1.0)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    # One row per v5p:4x4x4 chip per micro-batch of teacher scoring and the update (see the docstring).
    c.micro_batch_size = 64
    return c
