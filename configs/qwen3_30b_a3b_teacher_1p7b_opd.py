"""OPD of Qwen3-1.7B from the mixture-of-experts Qwen3-30B-A3B (the paper's OPD run otherwise).

Teacher Qwen/Qwen3-30B-A3B (HF `model_type` `qwen3_moe`: 48 sparse layers, 128 experts, top-8,
30.5B parameters, ~3.3B active per token; third_party/qwen_configs/qwen_moe_configs.json),
student Qwen/Qwen3-1.7B. Same vocabulary and chat template, so the teacher scores the student's
tokens directly. Loss, optimizer and schedule are the paper's standard OPD run
(configs/qwen3_1p7b_opd_effopd.py: lr 1e-6, 1024 prompts per step, EffOPD on).

Devices: every device on `fsdp` (mesh data=1, fsdp=-1). The teacher's 128 experts are split over
fsdp (expert parallelism shares the fsdp axis: 16 whole experts per device on 8 devices, so the
fsdp size must divide 128); its other weights and the student are ZeRO-3 sharded as usual. The
teacher is held in bfloat16 (61 GB in all, ~7.6 GB per device on 8) and scanned over its layers.

Model and data paths are the user's: set them on the command line, e.g.
    python -m effopd_jax.train --config=configs/qwen3_30b_a3b_teacher_1p7b_opd.py --workdir=gs://bucket/run \\
      --config.student.path=/ckpt/Qwen3-1.7B '--config.teachers[0].path=/ckpt/Qwen3-30B-A3B' \\
      --config.data.train_files='("/data/DeepMath-103K/train_filtered_level6.parquet",)' \\
      --config.data.eval_files='("/data/aime24.parquet","/data/aime25.parquet")' \\
      --config.effopd.val_files='("/data/effopd_val.parquet",)'

Memory (README.md#memory-plan), with this file as it is:
    python -m effopd_jax.plan --config=configs/qwen3_30b_a3b_teacher_1p7b_opd.py --topology=v5p:4x4x4
Changed to fit v5p:4x4x4, as the paper's config (configs/qwen3_1p7b_opd_effopd.py): the continuous
rollout engine with 64 slots and `micro_batch_size=64` (one row per chip per micro-batch of
scoring and update), with the blockwise attention (the default): every program fits, the largest
teacher scoring at 11.57 GiB per chip (update 7.78, rollout 7.48; README.md#memory-plan).
Other slices set slots and micro-batches that are multiples of their device count.
"""

import os

from effopd_jax.config import load_config_file, teacher_config


def get_config():
    # The paper's OPD run (student, data, loss, optimizer, EffOPD, slots and micro-batches) ...
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_1p7b_opd_effopd.py"))
    # ... with the mixture-of-experts teacher; the memory plan reads its shapes from the bundled configs.
    c.teachers = (teacher_config(name="qwen3_30b_a3b", path="", hf_name="Qwen/Qwen3-30B-A3B",
                                 param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True),)
    return c
