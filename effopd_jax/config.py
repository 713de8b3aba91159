"""The trainer's configuration schema: defaults and validation.

Experiment files in ``configs/`` call :func:`default_config` and override fields; the trainer
calls :func:`validate_config` before anything compiles, so a bad value is refused with a
message naming the field. Defaults follow the authors' runs (``../shared/effopd_spec.md`` §1.4,
§2): AdamW (0.9, 0.999), weight decay 0.01, eps 1e-8, global-norm clip 1.0, constant LR.
"""

from __future__ import annotations

import os

import ml_collections

LOSSES = ("sampled_token", "full_reverse_kl", "topk_reverse_kl")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
SCHEDULES = ("constant", "cosine", "linear")


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
    return c


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config.{field}: {message}")


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Checks ranges, enums and file existence; raises ValueError naming the field."""
    _require(c.total_steps >= 1, "total_steps", f"must be >= 1, got {c.total_steps}")
    _require(c.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {c.checkpoint_every}")
    _require(c.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {c.keep_checkpoints}")
    _require(c.eval_every >= 0, "eval_every", f"must be >= 0, got {c.eval_every}")
    _require(c.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1")
    for role in ("student", "teacher"):
        path = c[role].path
        _require(bool(path), f"{role}.path", "is required (an HF checkpoint directory)")
        _require(os.path.isdir(path), f"{role}.path", f"no such directory: {path!r}")
        _require(
            os.path.exists(os.path.join(path, "config.json")), f"{role}.path", f"{path!r} has no config.json"
        )
    if c.init_from:
        _require(os.path.exists(c.init_from), "init_from", f"no such path: {c.init_from!r}")
    _require(len(c.data.train_files) > 0, "data.train_files", "needs at least one file")
    for field in ("data.train_files", "data.eval_files", "effopd.val_files"):
        group, name = field.split(".")
        for path in c[group][name]:
            _require(os.path.exists(path), field, f"no such file: {path!r}")
    _require(c.data.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1")
    _require(c.data.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1")
    _require(c.data.on_bad_row in ("skip", "raise"), "data.on_bad_row", "must be 'skip' or 'raise'")
    _require(c.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _require(c.rollout.temperature >= 0, "rollout.temperature", "must be >= 0")
    _require(0 < c.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {c.rollout.top_p}")
    _require(c.rollout.top_k >= 0, "rollout.top_k", "must be >= 0")
    _require(c.rollout.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
    _require(c.loss.name in LOSSES, "loss.name", f"must be one of {LOSSES}, got {c.loss.name!r}")
    _require(c.loss.aggregation in AGGREGATIONS, "loss.aggregation", f"must be one of {AGGREGATIONS}")
    _require(c.loss.is_threshold > 0, "loss.is_threshold", "must be > 0")
    _require(c.loss.chunk_size >= 1, "loss.chunk_size", "must be >= 1")
    _require(c.optimizer.learning_rate > 0, "optimizer.learning_rate", "must be > 0")
    _require(c.optimizer.schedule in SCHEDULES, "optimizer.schedule", f"must be one of {SCHEDULES}")
    _require(0 <= c.optimizer.b1 < 1 and 0 <= c.optimizer.b2 < 1, "optimizer.b1/b2", "must be in [0, 1)")
    _require(c.optimizer.grad_clip > 0, "optimizer.grad_clip", "must be > 0")
    _require(c.optimizer.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    if c.effopd.enabled:
        _require(len(c.effopd.val_files) > 0, "effopd.val_files", "EffOPD scores candidates on a validation set")
        _require(c.effopd.max_candidates >= 1, "effopd.max_candidates", "must be >= 1")
    for axis in ("data", "fsdp", "tensor"):
        size = c.mesh[axis]
        _require(size == -1 or size >= 1, f"mesh.{axis}", f"must be -1 or >= 1, got {size}")
