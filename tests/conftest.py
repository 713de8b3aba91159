"""Shared test set-up.

Eight virtual CPU devices are requested before JAX initialises so the sharding tests can build
a (data=2, fsdp=2, tensor=2) mesh; unsharded tests still run on device 0. The repository root
goes on ``sys.path`` so tests can import the runnable examples (``examples.demo``), which are not
part of the installed library.
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    "EFFOPD_TEST_XLA_CACHE", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "xla")
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)  # inherited by subprocesses
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
