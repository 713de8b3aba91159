"""The config schema and what is derived from it: defaults, the reference, the command line.

Random hostile values are in ``tests/test_hostile_inputs.py``; here, the fixed promises.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from effopd_jax import config as config_lib
from effopd_jax.config_schema import Entries, Retired
from helpers_tiny import REPO_ROOT

REPO = REPO_ROOT


@pytest.fixture
def paths(tmp_path):
    """A model directory (config.json only) and a prompt file: what validation checks exists."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2+3?", "answer": "5"}\n')
    return str(model), str(prompts)


def _filled(model: str, prompts: str) -> ml_collections.ConfigDict:
    """default_config() with the fields that have no usable default filled in."""
    c = config_lib.default_config()
    c.student.path = model
    c.teachers[0].path = model
    c.data.train_files = (prompts,)
    return c


def _schema_names() -> set[str]:
    names = {field.name for field in config_lib.FIELDS}
    names |= {f"teachers[0].{field.name}" for field in config_lib.TEACHER_FIELDS}
    return names


def _config_names(node, prefix: str = "") -> set[str]:
    """Leaf names of a config, descending into groups the schema has (not into mapping values)."""
    groups = {field.name.rpartition(".")[0] for field in config_lib.FIELDS}
    names = set()
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and name in groups:
            names |= _config_names(value, f"{name}.")
        else:
            names.add(name)
            if name == "teachers":
                names |= {f"teachers[0].{k}" for k in value[0].keys()}
    return names


def test_default_config_validates_once_paths_are_filled(paths):
    config_lib.validate_config(_filled(*paths))


def test_every_schema_field_is_in_default_config_and_nothing_else():
    assert _config_names(config_lib.default_config()) == _schema_names()


def test_default_teachers_is_one_default_teacher():
    c = config_lib.default_config()
    assert c.teachers == (config_lib.teacher_config(name="teacher"),)
    assert [field.name for field in config_lib.FIELDS if isinstance(field.kind, Entries)] == ["teachers"]
    assert all(c.teacher[field.name.split(".")[1]] is None
               for field in config_lib.FIELDS if isinstance(field.kind, Retired))


def test_teacher_config_fills_defaults_and_refuses_unknown_settings():
    entry = config_lib.teacher_config(name="math", init="random", init_seed=3)
    assert (entry.name, entry.init, entry.init_seed, entry.param_dtype) == ("math", "random", 3, "bfloat16")
    with pytest.raises(TypeError, match="remat"):
        config_lib.teacher_config(remat="full")


def test_markdown_reference_matches_docs():
    with open(os.path.join(REPO, "docs", "config.md")) as f:
        written = f.read()
    assert written == config_lib.markdown_reference(), (
        "docs/config.md is stale: python -m effopd_jax.config --markdown > docs/config.md"
    )


def test_markdown_reference_lists_every_field():
    text = config_lib.markdown_reference()
    for field in config_lib.FIELDS:
        assert f"| `{field.name}` |" in text
    for field in config_lib.TEACHER_FIELDS:
        assert f"| `teachers[i].{field.name}` |" in text


def test_remat_choices_are_the_models():
    from effopd_jax.models.qwen import REMAT_POLICIES  # noqa: PLC0415  (jax; config.py avoids it)

    assert config_lib.REMAT_POLICIES == REMAT_POLICIES


def test_checking_a_config_imports_no_jax():
    code = "import sys, effopd_jax.config as c; c.default_config(); assert 'jax' not in sys.modules, 'jax'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": REPO})


