"""The trainer's configuration schema: defaults and validation.

Experiment files in ``configs/`` call :func:`default_config` and override fields; the trainer
calls :func:`validate_config` before anything compiles, so a bad value is refused with a
message naming the field. Defaults follow the authors' runs (``../shared/effopd_spec.md`` §1.4,
§2): AdamW (0.9, 0.999), weight decay 0.01, eps 1e-8, global-norm clip 1.0, constant LR.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

LOSSES = ("sampled_token", "full_reverse_kl", "topk_reverse_kl")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
SCHEDULES = ("constant", "cosine", "linear")
# Integer settings become array sizes, loop bounds and int32 step counters on device.
MAX_INT = 2**31 - 1
DTYPES = ("float32", "bfloat16", "float16")
PROMPT_FILE_SUFFIXES = (".jsonl", ".parquet")
CHAT_TEMPLATE_KWARGS_TYPES = (ml_collections.ConfigDict, Mapping)


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with its default. See the README for what each does."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.eval_every = 0  # 0: only at the end
    c.log_every = 1
    c.export_hf = True  # write the final student as HF safetensors to WORKDIR/hf
    c.max_consecutive_skips = 10  # non-finite loss/grad skips in a row before the run stops

    # Models. `path` is an HF directory (config.json + safetensors). `init_from` (optional)
    # overrides the student's initial weights: an HF directory or an orbax params checkpoint.
    c.student = ml_collections.ConfigDict(
        dict(path="", param_dtype="float32", compute_dtype="bfloat16", scan_layers=False, remat="none")
    )
    c.teacher = ml_collections.ConfigDict(
        dict(path="", param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=False, tokenizer="")
    )
    c.init_from = ""
    c.tokenizer = ""  # default: the student's path

    c.data = ml_collections.ConfigDict(
        dict(
            train_files=(),
            eval_files=(),
            prompts_per_step=8,
            max_prompt_length=256,
            shuffle=True,
            num_epochs=0,  # 0: as many as total_steps needs
            chat_template_kwargs={"enable_thinking": False},
            on_bad_row="skip",
            max_eval_prompts=0,  # 0: all
        )
    )
    c.rollout = ml_collections.ConfigDict(
        dict(max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, samples_per_prompt=1)
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            name="sampled_token",
            aggregation="seq-mean-token-mean",
            reward_scale=1.0,  # G-OPD lambda; != 1 needs base_path
            base_path="",  # G-OPD reference pi_B (default: the initial student when reward_scale != 1)
            is_threshold=5.0,
            topk=64,
            chunk_size=512,
        )
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-6,
            schedule="constant",
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            grad_clip=1.0,
        )
    )
    c.effopd = ml_collections.ConfigDict(
        dict(
            enabled=False,
            max_candidates=5,
            trigger="pow2",
            val_files=(),
            val_max_prompts=64,
            val_max_new_tokens=0,  # 0: rollout.max_new_tokens
            val_temperature=1.0,
        )
    )
    c.eval = ml_collections.ConfigDict(dict(samples_per_prompt=1, temperature=1.0, max_new_tokens=0))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.monitor = ml_collections.ConfigDict(dict(every=0, k=8))
    # SIGTERM / SIGINT: finish the current step, checkpoint, wait for the save, exit 0. If that
    # takes longer than `grace_seconds` the process exits with code 1 instead (the last complete
    # checkpoint stays valid); set it below the scheduler's kill timeout (e.g. 30 s on GCE spot).
    c.preemption = ml_collections.ConfigDict(dict(handle_signals=True, grace_seconds=120.0))
    return c


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config.{field}: {message}")


def _show(value: Any) -> str:
    """``repr`` of a config value, shortened so an error message stays one readable line."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  (a ConfigDict with mixed key types cannot even print itself)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _get(c: ml_collections.ConfigDict, field: str) -> Any:
    """The value at dotted ``field``; a missing field (or a group that is not a group) is refused."""
    value: Any = c
    for depth, part in enumerate(field.split(".")):
        if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
            group = ".".join(field.split(".")[:depth])
            raise ValueError(f"config.{group}: must be a group of settings, got {_show(value)}")
        if part not in value:
            raise ValueError(f"config.{field}: missing")
        value = value[part]
    return value


