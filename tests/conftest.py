"""Shared test set-up.

Eight virtual CPU devices are requested before JAX initialises so the sharding tests can build
a (data=2, fsdp=2, tensor=2) mesh; unsharded tests still run on device 0.

Layout: ``tests/unit`` (one module or seam at a time, against independent references) and
``tests/integration`` (the trainer, its command line, the demo, the offline analysis, the wheel).
The shared helpers (``helpers_*.py``) sit here and this folder goes on ``sys.path``; the
repository root goes on it too, so tests can import the runnable examples (``examples.demo``)
and each other as ``tests.<...>`` (the trainer's config files in subprocesses do).
"""
import os
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
if REPO_ROOT not in sys.path:  # appended: which effopd_jax the tests import stays as before
    sys.path.append(REPO_ROOT)

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Share compiled programs between tests (and between the processes some tests start): the
# trainer tests build several identical runs, and compiling dominates their time on CPU.
_CACHE_DIR = os.environ.setdefault(
    "EFFOPD_TEST_XLA_CACHE", os.path.join(REPO_ROOT, ".cache", "xla")
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)  # inherited by subprocesses
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