@pytest.mark.parametrize("field", ["path", "param_dtype", "compute_dtype", "scan_layers", "tokenizer"])
def test_old_teacher_group_says_where_its_field_went(paths, field):
    c = _filled(*paths)
    c.teacher[field] = {"scan_layers": True}.get(field, "/somewhere")
    message = (
        f"config.teacher.{field}: config.teacher was replaced by config.teachers, a tuple of named teachers: "
        f"set config.teachers[0].{field} (on the command line --config.teachers[0].{field}=...)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        config_lib.validate_config(c)


def test_a_config_without_the_old_teacher_group_is_fine(paths):
    c = _filled(*paths)
    del c["teacher"]
    config_lib.validate_config(c)


def test_trigger_digit_string_becomes_the_int(paths):
    c = _filled(*paths)
    c.effopd.update(enabled=True, val_files=(paths[1],), trigger="4")  # the field's type is str
    config_lib.validate_config(c)
    assert c.effopd.trigger == 4 and type(c.effopd.trigger) is int


@pytest.mark.parametrize("init", ["checkpoint", "random"])
def test_a_config_json_file_is_a_model_path_only_for_random_init(paths, init):
    model, prompts = paths
    c = _filled(model, prompts)
    c.student.update(init=init, path=os.path.join(model, "config.json"))
    c.teachers[0].update(init=init, path=os.path.join(model, "config.json"))
    if init == "random":
        config_lib.validate_config(c)
    else:
        with pytest.raises(ValueError, match=r"^config\.student\.path: no such directory"):
            config_lib.validate_config(c)


_CLI = textwrap.dedent(
    """
    from absl import app, flags
    from ml_collections import config_flags

    from effopd_jax import config as config_lib

    config_flags.DEFINE_config_file("config", None, "config file")


    def main(argv):
        c = flags.FLAGS.config
        try:
            config_lib.validate_config(c)
        except ValueError as e:
            print("refused:", e)
        else:
            print("accepted:", repr(c.teachers[0].path), repr(c.teachers[0].init_seed), repr(c.effopd.trigger))


    app.run(main)
    """
)


def _cli(tmp_path, model: str, prompts: str, *overrides: str) -> str:
    """Runs a config through absl + config_flags (as the trainer's command line does)."""
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from effopd_jax.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        f"    c.student.path = {model!r}\n"
        f"    c.data.train_files = ({prompts!r},)\n"
        f"    c.effopd.val_files = ({prompts!r},)\n"
        "    return c\n"
    )
    script = tmp_path / "cli.py"
    script.write_text(_CLI)
    result = subprocess.run(
        [sys.executable, str(script), f"--config={config_file}", *overrides],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_command_line_overrides_reach_a_teacher_entry(tmp_path, paths):
    model, prompts = paths
    out = _cli(tmp_path, model, prompts, f"--config.teachers[0].path={model}", "--config.teachers[0].init=random",
               "--config.teachers[0].init_seed=7", "--config.effopd.enabled=True", "--config.effopd.trigger=4")
    assert out == f"accepted: {model!r} 7 4"


def test_command_line_override_of_the_old_teacher_group_meets_the_migration_message(tmp_path, paths):
    model, prompts = paths
    out = _cli(tmp_path, model, prompts, f"--config.teacher.path={model}")
    assert out.startswith("refused: config.teacher.path: config.teacher was replaced by config.teachers")


def _load_config_file(name: str) -> ml_collections.ConfigDict:
    return config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


def test_load_config_file_names_a_missing_file_and_a_file_without_get_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no experiment config file at"):
        config_lib.load_config_file(str(tmp_path / "absent.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(AttributeError, match="defines no get_config"):
        config_lib.load_config_file(str(tmp_path / "empty.py"))


@pytest.mark.parametrize("name", ["qwen3_1p7b_opd_effopd", "qwen3_1p7b_exopd_effopd",
                                  "qwen3_4b_multi_teacher_exopd", "qwen3_4b_context_distill"])
def test_paper_configs_validate_with_the_users_paths(paths, name):
    """The paths their docstring tells the user to give are all they miss."""
    model, prompts = paths
    c = _load_config_file(name)
    c.student.path = model
    for teacher in c.teachers:
        if teacher.model == "own":
            teacher.path = model
    c.data.train_files = c.data.eval_files = (prompts,)
    if c.effopd.enabled:
        c.effopd.val_files = (prompts,)
    config_lib.validate_config(c)


def _tree_listing(root: str) -> set[str]:
    """Every file below ``root``, hidden folders (.git, .venv, caches) left out."""
    listing = set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        listing.update(os.path.join(folder, f) for f in files)
    return listing


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")))
def test_config_files_are_pure(tmp_path, monkeypatch, name):
    """Building a shipped config reads nothing it would write: no file appears anywhere in the
    repository or the working directory, and the tiny smoke config validates as it is."""
    monkeypatch.chdir(tmp_path)
    before = _tree_listing(REPO)
    c = _load_config_file(name)
    assert _tree_listing(REPO) == before and not os.listdir(tmp_path)
    if name == "tiny_cpu":
        config_lib.validate_config(c)  # random-init models from configs/tiny/: nothing to prepare


# ---------------------------------------------------------------------------------------------
# Several teachers, the student as teacher, teachers' own prompts


def _two_teachers(model: str, prompts: str, **routing) -> ml_collections.ConfigDict:
    c = _filled(model, prompts)
    c.teachers = (config_lib.teacher_config(name="math", path=model, data_sources=("math",)),
                  config_lib.teacher_config(name="code", path=model, data_sources=("code",)))
    c.routing.update(routing)
    return c


def test_several_routed_teachers_validate(paths):
    config_lib.validate_config(_two_teachers(*paths))
    config_lib.validate_config(_two_teachers(*paths, default_teacher="code", key="extra_info.opd_teacher"))
    c = _two_teachers(*paths, mode="mixture")
    for teacher in c.teachers:
        teacher.data_sources = ()
    c.teachers[0].weight = 3.0
    config_lib.validate_config(c)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.teachers[1].update(data_sources=("math",)),
     "config.routing: the tag 'math' is listed by both 'math' and 'code'; a row has one teacher"),
    (lambda c: c.routing.update(default_teacher="poetry"),
     "config.routing.default_teacher: 'poetry' is not one of the teachers ['math', 'code']"),
    (lambda c: c.teachers[1].update(data_sources=()),
     "config.routing: teacher 'code' lists no data_sources and is not routing.default_teacher, so no row would reach it"),
    (lambda c: c.teachers[0].update(weight=2.0),
     "config.teachers[0].weight: only used with routing.mode='mixture' and several teachers; leave it 1.0"),
    (lambda c: c.routing.update(mode="mixture"),
     "config.teachers[0].data_sources: only used with routing.mode='data_source' and several teachers "
     "(routing.mode='mixture' scores every row); leave it ()"),
    (lambda c: c.loss.update(name="full_reverse_kl"),
     "config.teachers: 2 teachers need loss.name='sampled_token'"),
    (lambda c: c.update(teachers=(c.teachers[0],)),
     "config.teachers[0].data_sources: only used with routing.mode='data_source' and several teachers "
     "(one teacher scores every row); leave it ()"),
])
def test_routing_rules_refuse_with_the_field_named(paths, change, message):
    c = _two_teachers(*paths)
    change(c)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        config_lib.validate_config(c)


