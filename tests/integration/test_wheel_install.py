"""The library installs from a wheel and finds nothing through a repository checkout.

Builds a wheel of the project offline (``pip wheel --no-deps --no-build-isolation --no-index``,
this environment's setuptools), installs it with ``--no-deps`` into a fresh ``python -m venv``,
and runs the installed package from an unrelated directory. The new environment's dependencies
(jax, flax, transformers, ...) come from this environment's site-packages through
``PYTHONPATH``; Python does not process ``.pth`` files on ``PYTHONPATH``, so an editable install
of effopd_jax there (its ``__editable__`` finder) stays inactive and ``effopd_jax`` must resolve
to the wheel's copy inside the new venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile


from helpers_tiny import REPO_ROOT
# What the source tree holds next to the library: copied so the wheel build sees them, and
# must not end up in the wheel.
_NON_LIBRARY_DIRS = ("examples", "configs", "tests", "benchmarks")


def _run(cmd: list[str], *, cwd: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _copy_source_tree(dest: str) -> None:
    """The files a wheel build reads (plus the non-library folders), without caches or runs/."""
    os.makedirs(dest)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO_ROOT, name), dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("effopd_jax", *_NON_LIBRARY_DIRS):
        if os.path.isdir(os.path.join(REPO_ROOT, name)):
            shutil.copytree(os.path.join(REPO_ROOT, name), os.path.join(dest, name), ignore=ignore)


def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_checkout(tmp_path):
    src, wheels, venv, elsewhere = (str(tmp_path / d) for d in ("src", "wheels", "venv", "elsewhere"))
    os.makedirs(elsewhere)
    _copy_source_tree(src)  # builds in a copy: an in-tree build would leave build/ and *.egg-info behind

    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", wheels, src], cwd=elsewhere, env=_clean_env())
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (os.path.join(wheels, f) for f in os.listdir(wheels) if f.endswith(".whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    for module in ("effopd_jax/__init__.py", "effopd_jax/train.py", "effopd_jax/models/qwen.py",
                   "effopd_jax/testing/__init__.py", "effopd_jax/testing/checkpoints.py",
                   "effopd_jax/plan.py", "effopd_jax/published_configs.json"):
        assert module in names, f"{module} missing from the wheel"
    top_level = {n.split("/")[0] for n in names}
    assert not top_level & set(_NON_LIBRARY_DIRS), f"non-library folders in the wheel: {sorted(top_level)}"

    venv_ok = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=elsewhere, env=_clean_env())
    assert venv_ok.returncode == 0, venv_ok.stderr
    python = os.path.join(venv, "bin", "python")
    # pip runs against the new interpreter (--python), so it sees only the new venv's packages.
    install = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
                   cwd=elsewhere, env=_clean_env())
    assert install.returncode == 0, install.stdout + install.stderr

    # Dependencies from this environment's site-packages; .pth files there are not processed.
    deps = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    env = _clean_env(PYTHONPATH=deps, JAX_PLATFORMS="cpu")
    script = (
        "import os, sys\n"
        "import effopd_jax, effopd_jax.train, effopd_jax.testing\n"
        "from effopd_jax.testing import tiny_qwen3_config, write_random_checkpoint\n"
        "config = tiny_qwen3_config(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,\n"
        "                           head_dim=8, intermediate_size=32, eos_token_id=1, pad_token_id=0)\n"
        "path = write_random_checkpoint('ckpt', config, seed=0)\n"
        "assert os.path.exists(os.path.join(path, 'config.json')), os.listdir(path)\n"
        "import jax.numpy as jnp\n"
        "from effopd_jax import models\n"
        "loaded, params = models.load_hf(path, compute_dtype='float32')\n"
        "logits = models.forward(loaded, params, jnp.zeros((1, 3), jnp.int32))\n"
        "assert logits.shape == (1, 3, 64), logits.shape\n"
        "print(os.path.realpath(effopd_jax.__file__))\n"
        "print(any('editable' in name for name in sys.modules))\n"
    )
    imported = _run([python, "-c", script], cwd=elsewhere, env=env)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    module_file, editable_loaded = imported.stdout.split()[-2:]
    assert module_file.startswith(os.path.realpath(venv) + os.sep), module_file
    assert editable_loaded == "False"

    helped = _run([python, "-m", "effopd_jax.train", "--help"], cwd=elsewhere, env=env)
    assert helped.returncode == 0, helped.stdout + helped.stderr
    assert "Traceback" not in helped.stderr, helped.stderr
    assert "--config" in helped.stdout and "--workdir" in helped.stdout, helped.stdout
