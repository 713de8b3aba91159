"""The trainer's configuration: one declarative schema, and everything derived from it.

Every setting is one :class:`~effopd_jax.config_schema.Field` of :data:`FIELDS` (a teacher's, of
:data:`TEACHER_FIELDS`): its default, the values it accepts, a one-line doc, and the condition under
which it applies. The rules that tie several fields together are :data:`CROSS_RULES`. From these
come

* :func:`default_config`: what the experiment files in ``configs/`` start from and override
  (:func:`load_config_file`: one experiment file building on another);
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
import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from effopd_jax import published_configs
from effopd_jax.config_schema import (
    AllOf,
    AnyOf,
    Bool,
    Choice,
    Entries,
    Equals,
    Field,
    Greater,
    Identifier,
    Int,
    LongerThan,
    ModelPath,
    NonEmpty,
    NotEquals,
    NotRead,
    OptionalPath,
    PromptFiles,
    PromptTemplate,
    Real,
    Retired,
    Strings,
    StrKeyedMapping,
    Text,
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
# static: the sampler (a dense KV cache, prefill + lax.while_loop decode); continuous: slots over a
# paged KV cache, refilled as rows finish (effopd_jax/continuous_batching.py).
ROLLOUT_ENGINES = ("static", "continuous")
INIT_MODES = ("checkpoint", "random")
# lora.EFFOPD_SPACES, repeated so that checking a config imports no jax (a test checks they agree).
LORA_EFFOPD_SPACES = ("factors", "merged")
BAD_ROW_MODES = ("skip", "raise")
# Where a teacher's weights come from: its own checkpoint, or the student (self-distillation).
TEACHER_MODELS = ("own", "student_initial", "student_live")
ROUTING_MODES = ("data_source", "mixture")
MISSING_SOLUTION_MODES = ("skip", "raise")
CONTEXT_PLACEHOLDERS = ("problem", "solution")
# Our wording of the authors' privileged prompt for self-distillation (docs/opd_loss.md#context-distillation):
# the problem, a reference solution, and an instruction to solve the problem in its own way.
DEFAULT_CONTEXT_TEMPLATE = (
    "{problem}\n\nHere is a reference solution:\n{solution}\n\n"
    "Now that you have read the reference solution, solve the problem yourself, in your own way."
)
PROMPT_FILE_SUFFIXES = (".jsonl", ".parquet")
MAX_SEED = 2**32 - 1


def _model_fields(group: str, *, param_dtype: str, applies_when=None) -> tuple[Field, ...]:
    """The fields every model has: where its weights come from and the dtypes / layout it runs in.

    ``group`` prefixes the names (``"student."``, or ``""`` inside a teacher entry); ``init`` comes
    before ``path`` because which paths are allowed depends on it. ``applies_when``: when the
    model has weights of its own at all (a teacher that is the student has none); None: always.
    """
    random_init = Equals(f"{group}init", "random")

    def only(condition):
        if applies_when is None:
            return condition
        return applies_when if condition is None else AllOf((applies_when, condition))

    return (
        Field(f"{group}init", "checkpoint", Choice(INIT_MODES),
              "`checkpoint`: load the weights at `path`; `random`: random weights of `path`'s "
              "architecture (smoke runs, memory plans)", applies_when=only(None)),
        Field(f"{group}path", "", ModelPath(config_file_when=random_init, required_when=applies_when),
              "HF checkpoint directory (config.json + safetensors), or with `init='random'` an HF config.json",
              applies_when=only(None)),
        Field(f"{group}hf_name", "", Choice(("",) + published_configs.names()),
              "the HF repository id of the architecture the config was written for; the memory plan "
              "(`python -m effopd_jax.plan`, `plan_only`) takes the shapes from the bundled config of "
              "that name when `path` is empty; `''`: none", applies_when=only(None)),
        Field(f"{group}init_seed", 0, Int(0, MAX_SEED), "seed of the random weights", applies_when=only(random_init)),
        Field(f"{group}param_dtype", param_dtype, Choice(DTYPES), "dtype the weights are held in",
              applies_when=only(None)),
        Field(f"{group}compute_dtype", "bfloat16", Choice(DTYPES), "dtype of activations and matmuls",
              applies_when=only(None)),
        Field(f"{group}scan_layers", False, Bool(),
              "stack the layers and `lax.scan` over them (compile time independent of depth)",
              applies_when=only(None)),
        Field(f"{group}attention", "auto", Choice(ATTENTION_IMPLS),
              "attention of scoring and training forwards: `blockwise` (plain JAX, memory linear in the "
              "sequence, any backend), `cudnn` (fused, GPU, 16-bit compute, no packing), `splash` "
              "(Pallas kernel, TPU), `direct` (materialised `[heads, seq, seq]` scores: the reference); "
              "`auto`: `cudnn` on GPU where it applies, else `blockwise`. Decoding is always direct",
              applies_when=only(None)),
    )


# One entry of `teachers`. Names are relative to the entry (`teachers[0].path` is "path").
_own_model = Equals("model", "own")
# A teacher renders its own prompt from the row's raw chat messages when any of these is set.
_renders_own_prompt = AnyOf((NonEmpty("tokenizer"), NonEmpty("chat_template"),
                             NotEquals("chat_template_kwargs", None), NonEmpty("context_template")))
TEACHER_FIELDS: tuple[Field, ...] = (
    Field("name", "teacher", Identifier(), "names the teacher (in logs and metrics); unique across teachers"),
    Field("model", "own", Choice(TEACHER_MODELS),
          "`own`: the model at `path`; `student_initial`: the student's initial weights, frozen; "
          "`student_live`: the student's current weights, stop-gradient, no extra parameter memory "
          "(self-distillation; README#self-distillation-with-privileged-context)"),
    *_model_fields("", param_dtype="bfloat16", applies_when=_own_model),
    Field("tokenizer", "", OptionalPath(directory=True),
          "the teacher's tokenizer: it renders the teacher's prompts, and must map tokens to the same ids "
          "as the student's; `''`: the student's"),
    Field("chat_template", "", OptionalPath(directory=False),
          "a Jinja chat-template file used for this teacher's prompts instead of its tokenizer's; `''`: the tokenizer's"),
    Field("chat_template_kwargs", None, StrKeyedMapping(none_ok=True),
          "variables of this teacher's chat template (e.g. `{'enable_thinking': True}`); None: "
          "`data.chat_template_kwargs`"),
    Field("context_template", "", PromptTemplate(CONTEXT_PLACEHOLDERS, required=("problem",)),
          "privileged context: the row's last user turn becomes this text with `{problem}` (that turn) and "
          "`{solution}` (the row's reference solution) filled in; `''`: the prompt as it is"),
    Field("missing_solution", "skip", Choice(MISSING_SOLUTION_MODES),
          "a row without a reference solution: `skip` it (counted; no loss on it) or `raise` before training",
          applies_when=NonEmpty("context_template")),
    Field("max_prompt_length", 0, Int(0),
          "the static length of this teacher's own prompts (longer ones are refused); 0: `data.max_prompt_length`",
          applies_when=_renders_own_prompt),
    Field("data_sources", (), Strings(),
          "routing tags (`routing.key` values) whose rows this teacher scores (`routing.mode='data_source'`)"),
    Field("weight", 1.0, Real(low=0.0, low_open=True),
          "weight w of this teacher in `routing.mode='mixture'` (normalised over the teachers)"),
    Field("rows_per_forward", 0, Int(0),
          "rows of one scoring forward when the teacher scores a subset of the step's rows (padded to this "
          "static size); 0: the step's rows / (4 x teachers), rounded up to a multiple of the batch shards"),
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
_continuous = Equals("rollout.engine", "continuous")
_several_teachers = LongerThan("teachers", 1)
_routed_by_tag = AllOf((_several_teachers, Equals("routing.mode", "data_source")))
_with_eval_files = NonEmpty("data.eval_files")
_effopd_on = Equals("effopd.enabled", True)
_paper_rule = AllOf((_effopd_on, Equals("effopd.rule", "paper")))
_lora_on = Equals("lora.enabled", True)

FIELDS: tuple[Field, ...] = (
    Field("seed", 0, Int(0, MAX_SEED), "seed of the run: data order, sampling"),
    Field("total_steps", 100, Int(1), "optimizer updates in the run"),
    Field("checkpoint_every", 50, Int(1), "save a checkpoint every N steps (and at the last one)"),
    Field("keep_checkpoints", 3, Int(1), "how many of the latest checkpoints to keep"),
    Field("export_hf", True, Bool(), "write the final student as HF safetensors to WORKDIR/hf"),
    Field("max_consecutive_skips", 10, Int(1), "non-finite loss / gradient skips in a row before the run stops"),
    Field("plan_only", False, Bool(),
          "print the memory plan of one step on this run's devices (every jitted program compiled with "
          "abstract shapes; no weights, prompts or tokenizer read) and exit without training; exit code 1 "
          "if a program does not fit (`python -m effopd_jax.plan` plans for a named TPU / GPU slice)"),
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
    Field("student.router_aux_loss_coef", 0.0, Real(low=0.0),
          "mixture-of-experts student: weight of HF's router load-balancing loss added to the objective "
          "(HF's `router_aux_loss_coef`, e.g. the 0.001 Qwen3-MoE checkpoints carry); 0: off. A dense student refuses > 0"),
    Field("student.router_z_loss_coef", 0.0, Real(low=0.0),
          "mixture-of-experts student: weight of the router z-loss (mean logsumexp(router logits)^2); 0: off"),
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
          "the teachers, each a group built by `teacher_config()`; with several, `routing` says which "
          "scores which row", default_doc="(teacher_config(name='teacher'),)"),
    Field("routing.mode", "data_source", Choice(ROUTING_MODES),
          "`data_source`: each row is scored by the teacher whose `data_sources` hold its tag; `mixture`: "
          "every teacher scores every row and the teacher log-prob is log sum_j w_j pi_j",
          applies_when=_several_teachers),
    Field("routing.key", "data_source", Text(non_blank=True),
          "the row field whose value is its routing tag (dotted for nested fields, e.g. "
          "`extra_info.opd_teacher`)", applies_when=_routed_by_tag),
    Field("routing.default_teacher", "", Text(),
          "the teacher of rows whose tag no teacher lists; `''`: such rows are refused before training",
          applies_when=_routed_by_tag),
    # Data.
    Field("data.train_files", (), PromptFiles(PROMPT_FILE_SUFFIXES, min_count=1), "training prompts"),
    Field("data.eval_files", (), PromptFiles(PROMPT_FILE_SUFFIXES), "evaluation prompts; `()`: no evaluation"),
    Field("data.prompts_per_step", 8, Int(1), "prompts per optimizer step (across all processes)"),
    Field("data.max_prompt_length", 256, Int(1), "longer prompts (after the chat template) are dropped, and counted"),
    Field("data.shuffle", True, Bool(), "shuffle the training prompts every epoch"),
    Field("data.num_epochs", 0, Int(0), "passes over the training prompts; 0: as many as `total_steps` needs"),
    Field("data.chat_template_kwargs", {"enable_thinking": False}, StrKeyedMapping(),
          "variables passed to the tokenizer's chat template"),
    Field("data.solution_key", "solution", Text(non_blank=True),
          "the row field of its reference solution (dotted for nested fields, e.g. `extra_info.ref_solution`); "
          "read by teachers with a `{solution}` in their `context_template`"),
    Field("data.on_bad_row", "skip", Choice(BAD_ROW_MODES),
          "a malformed prompt row: `skip` (and count) it, or `raise` naming file:line"),
    Field("data.max_eval_prompts", 0, Int(0), "evaluate on the first N eval prompts; 0: all",
          applies_when=_with_eval_files),
    # Rollout.
    Field("rollout.engine", "static", Choice(ROLLOUT_ENGINES),
          "the sampler: `static` (every row at once in a dense KV cache, prefill + `lax.while_loop` decode) or "
          "`continuous` (`rollout.slots` rows at a time over a paged KV cache, a finished row's slot refilled "
          "with the next prompt)"),
    Field("rollout.slots", 64, Int(1),
          "sequences decoded at once (a multiple of the mesh's batch shards); KV memory follows slots, not rows",
          applies_when=_continuous),
    Field("rollout.page_size", 16, Int(1), "positions per KV-cache page", applies_when=_continuous),
    Field("rollout.kv_pages", 0, Int(0),
          "KV-cache pages over all batch shards; 0: enough for every slot to reach the longest row "
          "(fewer: rows that run out are preempted and restarted, same tokens)", applies_when=_continuous),
    Field("rollout.decode_steps", 32, Int(1),
          "decode steps per host call at most (a call also returns once slots can be refilled)",
          applies_when=_continuous),
    Field("rollout.prefill_rows", 1, Int(1),
          "prompts prefilled together per batch shard when slots are refilled", applies_when=_continuous),
    Field("rollout.max_new_tokens", 256, Int(1), "response length cap"),
    Field("rollout.temperature", 1.0, Real(low=0.0), "sampling temperature; 0: greedy"),
    Field("rollout.top_k", 0, Int(0), "sample among the k likeliest tokens; 0: all",
          applies_when=Greater("rollout.temperature", 0.0)),
    Field("rollout.top_p", 1.0, Real(low=0.0, high=1.0, low_open=True), "nucleus sampling mass; 1: off",
          applies_when=Greater("rollout.temperature", 0.0)),
    Field("rollout.samples_per_prompt", 1, Int(1), "rollouts per prompt"),
    Field("rollout.weight_dtype", "", Choice(("",) + DTYPES),
          "dtype of the student's weights while it samples (cast once per step; a decode step reads every "
          "weight, so `bfloat16` halves its bytes); the behaviour log-probs are the cast model's, which the "
          "loss's importance weight corrects for; `''`: the student's own params, uncast"),
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
    Field("effopd.rule", "paper", Choice(("paper", "followup")),
          "`paper`: the paper's rule (searches at steps 1, 2, 4, ..., ladder 3, 5, 7, ..., strict `>`, the "
          "anchor moves to the accepted point); `followup`: the authors' later rule (a search at every step, "
          "ladder 1 + k*2*(1 - progress)*(1 - last accepted score), ties accepted, the anchor fixed at the "
          "initial student) [beyond the paper]",
          applies_when=_effopd_on),
    Field("effopd.max_candidates", 5, Int(1), "candidates per search (multipliers 3, 5, 7, ... under `paper`)",
          applies_when=_effopd_on),
    Field("effopd.trigger", "pow2", Int(1, special=("pow2",), digit_strings=True),
          "search at steps 1, 2, 4, 8, ... (`pow2`) or every N-th step; `--config.effopd.trigger=4` "
          "arrives as the string '4', which counts as 4",
          applies_when=_paper_rule),
    Field("effopd.val_files", (), PromptFiles(PROMPT_FILE_SUFFIXES), "prompts the candidates are scored on",
          applies_when=_effopd_on),
    Field("effopd.val_max_prompts", 64, Int(0),
          "score on the first N validation prompts; 0: all (fewer is cheaper and noisier: approximate)",
          applies_when=_effopd_on),
    Field("effopd.val_max_new_tokens", 0, Int(0),
          "response length cap when scoring; 0: `rollout.max_new_tokens` (a shorter cap is approximate: "
          "cut-off answers score 0)",
          applies_when=_effopd_on),
    Field("effopd.val_batch_prompts", 0, Int(0),
          "validation prompts per decoding call; 0: the step's rows. Smaller batches let `val_early_stop` "
          "stop sooner; a multiple of the process count times data*fsdp",
          applies_when=_effopd_on),
    Field("effopd.val_early_stop", True, Bool(),
          "stop decoding a candidate once it can no longer beat the incumbent (the incumbent's failures "
          "first); exact: the decisions of decoding every prompt",
          applies_when=_effopd_on),
    Field("effopd.val_temperature", 1.0, Real(low=0.0), "sampling temperature when scoring; 0: greedy",
          applies_when=_effopd_on),
    # LoRA students.
    Field("lora.enabled", False, Bool(),
          "train low-rank adapters on a frozen base instead of every weight (README \"LoRA students\")"),
    Field("lora.rank", 8, Int(1), "r of the adapters A [in, r], B [r, out]; at most min(in, out) of every adapted "
          "matrix", applies_when=_lora_on),
    Field("lora.alpha", 16.0, Real(low=0.0, low_open=True), "the adapted kernel is W + (alpha / rank)·A·B",
          applies_when=_lora_on),
    Field("lora.dropout", 0.0, Real(low=0.0, high=1.0, high_open=True),
          "must be 0: dropout on the adapters' input would score each token under a random sub-policy, "
          "not the on-policy student (docstring of effopd_jax/lora.py)", applies_when=_lora_on),
    Field("lora.target", (), Strings(),
          "matrix modules to adapt, as the model's layout names them (`self_attn/q_proj`) or by their last "
          "part (`q_proj`); `()`: every attention and MLP projection", applies_when=_lora_on),
    Field("lora.base_dtype", "bfloat16", Choice(DTYPES),
          "dtype the frozen base is held in (the adapters are in `student.param_dtype`)", applies_when=_lora_on),
    Field("lora.effopd_space", "factors", Choice(LORA_EFFOPD_SPACES),
          "what EffOPD extrapolates: the factors A and B (`factors`), or the merged update A·B, re-factored to "
          "rank r (`merged`; exact when the extrapolated product has rank <= r)",
          applies_when=AllOf((_lora_on, _effopd_on))),
    # Evaluation.
    Field("eval_every", 0, Int(0), "evaluate every N steps; 0: only at the end", applies_when=_with_eval_files),
    Field("eval.samples_per_prompt", 1, Int(1), "samples per eval prompt (mean@n, pass@n)",
          applies_when=_with_eval_files),
    Field("eval.temperature", 1.0, Real(low=0.0), "eval sampling temperature; 0: greedy",
          applies_when=_with_eval_files),
    Field("eval.max_new_tokens", 0, Int(0), "eval response length cap; 0: `rollout.max_new_tokens`",
          applies_when=_with_eval_files),
    Field("eval.kl_prompts", 0, Int(0),
          "exact held-out reverse KL(student || teacher) over the full vocabulary at every evaluation, on "
          "the responses the initial student sampled (once) to the first N eval prompts; 0: off",
          applies_when=_with_eval_files),
    Field("eval.kl_warn_rises", 3, Int(1),
          "warn (naming the learning rate) when the exact held-out KL has risen over this many "
          "evaluations in a row, or stayed above its first value for as many",
          applies_when=AllOf((_with_eval_files, Greater("eval.kl_prompts", 0)))),
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
    "line: `'--config.teachers[0].path=...'` (quoted: `[0]` is a glob pattern to the shell). A teacher is "
    "its own model (`model='own'`) or the student (`student_initial`, `student_live`); it scores the "
    "student's prompt ids, or renders its own prompt from the row's raw chat messages when it has its own "
    "`tokenizer`, `chat_template`, `chat_template_kwargs` or `context_template` (README#teachers-with-their-own-chat-template).",
    "routing": "Which teacher scores which row when there are several (README#several-teachers).",
    "teacher": "Retired: the single teacher of earlier versions. Any value but `None` is refused with "
    "a message naming its new place; a config without the group is fine.",
    "data": "Prompt files (JSONL or Parquet: `prompt` or `messages`, `answer` or the verl layout).",
    "rollout": "How the student samples its responses.",
    "loss": "The distillation loss.",
    "optimizer": "AdamW with global-norm clipping.",
    "effopd": "EffOPD: extrapolated updates scored on a validation set.",
    "lora": "LoRA students: low-rank adapters A (random) and B (zeros) on a frozen base. Only the adapters are "
    "trained, held by the optimizer and EffOPD, and checkpointed; the run exports the merged student (`hf/`) and "
    "the adapters in PEFT's format (`peft/`).",
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
    """A rule over several fields; ``field`` is the one its message names, unless the violation
    names a more precise one: ``(field, message)``, e.g. ``("teachers[1].weight", "...")``."""

    field: str
    doc: str
    violation: Callable[[Mapping[str, Any]], str | tuple[str, str] | None]


def _several_teachers_need_sampled_token(values: Mapping[str, Any]) -> str | None:
    teachers = values["teachers"]
    if len(teachers) > 1 and values["loss.name"] != "sampled_token":
        return (f"{len(teachers)} teachers need loss.name='sampled_token' (the routed or mixed log-probs of "
                f"teachers of different widths are one array; their hidden states are not), got {values['loss.name']!r}")
    return None


def _routing_settings_of_each_teacher(values: Mapping[str, Any]) -> str | None:
    """A teacher's `data_sources` / `weight` are read only by the routing mode they belong to."""
    teachers = values["teachers"]
    mode = values["routing.mode"] if len(teachers) > 1 else None
    for index, teacher in enumerate(teachers):
        if teacher["data_sources"] and mode != "data_source":
            why = "one teacher scores every row" if mode is None else "routing.mode='mixture' scores every row"
            return (f"teachers[{index}].data_sources",
                    f"only used with routing.mode='data_source' and several teachers ({why}); leave it ()")
        if teacher["weight"] != 1.0 and mode != "mixture":
            return f"teachers[{index}].weight", "only used with routing.mode='mixture' and several teachers; leave it 1.0"
    return None


