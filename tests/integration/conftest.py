"""Fixtures shared by the trainer's integration tests.

Several tests compare a run against the plain one (configs/tiny_cpu.py for 3 steps on one
device, ``test_train.small_config()``): sharded, micro-batched, packed, resumed, and with the
continuous engine. That reference run is made once per session here.
"""

from __future__ import annotations

import jax
import pytest

from tests.integration.test_train import run, small_config


@pytest.fixture(scope="session")
def whole_step_records(tmp_path_factory) -> list[dict]:
    """metrics.jsonl train records of ``small_config()`` on one device (3 steps)."""
    return run(small_config(), tmp_path_factory.mktemp("whole_step_run"), devices=jax.devices()[:1])
