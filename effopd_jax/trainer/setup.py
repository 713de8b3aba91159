"""The trainer's set-up, as small factories: mesh, prompts, models, engines, optimizer state.

Each function reads a validated config (``effopd_jax.config``) and refuses inconsistent input
with a ValueError naming the setting, before anything is compiled. :class:`Trainer` calls them
in order; a custom loop can call them too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from effopd_jax import convert, data, models, monitor
from effopd_jax import sharding as sharding_lib
from effopd_jax.models import ModelConfig
from effopd_jax.objectives import OPDLoss
from effopd_jax.rollout import RolloutEngine, make_rollout_engine
from effopd_jax.sampling import SamplingSettings
from effopd_jax.teachers import Teacher, TeacherPrompts, TeacherSet

PyTree = Any
Log = Callable[..., None]


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh of ``config.mesh`` over ``devices`` (default: all)."""
    try:
        return sharding_lib.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp,
                                      tensor=config.mesh.tensor, devices=devices)
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from e


def rows_per_step(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    """Rollouts per step (prompts x samples per prompt), checked to split over the mesh's batch
    shards and the processes."""
    rows = config.data.prompts_per_step * config.rollout.samples_per_prompt
    batch_shards = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
    if rows % batch_shards:
        raise ValueError(
            f"config.data.prompts_per_step * rollout.samples_per_prompt = {rows} rollouts "
            f"per step is not divisible by the mesh's batch shards data*fsdp = {batch_shards}")
    if config.data.prompts_per_step % jax.process_count():
        raise ValueError(
            f"config.data.prompts_per_step={config.data.prompts_per_step} is not divisible by the "
            f"process count {jax.process_count()}")
    return rows


class PromptSets(NamedTuple):
    """The tokenized prompts of a run: training, evaluation (may be empty) and EffOPD's
    validation set (empty unless EffOPD is on)."""

    train: list[data.PromptExample]
    eval: list[data.PromptExample]
    validation: list[data.PromptExample]


def load_prompt_sets(config: ml_collections.ConfigDict, tokenizer, log: Log) -> PromptSets:
    """Reads, templates and tokenizes every prompt file, logging what was kept and why not."""
    load_kwargs = dict(
        max_prompt_length=config.data.max_prompt_length,
        chat_template_kwargs=dict(config.data.chat_template_kwargs),
        on_bad_row=config.data.on_bad_row,
        solution_key=config.data.solution_key,
    )
    train, stats = data.load_prompts(list(config.data.train_files), tokenizer, route_key=route_key(config),
                                     **load_kwargs)
    log(f"train data: {stats.summary()}")
    if not train:
        raise ValueError(
            f"config.data.train_files: no prompt left after filtering ({stats.summary()}); "
            "raise config.data.max_prompt_length or fix the files")

    def evaluation_set(files, max_prompts: int, field: str) -> list[data.PromptExample]:
        if not files:
            return []
        examples, stats = data.load_eval_set(list(files), tokenizer, max_examples=max_prompts or None,
                                             **load_kwargs)
        log(f"{field} data: {stats.summary()}")
        if not examples:
            raise ValueError(f"config.{field}_files: no prompt left after filtering ({stats.summary()})")
        return examples

    evaluation = evaluation_set(config.data.eval_files, config.data.max_eval_prompts, "eval")
    validation = (evaluation_set(config.effopd.val_files, config.effopd.val_max_prompts, "effopd.val")
                  if config.effopd.enabled else [])
    return PromptSets(train, evaluation, validation)


def load_model(spec: ml_collections.ConfigDict, mesh: Mesh, *, weights: str = "",
               log: Log = print, role: str = "model") -> tuple[ModelConfig, PyTree]:
    """A model of ``spec`` (``config.student`` or a ``config.teachers`` entry) on ``mesh``.

    The architecture comes from ``spec.path`` (an HF directory, or with ``init="random"`` also
    a ``config.json`` file); the weights from ``weights`` when given (an HF directory or an
    orbax params directory), else from ``spec.path``, else (``init="random"``) a random
    initialisation with ``spec.init_seed``. Weights are read straight into their shards.
    """
    config = models.config_from_hf(
        spec.path, param_dtype=spec.param_dtype, dtype=spec.compute_dtype,
        scan_layers=bool(spec.scan_layers), remat=spec.get("remat", "none"))
    shardings = sharding_lib.param_shardings(config, mesh)
    if not weights and spec.init == "random":
        log(f"{role}: random initialisation (seed {spec.init_seed}) of {spec.path} — for smoke runs "
            "and plans, not for learning anything")
        return config, models.init_params(config, jax.random.key(spec.init_seed), shardings)
    source = weights or spec.path
    if convert.is_orbax_params_dir(source):
        return config, convert.load_orbax_params(source, config, shardings=shardings)
    return config, models.load_params(source, config, shardings)


def load_tokenizer(config: ml_collections.ConfigDict):
    """The student's tokenizer: ``config.tokenizer``, else the student's checkpoint directory."""
    path = config.tokenizer or config.student.path
    if not os.path.isdir(path):
        raise ValueError(
            f"config.tokenizer: no tokenizer directory (the student's path {path!r} is not a "
            "directory); set config.tokenizer")
    return data.load_tokenizer(path)


def route_key(config: ml_collections.ConfigDict) -> str | None:
    """The row field that routes training rows to teachers (``routing.key``), or None: one
    teacher, or a mixture."""
    if len(config.teachers) > 1 and config.routing.mode == "data_source" and config.routing.key != "data_source":
        return config.routing.key
    return None  # the row's data_source (with load_prompts' default for rows without one)


def _teacher_prompts(config: ml_collections.ConfigDict, spec: ml_collections.ConfigDict, field: str,
                     student_tokenizer) -> TeacherPrompts | None:
    """How teacher ``spec`` renders its own prompts, or None when it scores the student's prompt
    ids (no tokenizer, chat template, template variables or context of its own)."""
    if not (spec.tokenizer or spec.chat_template or spec.chat_template_kwargs is not None or spec.context_template):
        return None
    tokenizer = student_tokenizer
    if spec.tokenizer:
        tokenizer = data.load_tokenizer(spec.tokenizer)
        if tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise ValueError(
                f"{field}.tokenizer: teacher {spec.name!r}'s tokenizer maps tokens to different ids than the "
                "student's; token-level distillation needs one vocabulary")
    chat_template = None
    if spec.chat_template:
        with open(spec.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
    kwargs = config.data.chat_template_kwargs if spec.chat_template_kwargs is None else spec.chat_template_kwargs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TeacherPrompts(
        tokenizer=tokenizer, chat_template_kwargs=dict(kwargs),
        max_length=spec.max_prompt_length or config.data.max_prompt_length, pad_token_id=pad,
        chat_template=chat_template, context_template=spec.context_template,
        missing_solution=spec.missing_solution)


def load_teachers(config: ml_collections.ConfigDict, mesh: Mesh, tokenizer, *, loss: OPDLoss,
                  temperature: float, student_config: ModelConfig, initial_params: PyTree,
                  train_examples: Sequence[data.PromptExample], reference: Teacher | None = None,
                  rows_per_step: int | None = None, log: Log = print) -> TeacherSet:
    """The run's teachers (``config.teachers``), routed by ``config.routing``, with their own
    prompts rendered for every training example (:meth:`TeacherSet.prepare`).

    Each teacher is checked to score every token id the student's tokenizer can emit (its
    vocabulary, and its own tokenizer's token-to-id map), refused by name otherwise. A
    ``student_initial`` teacher shares G-OPD's pi_B params when pi_B is also the initial student,
    else holds a copy of ``initial_params``; a ``student_live`` teacher holds none (the trainer
    hands it the student's params at each step).
    """
    teachers = []
    reference_is_initial = reference is not None and not config.loss.base_path
    for index, spec in enumerate(config.teachers):
        field = f"config.teachers[{index}]"
        if spec.model == "own":
            teacher_config, params = load_model(spec, mesh, log=log, role=f"teacher {spec.name!r}")
            student_vocab = len(tokenizer)
            if teacher_config.vocab_size < student_vocab:
                raise ValueError(
                    f"{field}.path: teacher {spec.name!r}'s vocabulary ({teacher_config.vocab_size} rows) cannot "
                    f"score the student's tokens (tokenizer has {student_vocab} ids)")
        elif spec.model == "student_initial":
            teacher_config = student_config
            if reference_is_initial:
                params = reference.params
                log(f"teacher {spec.name!r}: the initial student, sharing G-OPD's pi_B params")
            else:
                params = jax.tree.map(lambda x: jnp.array(x, copy=True), initial_params)
                log(f"teacher {spec.name!r}: the initial student (a frozen copy of its weights)")
        else:
            teacher_config, params = student_config, None
            log(f"teacher {spec.name!r}: the live student (its current weights, no copy)")
        teachers.append(Teacher(
            name=spec.name, config=teacher_config, params=params, output=loss.teacher_output,
            temperature=temperature, chunk_size=config.loss.chunk_size,
            prompts=_teacher_prompts(config, spec, field, tokenizer), live=spec.model == "student_live",
            data_sources=tuple(spec.data_sources), weight=float(spec.weight),
            rows_per_forward=spec.rows_per_forward))
    if len(teachers) == 1:
        routing, default = "single", None
    else:
        routing = config.routing.mode
        default = config.routing.default_teacher or None if routing == "data_source" else None
    try:
        teacher_set = TeacherSet(teachers, mesh=mesh, routing=routing, default_teacher=default,
                                 rows_per_step=rows_per_step)
    except ValueError as e:
        raise ValueError(f"config.teachers: {e}") from None
    try:
        teacher_set.prepare(train_examples, log=log)
    except ValueError as e:
        raise ValueError(f"config.teachers: {e}") from None
    return teacher_set


def load_reference(config: ml_collections.ConfigDict, mesh: Mesh, *, temperature: float,
                   log: Log = print) -> Teacher | None:
    """G-OPD's reference model pi_B (``loss.reward_scale != 1``): ``loss.base_path``, else the
    initial student. None otherwise. It stays fixed (EffOPD's anchor is separate; see
    docs/effopd_rule.md#interaction-with-g-opd)."""
    if config.loss.name != "sampled_token" or config.loss.reward_scale == 1.0:
        return None
    weights = config.loss.base_path or config.init_from
    reference_config, params = load_model(config.student, mesh, weights=weights, log=log,
                                          role="G-OPD reference model")
    return Teacher(name="reference", config=reference_config, params=params, output="token_logprobs",
                   temperature=temperature, chunk_size=config.loss.chunk_size)


def eos_token_ids(model_config: ModelConfig, tokenizer) -> tuple[int, ...]:
    """Every id that ends a response: the model config's EOS id(s) and the tokenizer's."""
    ids = set()
    eos = model_config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def rollout_engines(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: Mesh,
                    tokenizer) -> dict[str, RolloutEngine]:
    """The engines of a run, by purpose: ``"rollout"`` (training samples), ``"validation"``
    (EffOPD's candidate scoring) and ``"eval"`` (evaluation), each with its own temperature and
    response budget; top-k / top-p are the rollout's."""
    common = dict(top_k=config.rollout.top_k, top_p=config.rollout.top_p,
                  eos_token_ids=eos_token_ids(model_config, tokenizer),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    budgets = {
        "rollout": (config.rollout.temperature, config.rollout.max_new_tokens),
        "validation": (config.effopd.val_temperature,
                       config.effopd.val_max_new_tokens or config.rollout.max_new_tokens),
        "eval": (config.eval.temperature, config.eval.max_new_tokens or config.rollout.max_new_tokens),
    }
    return {
        purpose: make_rollout_engine(
            config.rollout.engine, model_config=model_config, mesh=mesh,
            prompt_length=config.data.max_prompt_length,
            settings=SamplingSettings(max_new_tokens=max_new, temperature=temperature, **common))
        for purpose, (temperature, max_new) in budgets.items()
    }


def make_monitor(config: ml_collections.ConfigDict, initial_params: PyTree,
                 model_config: ModelConfig) -> monitor.Monitor | None:
    """The live foresight monitor (``config.monitor.every > 0``), with W_0 = ``initial_params``."""
    if config.monitor.every <= 0:
        return None
    return monitor.Monitor(
        monitor.MonitorConfig(k=config.monitor.k, every=config.monitor.every, per_layer=False),
        initial_params, models.layout(model_config), seed=config.seed)
