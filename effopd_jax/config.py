"""The trainer's configuration: one declarative schema, and everything derived from it.

Every setting is one :class:`~effopd_jax.config_schema.Field` of :data:`FIELDS` (a teacher's, of
:data:`TEACHER_FIELDS`): its default, the values it accepts, a one-line doc, and the condition under
which it applies. The rules that tie several fields together are :data:`CROSS_RULES`. From these
come

* :func:`default_config`: what the experiment files in ``configs/`` start from and override;
* :func:`validate_config`: what the trainer calls before anything loads or compiles, so that a bad
  value is refused with a message naming the field;
* :func:`markdown_reference`: ``docs/config.md`` (``python -m effopd_jax.config --markdown``).

Defaults follow the authors' runs (docs/opd_loss.md#optimizer-and-precision, docs/paper_runs.md#run-table): AdamW (0.9, 0.999),
weight decay 0.01, eps 1e-8, global-norm clip 1.0, constant LR.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from effopd_jax.config_schema import (
    AllOf,
    Bool,
    Choice,
    Entries,
    Equals,
    Field,
    Greater,
    Identifier,
    Int,
    ModelPath,
    NonEmpty,
    NotEquals,
    OptionalPath,
    PromptFiles,
    Real,
    Retired,
    StrKeyedMapping,
    check_settings,
    is_group,
    markdown_table,
    show,
)

LOSSES = ("sampled_token", "full_reverse_kl", "topk_reverse_kl")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
# models.qwen.REMAT_POLICIES, repeated so that checking a config imports no jax (a test checks they agree).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# models.layers.ATTENTION_IMPLS, repeated for the same reason (a test checks they agree).
ATTENTION_IMPLS = ("auto", "direct", "blockwise", "cudnn", "splash")
ROLLOUT_ENGINES = ("static",)  # the sampler: a static KV cache, prefill + lax.while_loop decode
INIT_MODES = ("checkpoint", "random")
BAD_ROW_MODES = ("skip", "raise")
PROMPT_FILE_SUFFIXES = (".jsonl", ".parquet")
MAX_SEED = 2**32 - 1


def _model_fields(group: str, *, param_dtype: str) -> tuple[Field, ...]:
    """The fields every model has: where its weights come from and the dtypes / layout it runs in.

    ``group`` prefixes the names (``"student."``, or ``""`` inside a teacher entry); ``init`` comes
    before ``path`` because which paths are allowed depends on it.
    """
    random_init = Equals(f"{group}init", "random")
    return (
        Field(f"{group}init", "checkpoint", Choice(INIT_MODES),
              "`checkpoint`: load the weights at `path`; `random`: random weights of `path`'s "
              "architecture (smoke runs, memory plans)"),
        Field(f"{group}path", "", ModelPath(config_file_when=random_init),
              "HF checkpoint directory (config.json + safetensors), or with `init='random'` an HF config.json"),
        Field(f"{group}init_seed", 0, Int(0, MAX_SEED), "seed of the random weights", applies_when=random_init),
        Field(f"{group}param_dtype", param_dtype, Choice(DTYPES), "dtype the weights are held in"),
        Field(f"{group}compute_dtype", "bfloat16", Choice(DTYPES), "dtype of activations and matmuls"),
        Field(f"{group}scan_layers", False, Bool(),
              "stack the layers and `lax.scan` over them (compile time independent of depth)"),
        Field(f"{group}attention", "auto", Choice(ATTENTION_IMPLS),
              "attention of scoring and training forwards: `blockwise` (plain JAX, memory linear in the "
              "sequence, any backend), `cudnn` (fused, GPU, 16-bit compute, no packing), `splash` "
              "(Pallas kernel, TPU), `direct` (materialised `[heads, seq, seq]` scores: the reference); "
              "`auto`: `cudnn` on GPU where it applies, else `blockwise`. Decoding is always direct"),
    )


# One entry of `teachers`. Names are relative to the entry (`teachers[0].path` is "path").
TEACHER_FIELDS: tuple[Field, ...] = (
    Field("name", "teacher", Identifier(), "names the teacher (in logs and metrics); unique across teachers"),
    *_model_fields("", param_dtype="bfloat16"),
    Field("tokenizer", "", OptionalPath(directory=True),
          "the teacher's tokenizer, checked to give the same token ids as the student's; `''`: not checked"),
)


def teacher_config(**overrides: Any) -> ml_collections.ConfigDict:
    """One entry of ``config.teachers``: the defaults of :data:`TEACHER_FIELDS` with ``overrides``.

    Raises:
      TypeError: an override that is not a teacher setting, or of another type than its default.
    """
    known = [field.name for field in TEACHER_FIELDS]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(f"teacher_config() got unknown settings {unknown}; the settings are {known}")
    entry = ml_collections.ConfigDict({field.name: copy.deepcopy(field.default) for field in TEACHER_FIELDS})
    entry.update(overrides)  # type-checked against the defaults by ConfigDict
    return entry


def _moved_to_teachers(name: str, placeholder_type: type) -> Field:
    """A field of the old single-teacher group ``teacher``: only None is accepted, and the error says where it went."""
    why = "config.teacher was replaced by config.teachers, a tuple of named teachers"
    return Field(f"teacher.{name}", None, Retired(why, f"teachers[0].{name}", placeholder_type),
                 f"moved to `teachers[0].{name}`")


_sampled_token = Equals("loss.name", "sampled_token")
_with_eval_files = NonEmpty("data.eval_files")
_effopd_on = Equals("effopd.enabled", True)

FIELDS: tuple[Field, ...] = (
    Field("seed", 0, Int(0, MAX_SEED), "seed of the run: data order, sampling"),
    Field("total_steps", 100, Int(1), "optimizer updates in the run"),
    Field("checkpoint_every", 50, Int(1), "save a checkpoint every N steps (and at the last one)"),
    Field("keep_checkpoints", 3, Int(1), "how many of the latest checkpoints to keep"),
    Field("export_hf", True, Bool(), "write the final student as HF safetensors to WORKDIR/hf"),
    Field("max_consecutive_skips", 10, Int(1), "non-finite loss / gradient skips in a row before the run stops"),
    Field("micro_batch_size", 0, Int(0),
          "rows per micro-batch of teacher scoring and of the update (gradients accumulated, normalised as "
          "the whole step); across all devices, a multiple of `mesh.data * mesh.fsdp` dividing the step's "
          "rows; with `pack_sequences`, packed rows per micro-batch. 0: the whole step at once"),
    Field("pack_sequences", False, Bool(),
          "pack several prompt + response sequences into each row (segment ids, no attention across "
          "them) for teacher scoring and the update, so compute follows the real tokens; rows are "
          "`data.max_prompt_length + rollout.max_new_tokens` long; needs `micro_batch_size`"),
    *_model_fields("student.", param_dtype="float32"),
    Field("student.remat", "none", Choice(REMAT_POLICIES), "activation checkpointing policy of the student's layers"),
    Field("init_from", "", OptionalPath(directory=False),
          "the student's initial weights instead of `student.path`'s: an HF directory or an orbax params checkpoint",
          applies_when=Equals("student.init", "checkpoint")),
    Field("tokenizer", "", OptionalPath(directory=True), "tokenizer directory; `''`: `student.path`"),
    # Before `teachers`, so that an old config hears where its settings went before anything else.
    _moved_to_teachers("path", str),
    _moved_to_teachers("param_dtype", str),
    _moved_to_teachers("compute_dtype", str),
    _moved_to_teachers("scan_layers", bool),
    _moved_to_teachers("tokenizer", str),
    Field("teachers", (teacher_config(name="teacher"),), Entries(TEACHER_FIELDS, unique="name"),
          "the teachers (exactly one for now), each a group built by `teacher_config()`",
          default_doc="(teacher_config(name='teacher'),)"),
    # Data.
    Field("data.train_files", (), PromptFiles(PROMPT_FILE_SUFFIXES, min_count=1), "training prompts"),
    Field("data.eval_files", (), PromptFiles(PROMPT_FILE_SUFFIXES), "evaluation prompts; `()`: no evaluation"),
    Field("data.prompts_per_step", 8, Int(1), "prompts per optimizer step (across all processes)"),
    Field("data.max_prompt_length", 256, Int(1), "longer prompts (after the chat template) are dropped, and counted"),
    Field("data.shuffle", True, Bool(), "shuffle the training prompts every epoch"),
    Field("data.num_epochs", 0, Int(0), "passes over the training prompts; 0: as many as `total_steps` needs"),
    Field("data.chat_template_kwargs", {"enable_thinking": False}, StrKeyedMapping(),
          "variables passed to the tokenizer's chat template"),
    Field("data.on_bad_row", "skip", Choice(BAD_ROW_MODES),
          "a malformed prompt row: `skip` (and count) it, or `raise` naming file:line"),
    Field("data.max_eval_prompts", 0, Int(0), "evaluate on the first N eval prompts; 0: all",
          applies_when=_with_eval_files),
    # Rollout.
    Field("rollout.engine", "static", Choice(ROLLOUT_ENGINES),
          "the sampler: `static` (static KV cache, prefill + `lax.while_loop` decode)"),
    Field("rollout.max_new_tokens", 256, Int(1), "response length cap"),
    Field("rollout.temperature", 1.0, Real(low=0.0), "sampling temperature; 0: greedy"),
    Field("rollout.top_k", 0, Int(0), "sample among the k likeliest tokens; 0: all",
          applies_when=Greater("rollout.temperature", 0.0)),
    Field("rollout.top_p", 1.0, Real(low=0.0, high=1.0, low_open=True), "nucleus sampling mass; 1: off",
          applies_when=Greater("rollout.temperature", 0.0)),
    Field("rollout.samples_per_prompt", 1, Int(1), "rollouts per prompt"),
    # Loss.
    Field("loss.name", "sampled_token", Choice(LOSSES),
          "`sampled_token`: the authors' loss on the sampled tokens; `full_reverse_kl`: exact reverse KL "
          "over the vocabulary; `topk_reverse_kl`: over the student's top `loss.topk` tokens plus a tail bucket"),
    Field("loss.aggregation", "seq-mean-token-mean", Choice(AGGREGATIONS), "how per-token losses become one number"),
    Field("loss.reward_scale", 1.0, Real(), "G-OPD's lambda; != 1 rewards lambda (T - B) - (s - B)",
          applies_when=_sampled_token),
    Field("loss.base_path", "", OptionalPath(directory=False),
          "G-OPD's reference pi_B (HF directory or orbax params); `''`: the initial student",
          applies_when=AllOf((_sampled_token, NotEquals("loss.reward_scale", 1.0)))),
    Field("loss.is_threshold", 5.0, Real(low=0.0, low_open=True, none_ok=True),
          "cap on the truncated importance weight; None: no truncation", applies_when=_sampled_token),
    Field("loss.topk", 64, Int(1), "the student's top tokens `topk_reverse_kl` compares (the rest is one tail bucket)",
          applies_when=Equals("loss.name", "topk_reverse_kl")),
    Field("loss.chunk_size", 512, Int(1), "sequence positions per chunk of log-prob computation"),
    # Optimizer.
    Field("optimizer.learning_rate", 1e-6, Real(low=0.0, low_open=True), "peak learning rate"),
    Field("optimizer.schedule", "constant", Choice(SCHEDULES), "learning-rate schedule after warmup"),
    Field("optimizer.warmup_steps", 0, Int(0), "linear warmup steps"),
    Field("optimizer.b1", 0.9, Real(low=0.0, high=1.0, high_open=True), "AdamW beta1"),
    Field("optimizer.b2", 0.999, Real(low=0.0, high=1.0, high_open=True), "AdamW beta2"),
    Field("optimizer.eps", 1e-8, Real(low=0.0, low_open=True), "AdamW epsilon"),
    Field("optimizer.weight_decay", 0.01, Real(low=0.0), "AdamW decoupled weight decay"),
    Field("optimizer.grad_clip", 1.0, Real(low=0.0, low_open=True), "global-norm gradient clip"),
    # EffOPD.
    Field("effopd.enabled", False, Bool(), "extrapolate the update at trigger steps, keeping the best candidate"),
    Field("effopd.max_candidates", 5, Int(1), "candidates per search (multipliers 3, 5, 7, ...)",
          applies_when=_effopd_on),
    Field("effopd.trigger", "pow2", Int(1, special=("pow2",), digit_strings=True),
          "search at steps 1, 2, 4, 8, ... (`pow2`) or every N-th step; `--config.effopd.trigger=4` "
          "arrives as the string '4', which counts as 4",
          applies_when=_effopd_on),
    Field("effopd.val_files", (), PromptFiles(PROMPT_FILE_SUFFIXES), "prompts the candidates are scored on",
          applies_when=_effopd_on),
    Field("effopd.val_max_prompts", 64, Int(0), "score on the first N validation prompts; 0: all",
          applies_when=_effopd_on),
    Field("effopd.val_max_new_tokens", 0, Int(0), "response length cap when scoring; 0: `rollout.max_new_tokens`",
          applies_when=_effopd_on),
    Field("effopd.val_temperature", 1.0, Real(low=0.0), "sampling temperature when scoring; 0: greedy",
          applies_when=_effopd_on),
    # Evaluation.
    Field("eval_every", 0, Int(0), "evaluate every N steps; 0: only at the end", applies_when=_with_eval_files),
    Field("eval.samples_per_prompt", 1, Int(1), "samples per eval prompt (mean@n, pass@n)",
          applies_when=_with_eval_files),
    Field("eval.temperature", 1.0, Real(low=0.0), "eval sampling temperature; 0: greedy",
          applies_when=_with_eval_files),
    Field("eval.max_new_tokens", 0, Int(0), "eval response length cap; 0: `rollout.max_new_tokens`",
          applies_when=_with_eval_files),
    # Devices.
    Field("mesh.data", -1, Int(1, special=(-1,)), "data-parallel axis size; -1: the devices left"),
    Field("mesh.fsdp", 1, Int(1, special=(-1,)), "parameter-sharding axis size; -1: the devices left"),
    Field("mesh.tensor", 1, Int(1, special=(-1,)), "tensor-parallel axis size; -1: the devices left"),
    # Monitoring.
    Field("monitor.every", 0, Int(0), "truncated-SVD foresight metrics of the updates every N steps; 0: off"),
    Field("monitor.k", 8, Int(1), "singular directions the foresight metrics keep",
          applies_when=Greater("monitor.every", 0)),
    # Preemption: on SIGTERM / SIGINT finish the step, checkpoint, wait for the save, exit 0.
    Field("preemption.handle_signals", True, Bool(), "stop cleanly on SIGTERM / SIGINT"),
    Field("preemption.grace_seconds", 120.0, Real(low=0.0, low_open=True),
          "past this the process exits 1 instead (the last checkpoint stays valid); set it below the "
          "scheduler's kill timeout (e.g. 30 s on GCE spot)",
          applies_when=Equals("preemption.handle_signals", True)),
)

GROUP_DOCS: Mapping[str, str] = {
    "": "Settings outside any group: run length, checkpoints, initial weights, the teachers, micro-batches and "
    "packing, eval cadence.",
    "student": "The model being trained.",
    "teachers[i]": "Each entry of `teachers`, a group built by `teacher_config(**overrides)`. On the command "
    "line: `'--config.teachers[0].path=...'` (quoted: `[0]` is a glob pattern to the shell).",
    "teacher": "Retired: the single teacher of earlier versions. Any value but `None` is refused with "
    "a message naming its new place; a config without the group is fine.",
    "data": "Prompt files (JSONL or Parquet: `prompt` or `messages`, `answer` or the verl layout).",
    "rollout": "How the student samples its responses.",
    "loss": "The distillation loss.",
    "optimizer": "AdamW with global-norm clipping.",
    "effopd": "EffOPD: extrapolated updates scored on a validation set.",
    "eval": "Evaluation on `data.eval_files`.",
    "mesh": "Device mesh; at most one axis may be -1.",
    "monitor": "Foresight metrics of the weight updates.",
    "preemption": "SIGTERM / SIGINT: finish the current step, checkpoint, wait for the save, exit 0.",
}


# ---------------------------------------------------------------------------------------------
# Rules across fields. Each reads checked values ({field name: value}; a teacher is a dict of
# its own) and returns what is wrong, or None.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CrossRule:
    """A rule over several fields; ``field`` is the one its message names."""

    field: str
    doc: str
    violation: Callable[[Mapping[str, Any]], str | None]


def _one_teacher(values: Mapping[str, Any]) -> str | None:
    count = len(values["teachers"])
    if count == 1:
        return None
    names = [teacher["name"] for teacher in values["teachers"]]
    return f"exactly one teacher is supported for now (several come later), got {count}: {names}"


def _effopd_has_val_files(values: Mapping[str, Any]) -> str | None:
    if values["effopd.enabled"] and not values["effopd.val_files"]:
        return "EffOPD scores its candidates on a validation set: set it, or effopd.enabled=False"
    return None


def _one_free_mesh_axis(values: Mapping[str, Any]) -> str | None:
    free = [axis for axis in ("data", "fsdp", "tensor") if values[f"mesh.{axis}"] == -1]
    if len(free) > 1:
        return f"at most one axis may be -1 (take the devices left), got {free}"
    return None


def _micro_batches_divide_the_step(values: Mapping[str, Any]) -> str | None:
    size = values["micro_batch_size"]
    rows = values["data.prompts_per_step"] * values["rollout.samples_per_prompt"]
    if size and rows % size:
        return (f"{size} does not divide the step's data.prompts_per_step * rollout.samples_per_prompt "
                f"= {rows} rows")
    return None


def _packing_needs_micro_batches(values: Mapping[str, Any]) -> str | None:
    if values["pack_sequences"] and not values["micro_batch_size"]:
        return ("pack_sequences runs the packed rows micro-batch by micro-batch: set micro_batch_size "
                "(packed rows per micro-batch), e.g. the number of batch shards")
    return None


CROSS_RULES: tuple[CrossRule, ...] = (
    CrossRule("teachers", "exactly one teacher for now (several come with a later version)", _one_teacher),
    CrossRule("effopd.val_files", "`effopd.enabled` needs a non-empty `effopd.val_files`", _effopd_has_val_files),
    CrossRule("mesh", "at most one of `mesh.data`, `mesh.fsdp`, `mesh.tensor` is -1", _one_free_mesh_axis),
    CrossRule("micro_batch_size", "`micro_batch_size` divides `data.prompts_per_step * rollout.samples_per_prompt`"
              " (and, checked with the mesh, is a multiple of `mesh.data * mesh.fsdp`)",
              _micro_batches_divide_the_step),
    CrossRule("pack_sequences", "`pack_sequences` needs `micro_batch_size > 0`", _packing_needs_micro_batches),
)


# ---------------------------------------------------------------------------------------------
# Derived: defaults, validation, reference
# ---------------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, at its default (see ``docs/config.md``)."""
    c = ml_collections.ConfigDict()
    for field in FIELDS:
        *groups, leaf = field.name.split(".")
        node = c
        for group in groups:
            if group not in node:
                node[group] = ml_collections.ConfigDict()
            node = node[group]
        if isinstance(field.kind, Retired):
            # A typed None, so that --config.teacher.path=... still parses and meets the migration message.
            node[leaf] = ml_collections.config_dict.placeholder(field.kind.placeholder_type)
        else:
            node[leaf] = copy.deepcopy(field.default)
    return c


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Checks every field against the schema, then the rules across fields.

    Runs before anything is loaded or compiled. Integers must be ints (not bools or floats) within
    their range (at most int32; the seeds uint32); floats real numbers (ints are fine), finite and
    in range (NaN fails every check); paths must exist; unknown keys are refused, in every group and
    teacher; a field its mode does not use (``applies_when``) must stay at its default. The one
    normalisation: a digit string in ``effopd.trigger`` (what the command line delivers) is
    replaced by its int, in place.

    Raises:
      ValueError: the message starts ``config.<field>: `` (``config.teachers[0].path: ``).
    """
    if not is_group(c):
        raise ValueError(f"config: must be a ConfigDict, got {show(c)}")
    values = check_settings(c, FIELDS)
    for rule in CROSS_RULES:
        problem = rule.violation(values)
        if problem:
            raise ValueError(f"config.{rule.field}: {problem}")


def markdown_reference() -> str:
    """``docs/config.md``: every field, by group, and the rules across fields."""
    sections = [
        "# Configuration reference",
        "",
        "Generated from the schema in `effopd_jax/config.py` by `python -m effopd_jax.config --markdown`;"
        " do not edit by hand (`tests/test_config.py` checks that this file is current).",
        "",
        "Experiment files in `configs/` start from `default_config()` and override fields; any field"
        " can also be overridden on the command line (`--config.loss.name=topk_reverse_kl`)."
        " `validate_config()` refuses, before anything loads or compiles and with a message naming the"
        " field: unknown keys, ints that are bools / floats / out of range, non-finite floats, missing"
        " paths, and a setting the chosen mode ignores (\"used when\" does not hold) at anything but"
        " its default.",
    ]
    groups: dict[str, list[Field]] = {}
    for field in FIELDS:
        groups.setdefault(field.group, []).append(field)
    for group, fields in groups.items():
        title = f"`{group}`" if group else "Top level"
        sections += ["", f"## {title}", "", GROUP_DOCS[group], "", markdown_table(fields)]
        if group == "student":  # then the other models: the teachers
            sections += ["", "## `teachers[i]`", "", GROUP_DOCS["teachers[i]"], "",
                         markdown_table(TEACHER_FIELDS, prefix="teachers[i].")]
    sections += ["", "## Rules across fields", ""]
    sections += [f"- `{rule.field}`: {rule.doc}" for rule in CROSS_RULES]
    return "\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the reference (docs/config.md)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_reference(), end="")
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