def _routing_tags(values: Mapping[str, Any]) -> str | None:
    teachers = values["teachers"]
    if len(teachers) < 2 or values["routing.mode"] != "data_source":
        return None
    names = [teacher["name"] for teacher in teachers]
    default = values["routing.default_teacher"]
    if default and default not in names:
        return "routing.default_teacher", f"{default!r} is not one of the teachers {names}"
    owner: dict[str, str] = {}
    for teacher in teachers:
        for tag in teacher["data_sources"]:
            if tag in owner:
                return f"the tag {tag!r} is listed by both {owner[tag]!r} and {teacher['name']!r}; a row has one teacher"
            owner[tag] = teacher["name"]
        if not teacher["data_sources"] and teacher["name"] != default:
            return (f"teacher {teacher['name']!r} lists no data_sources and is not routing.default_teacher, "
                    "so no row would reach it")
    return None


def _effopd_has_val_files(values: Mapping[str, Any]) -> str | None:
    if values["effopd.enabled"] and not values["effopd.val_files"]:
        return "EffOPD scores its candidates on a validation set: set it, or effopd.enabled=False"
    return None


def _heldout_kl_has_one_teacher(values: Mapping[str, Any]) -> str | tuple[str, str] | None:
    """The exact held-out KL compares the student with one fixed teacher on the student's prompts."""
    if not values["eval.kl_prompts"]:
        return None
    teachers = values["teachers"]
    if len(teachers) != 1:
        return f"the exact held-out KL is to one teacher, got {len(teachers)} teachers; set eval.kl_prompts=0"
    teacher = teachers[0]
    if teacher["model"] == "student_live":
        return "teachers[0].model", ("'student_live' is the student itself, so the held-out KL to it is 0; "
                                     "set eval.kl_prompts=0")
    if (teacher["tokenizer"] or teacher["chat_template"] or teacher["context_template"]
            or teacher["chat_template_kwargs"] is not None):
        return "eval.kl_prompts", ("the exact held-out KL scores the student's own prompt ids, but teachers[0] "
                                   "renders its own prompts; set eval.kl_prompts=0")
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


