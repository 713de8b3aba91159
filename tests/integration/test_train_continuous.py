"""The trainer with the continuous-batching rollout engine (configs/tiny_cpu.py, 3 steps, CPU).

Both engines draw a row's tokens from (the step's key, the row, the position), so a run with
`rollout.engine="continuous"` samples the same responses as the static engine's run and every
step's numbers agree; here with fewer slots (4) than rows per step (8), so slots are refilled.
"""

from __future__ import annotations

import jax
import pytest

from tests.integration.test_train import run, small_config


@pytest.mark.slow  # ~50 s of CPU with a cold compilation cache (the continuous programs at Qwen3's vocabulary)
def test_continuous_engine_run_equals_the_static_engine_run(tmp_path, whole_step_records):
    static = whole_step_records
    continuous = run(
        small_config(**{"rollout.engine": "continuous", "rollout.slots": 4, "rollout.page_size": 8,
                        "rollout.decode_steps": 8}),
        tmp_path / "continuous", devices=jax.devices()[:1])
    assert [r["step"] for r in continuous] == [1, 2, 3]
    for a, b in zip(static, continuous):
        assert a["response_length"] == b["response_length"]
        # Log-probs agree to float rounding (paged vs dense attention), so the losses to 1e-5.
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
