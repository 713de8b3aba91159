"""Preemption, crash consistency, exact resume and guarded numerics of the trainer.

The run under test is ``python -m effopd_jax.train`` itself (a subprocess, one CPU device) on
configs/tiny_cpu.py's models: real Qwen3 vocabulary, GSM8K prompts, EffOPD searches at steps
1, 2, 4, evaluations at steps 3 and 6 and foresight-monitor passes at 2, 4, 6, so "same
numbers" covers the data order, the rng, the EffOPD anchor and counter, evaluation and the
monitor's subspace-overlap reference. Compiled programs come from the persistent XLA cache
(tests/conftest.py), so each extra process costs mostly its start-up.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effopd_jax import checkpoint as checkpoint_lib
from effopd_jax import config as config_lib
from effopd_jax import models, preemption, train
from effopd_jax.metrics import MetricsWriter, read_metrics
from tests.helpers_tiny import GSM8K_FILE
from tests.integration.test_train import REPO, small_config, tiny_cpu_config

TOTAL_STEPS = 6
# Wall-clock fields differ between any two runs; everything else must be identical.
TIMING_SUFFIXES = ("seconds", "per_second")


def _run_overrides(**extra):
    overrides = {
        "total_steps": TOTAL_STEPS,
        "checkpoint_every": 1,
        "keep_checkpoints": 2,
        "effopd.enabled": True,
        "effopd.val_files": (GSM8K_FILE,),
        "effopd.val_max_prompts": 8,
        "data.eval_files": (GSM8K_FILE,),
        "data.max_eval_prompts": 8,
        "eval_every": 3,
        "monitor.every": 2,
        "mesh.data": 1,
    }
    overrides.update(extra)
    return overrides


def _without_effopd_and_eval() -> dict:
    """Overrides that turn EffOPD and evaluation off (their settings back at the defaults)."""
    defaults = config_lib.default_config()
    return {"effopd.enabled": False, "effopd.val_files": (), "effopd.val_max_prompts": defaults.effopd.val_max_prompts,
            "data.eval_files": (), "data.max_eval_prompts": defaults.data.max_eval_prompts,
            "eval_every": defaults.eval_every}


def _config_file(tmp_path, **extra) -> str:
    path = tmp_path / "config.py"
    path.write_text(
        "from tests.integration.test_train import small_config\n"
        f"def get_config():\n    return small_config(**{_run_overrides(**extra)!r})\n"
    )
    return str(path)


def _start(config_file: str, workdir, **env_extra: str) -> subprocess.Popen:
    """Starts the CLI; its output goes to files (a pipe nobody reads would stall the run once
    the kernel's pipe buffer fills with log lines)."""
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1", **env_extra)
    logs = tempfile.mkdtemp(prefix="cli-", dir=os.path.dirname(os.path.abspath(workdir)))
    with open(os.path.join(logs, "out"), "w") as out, open(os.path.join(logs, "err"), "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "effopd_jax.train", f"--config={config_file}", f"--workdir={workdir}"],
            cwd=REPO, env=env, stdout=out, stderr=err, text=True,
        )
    proc.log_dir = logs
    return proc


def _output(proc: subprocess.Popen) -> tuple[str, str]:
    with open(os.path.join(proc.log_dir, "out")) as out, open(os.path.join(proc.log_dir, "err")) as err:
        return out.read(), err.read()


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    proc.wait(timeout=timeout)
    return (proc.returncode, *_output(proc))


def _metric_lines(workdir) -> list[bytes]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return f.read().splitlines(keepends=True)


def _completed_steps(workdir) -> int:
    """Train records fully written so far (a torn last line does not count)."""
    return sum(1 for line in _metric_lines(workdir) if line.endswith(b"\n") and b'"kind"' not in line)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.02,
              *, may_finish: bool = False) -> bool:
    """Polls until ``predicate()``; False if the run finished first (an error unless ``may_finish``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            if may_finish and proc.returncode == 0:
                return False
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the kill point: {_output(proc)[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(poll)
    return True


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith(TIMING_SUFFIXES)} for r in records]


def _assert_same_run(reference_dir, workdir) -> None:
    expected, actual = read_metrics(str(reference_dir)), read_metrics(str(workdir))
    train_steps = [r["step"] for r in actual if r.get("kind") != "eval"]
    assert train_steps == list(range(1, TOTAL_STEPS + 1)), train_steps  # one line per step
    assert [(r["step"], r.get("kind")) for r in actual] == [(r["step"], r.get("kind")) for r in expected]
    # Same compiled programs on the same inputs: identical, not merely close.
    assert _comparable(actual) == _comparable(expected)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the numbers every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    config_file = _config_file(tmp)
    rc, _, err = _finish(_start(config_file, tmp / "run"))
    assert rc == 0, err[-3000:]
    records = read_metrics(str(tmp / "run"))
    searched = [r["step"] for r in records if r.get("effopd/searched")]
    assert searched == [1, 2, 4]
    assert [r["step"] for r in records if r.get("kind") == "eval"] == [0, 3, 6]
    # The foresight monitor compares each pass with the previous one (from step 4 on).
    overlap = [r["step"] for r in records if "monitor/mean/overlap_left" in r]
    assert overlap == [4, 6]
    return tmp / "run"


def test_sigterm_checkpoints_exits_zero_and_resumes_to_the_same_numbers(reference, tmp_path):
    config_file = _config_file(tmp_path, checkpoint_every=4)  # the signal's step is not a multiple
    workdir = tmp_path / "run"
    proc = _start(config_file, workdir)
    _wait_for(lambda: _completed_steps(workdir) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] is True
    stopped_at = summary["step"]
    assert 1 <= stopped_at < TOTAL_STEPS
    assert checkpoint_lib.RunCheckpointer(str(workdir / "checkpoints")).latest_step() == stopped_at
    assert _completed_steps(workdir) == stopped_at
    assert "received SIGTERM" in out + err

    rc, _, err = _finish(_start(config_file, workdir))
    assert rc == 0, err[-3000:]
    _assert_same_run(reference, workdir)


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """Multi-host: the signal reaches the hosts at different times (here: only one of them)."""
    config_file = _config_file(
        tmp_path, checkpoint_every=4, **_without_effopd_and_eval(), **{"mesh.data": 2, "monitor.every": 0}
    )
    workdir = tmp_path / "run"
    port = 24456 + os.getpid() % 1000
    procs = [
        _start(config_file, workdir, EFFOPD_COORDINATOR=f"127.0.0.1:{port}", EFFOPD_NUM_PROCESSES="2",
               EFFOPD_PROCESS_ID=str(i))
        for i in range(2)
    ]
    _wait_for(lambda: _completed_steps(workdir) >= 1, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    results = [_finish(p) for p in procs]
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    summary = json.loads(results[0][1].strip().splitlines()[-1])  # process 0 prints the summary
    assert summary["preempted"] is True and summary["step"] < TOTAL_STEPS
    assert checkpoint_lib.RunCheckpointer(str(workdir / "checkpoints")).latest_step() == summary["step"]
    assert "received SIGTERM" in results[1][1] + results[1][2]


def test_sigkill_at_random_points_and_mid_save_always_resumes_to_the_same_numbers(reference, tmp_path):
    """Repeated SIGKILLs (mid-step at random times, and inside a checkpoint save) on one run."""
    config_file = _config_file(tmp_path)
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    rng = random.Random(0)
    kills = []

    def saving() -> bool:  # orbax writes a step into a temporary directory, renamed when complete
        return checkpoints.exists() and any("tmp" in name for name in os.listdir(checkpoints))

    # Each trial restarts the same command on the same workdir and kills it again.
    for trial in ("mid-step", "mid-save", "mid-step", "mid-save"):
        proc = _start(config_file, workdir)
        done = _completed_steps(workdir)
        if trial == "mid-save":
            # Saves of this tiny state last tens of milliseconds; if polling misses every one of
            # them the run simply completes, which the final comparison below still checks.
            if not _wait_for(lambda: _completed_steps(workdir) > done and saving(), proc, poll=0.002,
                             may_finish=True):
                kills.append(("mid-save missed: the run completed", _completed_steps(workdir), None))
                break
        else:
            _wait_for(lambda: _completed_steps(workdir) > done, proc)
            time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        kills.append((trial, _completed_steps(workdir), sorted(os.listdir(checkpoints)) if checkpoints.exists() else None))
        latest = checkpoint_lib.RunCheckpointer(str(checkpoints)).latest_step()
        assert latest is not None and latest <= _completed_steps(workdir), (kills, latest)
        if _completed_steps(workdir) >= TOTAL_STEPS - 1:
            break
    assert len(kills) >= 3 and any(k[0] == "mid-save" for k in kills), kills
    rc, _, err = _finish(_start(config_file, workdir))
    assert rc == 0, (kills, err[-3000:])
    _assert_same_run(reference, workdir)


def test_nonfinite_teacher_stops_the_cli_with_exit_code_3_and_a_clear_message(tmp_path):
    """A teacher checkpoint with NaN weights: every update is skipped; after N the run stops."""
    teacher = tiny_cpu_config().teachers[0]
    poisoned = str(tmp_path / "nan_teacher")
    config = models.config_from_hf(teacher.path, param_dtype="float32")
    params = models.init_params(config, jax.random.key(0))
    models.save_hf(config, jax.tree.map(lambda x: np.full_like(np.asarray(x), np.nan), params), poisoned)
    config_file = _config_file(
        tmp_path, **_without_effopd_and_eval(),
        **{"teachers[0].path": poisoned, "teachers[0].init": "checkpoint", "teachers[0].init_seed": 0,
           "max_consecutive_skips": 2, "total_steps": 4}
    )
    rc, _, err = _finish(_start(config_file, tmp_path / "run"))
    assert rc == train.EXIT_NONFINITE, err[-3000:]
    assert "2 consecutive updates had a non-finite loss or gradient" in err
    assert "Traceback" not in err
    records = read_metrics(str(tmp_path / "run"))
    assert [(r["step"], r["update_skipped"], r["skipped_updates"]) for r in records] == [(1, True, 1), (2, True, 2)]


def test_injected_nan_gradient_is_skipped_counted_and_n_in_a_row_stop_with_a_good_checkpoint(tmp_path):
    """NaN teacher log-probs at chosen steps make the loss and every gradient NaN."""

    def poisoned_trainer(config, workdir, nan_steps):
        trainer = train.Trainer(config, str(workdir), devices=jax.devices()[:1], log=lambda *a, **k: None)
        score = trainer.teacher.score_with_stats

        def score_with_nan(rollout, batch, **kwargs):
            batch, stats = score(rollout, batch, **kwargs)
            if int(trainer.state.step) + 1 in nan_steps:
                batch = batch._replace(teacher_logprobs=batch.teacher_logprobs * jnp.nan)
            return batch, stats

        trainer.teacher.score_with_stats = score_with_nan
        return trainer

    overrides = {"total_steps": 4, "max_consecutive_skips": 2, "keep_checkpoints": 4}

    # One NaN step: skipped, counted, params untouched; the run goes on.
    trainer = poisoned_trainer(small_config(**overrides), tmp_path / "one", nan_steps={2})
    try:
        trainer.run()
        manager = trainer.checkpointer
        after_1 = manager.restore(1, checkpoint_lib.abstract_like(trainer.state))[0]
        after_2 = manager.restore(2, checkpoint_lib.abstract_like(trainer.state))[0]
    finally:
        trainer.close()
    records = [r for r in read_metrics(str(tmp_path / "one")) if r.get("kind") != "eval"]
    assert [r["update_skipped"] for r in records] == [False, True, False, False]
    assert [r["skipped_updates"] for r in records] == [0, 1, 1, 1]
    assert records[1]["loss"] == records[1]["grad_norm"] == "nan"  # JSON has no NaN: kept as text
    for a, b in zip(jax.tree.leaves(after_1.trainable_params), jax.tree.leaves(after_2.trainable_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(after_1.opt_state), jax.tree.leaves(after_2.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(after_2.step) == 2 and int(after_2.skipped_updates) == 1

    # Two in a row (the limit): the run stops with a clear error; the checkpoint of step 1 is the
    # last one, and it holds the good params.
    trainer = poisoned_trainer(small_config(**overrides), tmp_path / "two", nan_steps={2, 3})
    try:
        with pytest.raises(train.NonFiniteUpdatesError, match="2 consecutive updates.*step 3"):
            trainer.run()
        latest = trainer.checkpointer.latest_step()
        restored = trainer.checkpointer.restore(latest, checkpoint_lib.abstract_like(trainer.state))[0]
    finally:
        trainer.close()
    assert latest == 2  # step 2 was skipped: its checkpoint equals step 1's params
    for a, b in zip(jax.tree.leaves(after_1.trainable_params), jax.tree.leaves(restored.trainable_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in read_metrics(str(tmp_path / "two"))] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Pieces


def test_metrics_writer_drops_a_torn_line_and_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 5)]
    path.write_text("".join(lines) + '{"step": 5, "lo')  # killed inside the last write
    MetricsWriter(str(tmp_path), resume_step=3).close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    path.write_text("".join(lines))
    MetricsWriter(str(tmp_path), resume_step=None).close()  # a fresh run: nothing is valid
    assert read_metrics(str(tmp_path)) == []


def test_preemption_guard_sets_the_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard(60.0, log=lambda *a: None) as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not guard.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.should_stop() and guard.received == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is before  # a second signal acts at once
    assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_guard_exits_with_code_1_when_the_grace_time_runs_out(tmp_path):
    script = (
        "import os, signal, time\n"
        "from effopd_jax.preemption import PreemptionGuard\n"
        "with PreemptionGuard(0.5, log=lambda *a: print(*a, flush=True)):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)  # a step that cannot finish in time\n"
    )
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == preemption.GRACE_EXCEEDED_EXIT_CODE
    assert time.monotonic() - t0 < 25
    assert "still running 0.5 s after SIGTERM" in result.stderr


def test_preemption_guard_refuses_bad_grace():
    with pytest.raises(ValueError, match="grace_seconds"):
        preemption.PreemptionGuard(0.0)
