"""The paper's G-OPD / ExOPD run (lambda = 1.25, lr 1e-5) with EffOPD on (docs/paper_runs.md#run-table,
`run_qwen3-4b-g-opd.sh:82-146`).

Same as `qwen3_1p7b_opd_effopd.py` except the reward: A = lambda (T - B) - (s - B) with pi_B the
initial student (Qwen3-1.7B). Unlike the authors' code, pi_B stays fixed while EffOPD moves its
anchor (docs/effopd_rule.md#interaction-with-g-opd).

Memory: as `qwen3_1p7b_opd_effopd.py` (whose continuous rollout engine with 64 slots,
`micro_batch_size=64` and blockwise attention it inherits, changed to fit v5p:4x4x4), plus pi_B's
scoring (the initial student, float32 params): on v5p:4x4x4 the plan measures pi_B's scoring
3.27 GiB and the update 7.11 GiB per chip (pi_B's scoring needed >= 335 GiB with the whole step at
once and dense attention; README.md#memory-plan).
"""

import os

from effopd_jax.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_1p7b_opd_effopd.py"))
    c.loss.reward_scale = 1.25
    c.loss.base_path = ""  # "" = the initial student
    c.optimizer.learning_rate = 1e-5
    return c
