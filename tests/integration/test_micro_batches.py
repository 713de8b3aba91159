"""The trainer with micro-batched scoring and updates, and with packed sequences: configs/tiny_cpu.py
for 3 steps gives the per-step losses of the whole-step run (real Qwen3 vocabulary and chat
template, GSM8K prompts of different lengths, responses ended by EOS or the cap)."""

from __future__ import annotations

import jax
import pytest

from tests.integration.test_train import run, small_config


def test_micro_batches_and_packing_reproduce_the_whole_step_losses(tmp_path, whole_step_records):
    devices = jax.devices()[:1]
    whole = whole_step_records
    micro = run(small_config(micro_batch_size=4), tmp_path / "micro", devices=devices)
    packed = run(small_config(micro_batch_size=2, pack_sequences=True), tmp_path / "packed", devices=devices)
    assert [r["step"] for r in micro] == [r["step"] for r in packed] == [1, 2, 3]
    for reference, a, b in zip(whole, micro, packed):
        for record in (a, b):
            assert record["response_length"] == reference["response_length"]
            for key in ("loss", "reverse_kl", "advantage_std", "is_weight_mean"):
                assert record[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
            assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-3)
        # 8 rows of at most 256 + 24 tokens: packing needs fewer than the 4 micro-batches of 2.
        assert 1 <= b["packed_micro_batches"] < 4 and 0 < b["packing_efficiency"] <= 1
