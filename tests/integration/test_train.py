"""End-to-end tests of the OPD trainer on CPU (tiny random Qwen3 models, real Qwen3 tokenizer).

The models use Qwen3's real 151,936-token vocabulary and the prompts are the bundled GSM8K
problems through the official Qwen3 chat template, so these runs also cover the real-vocabulary
path. Compiled programs are shared between runs through JAX's persistent compilation cache
(tests/conftest.py), which keeps the resume and sharding comparisons affordable.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from effopd_jax import config as config_lib
from effopd_jax import train
from effopd_jax.metrics import read_metrics
from effopd_jax.testing import tiny_qwen3_config
from tests.helpers_tiny import GSM8K_FILE, REPO_ROOT

REPO = REPO_ROOT


def tiny_cpu_config():
    """``configs/tiny_cpu.py``'s own ``get_config()`` (randomly initialised tiny Qwen3 models)."""
    return config_lib.load_config_file(os.path.join(REPO, "configs", "tiny_cpu.py"))


def set_field(config, key: str, value) -> None:
    """``config[key] = value`` for a dotted key that may index a tuple: ``"teachers[0].path"``."""
    target = config
    *parents, leaf = key.split(".")
    for name in parents:
        if name.endswith("]"):
            name, index = name[:-1].split("[")
            target = target[name][int(index)]
        else:
            target = target[name]
    target[leaf] = value


def small_config(**overrides):
    """configs/tiny_cpu.py for 3 steps, with EffOPD and evaluation off unless asked."""
    c = tiny_cpu_config()
    defaults = config_lib.default_config()
    c.total_steps = 3
    c.checkpoint_every = 1
    c.export_hf = False
    c.effopd = defaults.effopd  # off, and none of its settings changed (the schema refuses that)
    c.data.eval_files = ()
    c.data.max_eval_prompts = defaults.data.max_eval_prompts
    for key, value in overrides.items():
        set_field(c, key, value)
    return c


def run(config, workdir, devices=None):
    trainer = train.Trainer(config, str(workdir), devices=devices, log=lambda *a, **k: None)
    try:
        trainer.run()
    finally:
        trainer.close()
    return [r for r in read_metrics(str(workdir)) if r.get("kind") != "eval"]


def test_tiny_cpu_three_steps_end_to_end_with_effopd_and_eval(tmp_path):
    """configs/tiny_cpu.py for 3 steps: real Qwen3 vocabulary and chat template, GSM8K prompts."""
    config = small_config(
        **{
            "effopd.enabled": True,
            "effopd.val_files": (GSM8K_FILE,),
            "effopd.val_max_prompts": 8,
            "data.eval_files": (GSM8K_FILE,),
            "data.max_eval_prompts": 8,
            "export_hf": True,
            "monitor.every": 2,
        },
    )
    records = run(config, tmp_path, devices=jax.devices()[:1])
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("loss", "reverse_kl", "grad_norm", "response_length", "tokens_per_second",
                    "rollout_seconds", "teacher_seconds", "update_seconds", "learning_rate"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r[key])
        assert 0 < r["response_length"] <= 24
        # Sampled-token loss value: -mean(A) with A = T - s (seq-mean-token-mean), i.e. the sampled KL.
        assert r["loss"] == pytest.approx(r["reverse_kl"], rel=1e-4, abs=1e-6)
    # EffOPD searched at updates 1 and 2 (powers of two), not at 3.
    assert [bool(r.get("effopd/searched")) for r in records] == [True, True, False]
    assert all(r["effopd/accepted_multiplier"] in (1.0, 3.0, 5.0, 7.0, 9.0, 11.0) for r in records[:2])
    # The live foresight monitor ran at step 2 only; the update's module shares sum to 1.
    assert "monitor/total/rel_update" in records[1] and "monitor/total/rel_update" not in records[0]
    shares = [v for k, v in records[1].items() if k.startswith("monitor/alloc/")]
    assert len(shares) == 7 and sum(shares) == pytest.approx(1.0, abs=1e-5)
    evals = [r for r in read_metrics(str(tmp_path)) if r.get("kind") == "eval"]
    assert evals and 0.0 <= evals[-1]["eval/mean_at_n"] <= 1.0
    # The exported student loads through transformers' config and our loader.
    assert os.path.exists(tmp_path / "hf" / "config.json")
    assert os.path.exists(tmp_path / "hf" / "tokenizer.json")