def _int(c: ml_collections.ConfigDict, field: str, low: int, high: int = MAX_INT, *, also: tuple = ()) -> Any:
    """An int (not a bool) in ``[low, high]``, or one of the special values ``also``."""
    value = _get(c, field)
    # Compared by type as well, so that -1.0 or True never pass for -1 or 1.
    if any(type(value) is type(special) and value == special for special in also):
        return value
    allowed = f"an int in [{low}, {high}]" + (f" or one of {also}" if also else "")
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    _require(is_int and low <= value <= high, field, f"must be {allowed}, got {type(value).__name__} {_show(value)}")
    return int(value)


def _float(
    c: ml_collections.ConfigDict,
    field: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A finite real number (an int is fine, a bool is not) in the given interval."""
    value = _get(c, field)
    if value is None and allow_none:
        return None
    _require(
        isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)),
        field,
        f"must be a number, got {type(value).__name__} {_show(value)}",
    )
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        value = math.inf
    # Written so that NaN fails: every comparison with NaN is False.
    in_range = (
        math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _require(in_range, field, f"must be finite and in {interval}, got {value}")
    return value


def _bool(c: ml_collections.ConfigDict, field: str) -> bool:
    value = _get(c, field)
    _require(isinstance(value, (bool, np.bool_)), field, f"must be True or False, got {_show(value)}")
    return bool(value)


def _choice(c: ml_collections.ConfigDict, field: str, choices: Sequence[str]) -> str:
    value = _get(c, field)
    _require(isinstance(value, str) and value in choices, field, f"must be one of {tuple(choices)}, got {_show(value)}")
    return value


def _str(c: ml_collections.ConfigDict, field: str) -> str:
    value = _get(c, field)
    _require(isinstance(value, str), field, f"must be a string, got {type(value).__name__} {_show(value)}")
    return value


def _optional_path(c: ml_collections.ConfigDict, field: str, *, directory: bool) -> str:
    """``""`` (not set) or an existing directory (``directory``) / path."""
    path = _str(c, field)
    if path:
        exists = os.path.isdir(path) if directory else os.path.exists(path)
        _require(exists, field, f"no such {'directory' if directory else 'path'}: {path!r}")
    return path


def _files(c: ml_collections.ConfigDict, field: str) -> tuple[str, ...]:
    """A tuple/list of existing ``.jsonl`` / ``.parquet`` files (a bare string is refused: it is
    not a list of one file but a sequence of characters)."""
    value = _get(c, field)
    _require(
        isinstance(value, (tuple, list)),
        field,
        f"must be a tuple of file paths, got {type(value).__name__} {_show(value)}",
    )
    for path in value:
        _require(isinstance(path, str), field, f"every entry must be a path string, got {_show(path)}")
        _require(os.path.isfile(path), field, f"no such file: {path!r}")
        suffix = os.path.splitext(path)[1].lower()
        _require(suffix in PROMPT_FILE_SUFFIXES, field, f"{path!r}: file type must be one of {PROMPT_FILE_SUFFIXES}")
    return tuple(value)


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Checks every field's type and range, the enums, and that the named files exist.

    Runs before anything is loaded or compiled. Integers must be ints (not bools or floats) and
    fit in int32 (the seed: uint32); floats must be real numbers (ints are fine), finite, and in range (NaN fails
    every check); paths must exist. Raises ValueError whose message starts ``config.<field>:``.
    """
    from effopd_jax.models.qwen import REMAT_POLICIES  # noqa: PLC0415  (keeps this module light)

    _int(c, "seed", 0, 2**32 - 1)
    _int(c, "total_steps", 1)
    _int(c, "checkpoint_every", 1)
    _int(c, "keep_checkpoints", 1)
    _int(c, "eval_every", 0)
    _int(c, "log_every", 1)
    _bool(c, "export_hf")
    _int(c, "max_consecutive_skips", 1)
    _bool(c, "preemption.handle_signals")
    _float(c, "preemption.grace_seconds", low=0.0, low_open=True)

    for role in ("student", "teacher"):
        path = _str(c, f"{role}.path")
        _require(bool(path), f"{role}.path", "is required (an HF checkpoint directory)")
        _require(os.path.isdir(path), f"{role}.path", f"no such directory: {path!r}")
        _require(
            os.path.exists(os.path.join(path, "config.json")), f"{role}.path", f"{path!r} has no config.json"
        )
        _choice(c, f"{role}.param_dtype", DTYPES)
        _choice(c, f"{role}.compute_dtype", DTYPES)
        _bool(c, f"{role}.scan_layers")
    _choice(c, "student.remat", REMAT_POLICIES)
    _optional_path(c, "teacher.tokenizer", directory=True)
    _optional_path(c, "init_from", directory=False)
    _optional_path(c, "tokenizer", directory=True)

    _require(len(_files(c, "data.train_files")) > 0, "data.train_files", "needs at least one file")
    _files(c, "data.eval_files")
    _int(c, "data.prompts_per_step", 1)
    _int(c, "data.max_prompt_length", 1)
    _bool(c, "data.shuffle")
    _int(c, "data.num_epochs", 0)
    kwargs = _get(c, "data.chat_template_kwargs")
    try:
        # A ConfigDict sorts its keys to list them, which fails (TypeError) on mixed key types.
        names = list(kwargs.keys()) if isinstance(kwargs, CHAT_TEMPLATE_KWARGS_TYPES) else None
    except TypeError:
        names = None
    _require(
        names is not None and all(isinstance(name, str) for name in names),
        "data.chat_template_kwargs",
        f"must be a mapping of template variable names (strings) to values, got {_show(kwargs)}",
    )
    _choice(c, "data.on_bad_row", ("skip", "raise"))
    _int(c, "data.max_eval_prompts", 0)

    _int(c, "rollout.max_new_tokens", 1)
    _float(c, "rollout.temperature", low=0.0)
    _int(c, "rollout.top_k", 0)
    _float(c, "rollout.top_p", low=0.0, high=1.0, low_open=True)
    _int(c, "rollout.samples_per_prompt", 1)

    _choice(c, "loss.name", LOSSES)
    _choice(c, "loss.aggregation", AGGREGATIONS)
    _float(c, "loss.reward_scale")
    _optional_path(c, "loss.base_path", directory=False)
    _float(c, "loss.is_threshold", low=0.0, low_open=True, allow_none=True)
    _int(c, "loss.topk", 1)
    _int(c, "loss.chunk_size", 1)

    _float(c, "optimizer.learning_rate", low=0.0, low_open=True)
    _choice(c, "optimizer.schedule", SCHEDULES)
    _int(c, "optimizer.warmup_steps", 0)
    _float(c, "optimizer.b1", low=0.0, high=1.0, high_open=True)
    _float(c, "optimizer.b2", low=0.0, high=1.0, high_open=True)
    _float(c, "optimizer.eps", low=0.0, low_open=True)
    _float(c, "optimizer.weight_decay", low=0.0)
    _float(c, "optimizer.grad_clip", low=0.0, low_open=True)

    enabled = _bool(c, "effopd.enabled")
    _int(c, "effopd.max_candidates", 1)
    _int(c, "effopd.trigger", 1, also=("pow2",))
    val_files = _files(c, "effopd.val_files")
    if enabled:
        _require(len(val_files) > 0, "effopd.val_files", "EffOPD scores candidates on a validation set")
    _int(c, "effopd.val_max_prompts", 0)
    _int(c, "effopd.val_max_new_tokens", 0)
    _float(c, "effopd.val_temperature", low=0.0)

    _int(c, "eval.samples_per_prompt", 1)
    _float(c, "eval.temperature", low=0.0)
    _int(c, "eval.max_new_tokens", 0)

    for axis in ("data", "fsdp", "tensor"):
        _int(c, f"mesh.{axis}", 1, also=(-1,))

    _int(c, "monitor.every", 0)
    _int(c, "monitor.k", 1)
