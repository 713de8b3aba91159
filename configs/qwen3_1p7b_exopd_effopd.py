"""The paper's G-OPD / ExOPD run (lambda = 1.25, lr 1e-5) with EffOPD on (docs/paper_runs.md#run-table,
`run_qwen3-4b-g-opd.sh:82-146`).

Same as `qwen3_1p7b_opd_effopd.py` except the reward: A = lambda (T - B) - (s - B) with pi_B the
initial student (Qwen3-1.7B). Unlike the authors' code, pi_B stays fixed while EffOPD moves its
anchor (docs/effopd_rule.md#interaction-with-g-opd).

Memory: as `qwen3_1p7b_opd_effopd.py`, plus pi_B's scoring (the initial student, float32 params),
>= 335 GiB per chip on v5p:4x4x4 with today's programs (README.md#memory-plan).
"""

import importlib.util
import os


def _opd_config():
    # Loaded by path: config files are run by path (config_flags), not imported as a package.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_1p7b_opd_effopd.py")
    spec = importlib.util.spec_from_file_location("qwen3_1p7b_opd_effopd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _opd_config()
    c.loss.reward_scale = 1.25
    c.loss.base_path = ""  # "" = the initial student
    c.optimizer.learning_rate = 1e-5
    return c