def test_resume_matches_uninterrupted(tmp_path, whole_step_records):
    run(small_config(total_steps=2), tmp_path / "cut", devices=jax.devices()[:1])
    resumed = run(small_config(), tmp_path / "cut", devices=jax.devices()[:1])
    assert [r["step"] for r in resumed] == [1, 2, 3]  # one line per step, none duplicated
    for a, b in zip(whole_step_records[2:], resumed[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["response_length"] == b["response_length"]


def test_one_device_equals_eight_devices(tmp_path, whole_step_records):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    one = whole_step_records
    eight = run(
        small_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), tmp_path / "eight"
    )
    for a, b in zip(one, eight):
        assert a["response_length"] == b["response_length"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def _cli(args, env_extra=None, timeout=600):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "effopd_jax.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def _write_config(path, **overrides):
    """A config file for the CLI that builds small_config()."""
    path.write_text(
        "from tests.integration.test_train import small_config\n"
        f"def get_config():\n    return small_config(**{overrides!r})\n"
    )
    return str(path)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, whole_step_records):
    """2 processes x 4 CPU devices (loopback coordinator, gloo), the batch over all 8, == the
    single-process run (one device, whose equality with 8 devices in one process is
    test_one_device_equals_eight_devices)."""
    config_file = _write_config(tmp_path / "cfg.py", total_steps=2, **{"mesh.data": 8})
    port = 23456 + os.getpid() % 1000
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "effopd_jax.train", f"--config={config_file}", f"--workdir={tmp_path / 'multi'}"],
            cwd=REPO,
            env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=REPO,
                     EFFOPD_COORDINATOR=f"127.0.0.1:{port}", EFFOPD_NUM_PROCESSES="2", EFFOPD_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    a = whole_step_records[:2]
    b = read_metrics(str(tmp_path / "multi"))
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra["response_length"] == rb["response_length"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input is refused before anything compiles, with a message naming the field.


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.train_files": ("/nonexistent/train.jsonl",)}, "config.data.train_files"),
        ({"teachers[0].path": "/nonexistent/teacher"}, "config.teachers\\[0\\].path"),
        ({"mesh.data": 3}, "config.mesh"),
        ({"data.prompts_per_step": 3}, "not divisible by the mesh's batch shards"),
        ({"data.max_prompt_length": 4}, "longer than max_prompt_length=4"),
        ({"rollout.top_p": 1.5}, "config.rollout.top_p"),
        ({"optimizer.learning_rate": -1.0}, "config.optimizer.learning_rate"),
        ({"loss.name": "forward_kl"}, "config.loss.name"),
    ],
)
def test_bad_input_is_refused(tmp_path, overrides, message):
    config = small_config(**overrides)
    with pytest.raises(ValueError, match=message):
        train.Trainer(config, str(tmp_path), devices=jax.devices()[:4])


def test_teacher_with_smaller_vocabulary_is_refused(tmp_path):
    small_teacher = tmp_path / "small_teacher.json"
    small_teacher.write_text(json.dumps(tiny_qwen3_config(vocab_size=1000).to_hf()))
    config = small_config(**{"teachers[0].path": str(small_teacher)})
    with pytest.raises(ValueError, match="cannot score the student's tokens"):
        train.Trainer(config, str(tmp_path / "run"), devices=jax.devices()[:1])


def test_unknown_config_key_is_refused(tmp_path):
    config_file = _write_config(tmp_path / "cfg.py")
    result = _cli([f"--config={config_file}", f"--workdir={tmp_path / 'w'}", "--config.optimizer.learnig_rate=1"],
                  {"PYTHONPATH": REPO}, timeout=120)
    assert result.returncode != 0
    assert "learnig_rate" in result.stderr


def test_invalid_setting_is_one_line_and_exit_code_2(tmp_path):
    config_file = _write_config(tmp_path / "cfg.py")
    result = _cli([f"--config={config_file}", f"--workdir={tmp_path / 'w'}", "--config.lora.enabled=True",
                   "--config.lora.dropout=0.1"], {"PYTHONPATH": REPO}, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "effopd_jax.train: config.lora.dropout: must be 0, got 0.1: the OPD loss scores every sampled token under "
        "the student that sampled it, and dropout on the adapters' input would make that a random sub-policy"]
    assert not (tmp_path / "w").exists()