def test_routing_settings_are_refused_with_one_teacher(paths):
    c = _filled(*paths)
    c.routing.default_teacher = "teacher"
    with pytest.raises(ValueError, match=r"^config\.routing\.default_teacher: only used with more than 1 teachers"):
        config_lib.validate_config(c)


def test_the_student_as_teacher_has_no_path_and_a_context_needs_its_problem(paths):
    model, prompts = paths
    c = _filled(model, prompts)
    c.teachers = (config_lib.teacher_config(name="self", model="student_live",
                                            context_template=config_lib.DEFAULT_CONTEXT_TEMPLATE,
                                            missing_solution="raise", max_prompt_length=512),)
    config_lib.validate_config(c)
    c.teachers[0].path = model
    with pytest.raises(ValueError, match=r"^config\.teachers\[0\]\.path: only used with teachers\[0\]\.model='own' \(it is 'student_live'\)"):
        config_lib.validate_config(c)
    c.teachers[0].path = ""
    c.teachers[0].context_template = "Solution: {solution}"
    with pytest.raises(ValueError, match=r"^config\.teachers\[0\]\.context_template: must contain \{problem\}"):
        config_lib.validate_config(c)
    # No context: no solution to miss, and the teacher scores the student's own prompt ids.
    c.teachers[0].update(context_template="", missing_solution="skip")
    with pytest.raises(ValueError, match=r"^config\.teachers\[0\]\.max_prompt_length: only used with"):
        config_lib.validate_config(c)
    c.teachers[0].update(max_prompt_length=0, missing_solution="raise")
    with pytest.raises(ValueError, match=r"^config\.teachers\[0\]\.missing_solution: only used with"):
        config_lib.validate_config(c)
    own = _filled(model, prompts)
    own.teachers[0].path = ""
    with pytest.raises(ValueError, match=r"^config\.teachers\[0\]\.path: is required"):
        config_lib.validate_config(own)


def test_a_teacher_with_its_own_template_variables_has_its_own_prompt_length(paths):
    c = _filled(*paths)
    c.teachers[0].update(chat_template_kwargs={"enable_thinking": True}, max_prompt_length=300)
    config_lib.validate_config(c)