def _packing_without_router_losses(values: Mapping[str, Any]) -> str | None:
    if values["pack_sequences"] and (values["student.router_aux_loss_coef"] or values["student.router_z_loss_coef"]):
        return ("a mixture-of-experts student's router losses are computed per forward over whole rows, not yet "
                "over packed rows: set pack_sequences=False (micro_batch_size alone works) or the router loss "
                "coefficients to 0")
    return None


def _no_lora_dropout(values: Mapping[str, Any]) -> str | None:
    if values["lora.dropout"] != 0.0:
        return (f"must be 0, got {values['lora.dropout']}: the OPD loss scores every sampled token under the student "
                "that sampled it, and dropout on the adapters' input would make that a random sub-policy")
    return None


CROSS_RULES: tuple[CrossRule, ...] = (
    CrossRule("teachers", "several teachers need `loss.name='sampled_token'`", _several_teachers_need_sampled_token),
    CrossRule("teachers", "`teachers[i].data_sources` only with `routing.mode='data_source'` and several teachers; "
              "`teachers[i].weight` only with `routing.mode='mixture'`", _routing_settings_of_each_teacher),
    CrossRule("routing", "with `routing.mode='data_source'`: a tag belongs to one teacher, every teacher lists tags "
              "or is `routing.default_teacher`, which names a teacher or is `''`", _routing_tags),
    CrossRule("effopd.val_files", "`effopd.enabled` needs a non-empty `effopd.val_files`", _effopd_has_val_files),
    CrossRule("eval.kl_prompts", "`eval.kl_prompts` > 0 needs one teacher (not `student_live`) that scores the "
              "student's prompt ids", _heldout_kl_has_one_teacher),
    CrossRule("mesh", "at most one of `mesh.data`, `mesh.fsdp`, `mesh.tensor` is -1", _one_free_mesh_axis),
    CrossRule("lora.dropout", "`lora.dropout` is 0 (LoRA dropout is refused for on-policy log-probs)", _no_lora_dropout),
    CrossRule("micro_batch_size", "`micro_batch_size` divides `data.prompts_per_step * rollout.samples_per_prompt`"
              " (and, checked with the mesh, is a multiple of `mesh.data * mesh.fsdp`)",
              _micro_batches_divide_the_step),
    CrossRule("pack_sequences", "`pack_sequences` needs `micro_batch_size > 0`", _packing_needs_micro_batches),
    CrossRule("pack_sequences", "`pack_sequences` with a student's router losses (`student.router_aux_loss_coef`, "
              "`student.router_z_loss_coef`) is refused", _packing_without_router_losses),
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


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the experiment file at ``path``.

    Experiment files are run by path (``--config=configs/x.py``), not imported as a package, so a
    file that builds on another (the ExOPD run on the OPD run) loads it with this, by a path next
    to its own: ``load_config_file(os.path.join(os.path.dirname(__file__), "other.py"))``.

    Raises:
      FileNotFoundError: no file at ``path``.
      AttributeError: the file defines no ``get_config()``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no experiment config file at {path!r}")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"effopd_config_file_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise AttributeError(f"{path} defines no get_config()")
    return module.get_config()


# What a memory plan's checks see for every prompt-file field: files that are given but not read.
PLAN_PROMPT_FILES = ("<prompt file, not read by the plan>",)


def _plan_fields(fields: tuple[Field, ...]) -> tuple[Field, ...]:
    """``fields`` with every path checked for its type only (:class:`NotRead`), teachers included."""

    def plan_kind(kind):
        if isinstance(kind, (ModelPath, OptionalPath, PromptFiles)):
            return NotRead(kind)
        if isinstance(kind, Entries):
            return dataclasses.replace(kind, fields=_plan_fields(kind.fields))
        return kind

    return tuple(dataclasses.replace(field, kind=plan_kind(field.kind)) for field in fields)


def validate_config(c: ml_collections.ConfigDict, *, for_plan: bool = False) -> None:
    """Checks every field against the schema, then the rules across fields.

    Runs before anything is loaded or compiled. Integers must be ints (not bools or floats) within
    their range (at most int32; the seeds uint32); floats real numbers (ints are fine), finite and
    in range (NaN fails every check); paths must exist; unknown keys are refused, in every group and
    teacher; a field its mode does not use (``applies_when``) must stay at its default. The one
    normalisation: a digit string in ``effopd.trigger`` (what the command line delivers) is
    replaced by its int, in place.

    Args:
      c: the config.
      for_plan: the checks of a memory plan (``effopd_jax.plan``, ``plan_only``), which reads no
        weights, prompts or tokenizer: paths are checked for their type only (a model's ``path``
        may be empty; the plan then needs its ``hf_name``), and every prompt-file field counts as
        given, so the evaluation and EffOPD settings that need files are checked as if they were
        set (a shipped config that leaves the files to the user plans as it is).

    Raises:
      ValueError: the message starts ``config.<field>: `` (``config.teachers[0].path: ``).
    """
    if not is_group(c):
        raise ValueError(f"config: must be a ConfigDict, got {show(c)}")
    if for_plan:
        assume = {field.name: PLAN_PROMPT_FILES for field in FIELDS if isinstance(field.kind, PromptFiles)}
        values = check_settings(c, _plan_fields(FIELDS), assume=assume)
        values.update(assume)
    else:
        values = check_settings(c, FIELDS)
    for rule in CROSS_RULES:
        problem = rule.violation(values)
        if problem:
            field, problem = problem if isinstance(problem, tuple) else (rule.field, problem)
            raise ValueError(f"config.{field}: {problem}")


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
