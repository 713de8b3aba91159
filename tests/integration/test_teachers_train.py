"""The trainer with several routed teachers, and with the live student as its own teacher under a
privileged prompt (configs/tiny_cpu_context_distill.py): per-teacher metrics at every step, and
exact resume after a crash (every non-timing field of every record identical to an
uninterrupted run, as tests/integration/test_reliability.py checks for one teacher).
"""

from __future__ import annotations

import collections
import json
import math
import os

import jax
import pytest

from effopd_jax import config as config_lib
from effopd_jax import data, train
from effopd_jax.config import teacher_config
from effopd_jax.metrics import read_metrics
from tests.helpers_tiny import GSM8K_FILE, QWEN3_TOKENIZER_DIR, REPO_ROOT
from tests.integration.test_reliability import TIMING_SUFFIXES
from tests.integration.test_train import small_config

STEPS = 3
TAGS = ("math", "code", "poetry")  # poetry: no teacher lists it, so it goes to routing.default_teacher


class Crash(Exception):
    """Stands for the process dying in the middle of a step."""


def _records(workdir) -> list[dict]:
    return [r for r in read_metrics(str(workdir)) if r.get("kind") != "eval"]


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith(TIMING_SUFFIXES)} for r in records]


def _run(config, workdir, *, crash_before_step: int | None = None) -> None:
    trainer = train.Trainer(config, str(workdir), devices=jax.devices()[:1], log=lambda *a, **k: None)
    if crash_before_step is not None:
        step_once = trainer.train_one_step

        def crashing_step():
            if int(trainer.state.step) + 1 == crash_before_step:
                raise Crash
            return step_once()

        trainer.train_one_step = crashing_step
    try:
        if crash_before_step is None:
            trainer.run()
        else:
            with pytest.raises(Crash):
                trainer.run()
    finally:
        trainer.close()


def _assert_resumes_exactly(config, tmp_path) -> list[dict]:
    """An uninterrupted run, and one that dies in step 2 and is restarted: the same records."""
    _run(config, tmp_path / "full")
    _run(config, tmp_path / "cut", crash_before_step=2)
    assert [r["step"] for r in _records(tmp_path / "cut")] == [1]
    _run(config, tmp_path / "cut")
    full, resumed = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert _comparable(resumed) == _comparable(full)
    return full


@pytest.fixture(scope="module")
def tagged_prompts(tmp_path_factory):
    """The first 30 GSM8K problems, tagged math, code, poetry, math, ... in turn."""
    path = tmp_path_factory.mktemp("prompts") / "tagged.jsonl"
    with open(GSM8K_FILE) as source, open(path, "w") as out:
        for index, line in zip(range(30), source):
            row = json.loads(line)
            row["data_source"] = TAGS[index % 3]
            out.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.slow
def test_two_routed_teachers_report_per_teacher_kl_and_resume_exactly(tmp_path, tagged_prompts):
    """Teacher A is a copy of the student (same architecture, seed and dtypes), B another model."""
    base = small_config(total_steps=STEPS)
    student = base.student
    a = teacher_config(name="A", path=student.path, init="random", init_seed=student.init_seed,
                       param_dtype="float32", compute_dtype="float32", data_sources=("math",), rows_per_forward=2)
    b = teacher_config(name="B", **{k: base.teachers[0][k] for k in ("path", "init", "init_seed", "param_dtype",
                                                                      "compute_dtype")}, data_sources=("code",))
    config = small_config(total_steps=STEPS, **{"data.train_files": (tagged_prompts,), "teachers": (a, b),
                                               "routing.default_teacher": "B"})
    records = _assert_resumes_exactly(config, tmp_path)

    # Rows routed by tag: the step's prompts, read back in the trainer's order.
    tokenizer = data.load_tokenizer(QWEN3_TOKENIZER_DIR)
    examples, _ = data.load_prompts(tagged_prompts, tokenizer, max_prompt_length=config.data.max_prompt_length)
    batches = data.train_iterator(examples, prompts_per_step=config.data.prompts_per_step, seed=config.seed,
                                  process_index=0, process_count=1)
    for record in records:
        tags = collections.Counter(next(batches).data_sources)
        assert record["routed_rows/A"] == tags["math"]
        assert record["routed_rows/B"] == tags["code"] + tags["poetry"]  # poetry: the default teacher
        for name in ("A", "B"):
            assert isinstance(record[f"reverse_kl/{name}"], float)
    # Step 1: A is the student itself, B is not.
    first = records[0]
    assert abs(first["reverse_kl/A"]) < 1e-6, first["reverse_kl/A"]
    assert abs(first["reverse_kl/B"]) > 1e-3
    # The batch's sampled reverse KL is the token-weighted mean of the two teachers'.
    assert min(first["reverse_kl/A"], first["reverse_kl/B"]) - 1e-6 <= first["reverse_kl"] \
        <= max(first["reverse_kl/A"], first["reverse_kl/B"]) + 1e-6


def _context_distill_config(**overrides):
    config = config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "tiny_cpu_context_distill.py"))
    config.total_steps = STEPS
    config.checkpoint_every = 1
    config.update(overrides)
    return config


@pytest.mark.slow
def test_live_student_with_the_reference_solution_in_context_runs_on_gsm8k_and_resumes_exactly(tmp_path):
    records = _assert_resumes_exactly(_context_distill_config(), tmp_path)
    for record in records:
        assert record["routed_rows/self"] == 8 and record["skipped_rows/self"] == 0
        assert math.isfinite(record["reverse_kl/self"])
        assert record["reverse_kl/self"] == pytest.approx(record["reverse_kl"], abs=1e-7)
    # The privileged prompt changes the teacher's view of the same tokens: the reverse KL is not 0.
    assert abs(records[0]["reverse_kl/self"]) > 1e-4


@pytest.mark.slow
def test_the_initial_student_as_teacher_equals_the_live_one_at_step_one_only(tmp_path):
    """A frozen copy of the initial weights: the same teacher as the live student before the
    first update, a different one after it (and the copy survives the donated update)."""
    live = _context_distill_config(total_steps=2)
    initial = _context_distill_config(total_steps=2)
    initial.teachers[0].model = "student_initial"
    _run(live, tmp_path / "live")
    _run(initial, tmp_path / "initial")
    (live_1, live_2), (initial_1, initial_2) = _records(tmp_path / "live"), _records(tmp_path / "initial")
    assert initial_1["reverse_kl/self"] == live_1["reverse_kl/self"]
    assert initial_1["loss"] == live_1["loss"]
    assert initial_2["reverse_kl/self"] != live_2["reverse_kl/self"]
