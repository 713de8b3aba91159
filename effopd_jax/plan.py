"""Ahead-of-time memory plan of one OPD step: every jitted program compiled for a target slice.

    python -m effopd_jax.plan --config=configs/qwen3_1p7b_opd_effopd.py --topology=v5p:4x4x4
    python -m effopd_jax.plan --config=configs/tiny_cpu.py --topology=8xH100-80GB --config.rollout.max_new_tokens=512

Lowers and compiles the trainer's programs of one step -- the rollout (prefill + decode), the
teacher's scoring (and G-OPD's reference model), the update, EffOPD's candidate build and the
rollouts that score candidates and evaluate -- for the target's devices, with **abstract shapes
only**: every argument is a ``jax.ShapeDtypeStruct`` built from the models' ``config.json``
(``models.config_from_hf`` + ``models.abstract_params``) and laid out by the trainer's sharding
rules (``effopd_jax/sharding.py``) on the config's mesh. No weights, prompts or tokenizer are
read. A model's architecture comes from its ``path`` (an HF directory or ``config.json``) or,
when that is empty, from the bundled config its ``hf_name`` names (``effopd_jax.published_configs``),
so a shipped config plans as it is.

Targets (``--topology``):
  ``v5e:4x4``, ``v5p:4x4x4``, ``v6e:8x8``, ``v4:2x2x2``, ...   TPU slices, compiled on this machine by
      XLA:TPU through ``jax.experimental.topologies`` (needs ``libtpu``: ``pip install
      "jax[tpu]==<jax version>"``; no TPU is needed).
  ``8xH100-80GB``, ``4xH200``, ``8xA100-80GB``, ...   GPU nodes: an **estimate** -- the same sharded
      programs compiled by XLA:CPU on as many virtual CPU devices (in a subprocess with
      ``--xla_force_host_platform_device_count``); XLA:GPU's fusion and buffer assignment differ.
  The trainer's own devices: ``--config.plan_only=True`` on ``python -m effopd_jax.train``.

What one row of the table means, per device, from ``compiled.memory_analysis()``: the program's
``arguments``, ``outputs``, the part of the outputs ``aliased`` to donated arguments, and its
``temporaries``: XLA's peak (``peak_memory_in_bytes``) less the arguments and the non-aliased
outputs, or ``temp_size_in_bytes`` where that is larger (XLA:TPU's ``temp_size_in_bytes`` leaves
out some buffers its peak counts; XLA:CPU's peak counts no temporaries). ``resident``: the other
buffers the trainer holds on the devices while the program runs (e.g. the teacher's params during
the update, the optimizer state during the rollout). ``peak`` = arguments + outputs - aliased +
temporaries + resident. XLA:TPU refuses to compile a program whose temporaries exceed the chip's
memory: the plan then reports the temporaries XLA asked for, the arguments from their abstract
shapes, no outputs, and the peak as a lower bound (``>=`` in the table, ``"exact": false``).
A program fits when its peak is at most the usable memory (the chip's memory times
``--memory_fraction``; 1.0 on TPU, 0.75 on GPU: JAX's default ``XLA_PYTHON_CLIENT_MEM_FRACTION``).
The last line printed is one JSON object (see :func:`plan_json`); the exit code is 0 when every
program fits, 1 otherwise (the lines above it name the program and its largest buffer), 2 on
bad input.

A program is an entry in a small registry: :func:`register_programs` (name -> a builder that
returns jitted functions with abstract arguments), and per rollout engine
:func:`register_rollout_programs`. See README.md#memory-plan and docs/architecture.md#how-to-add.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import config as config_lib
from effopd_jax import effopd as effopd_lib
from effopd_jax import models, objectives, published_configs, sampling, teachers
from effopd_jax import sharding as sharding_lib
from effopd_jax.models import ModelConfig
from effopd_jax.objectives import LossSettings, OPDBatch, OPDLoss
from effopd_jax.rollout import Rollout
from effopd_jax.sampling import SamplingSettings
from effopd_jax.trainer import setup
from effopd_jax.trainer.state import FullFineTuning, Parameterization, TrainState, optimizer_state_shardings
from effopd_jax.trainer.step import make_optimizer, update_step

PyTree = Any
Log = Callable[[str], None]

GiB = 2**30
MiB = 2**20

# Memory of one chip, by the name a target uses. TPU: HBM per chip (public specs). GPU: the total
# CUDA reports (nvidia-smi), a little below the marketing figure for the H100 / H200.
CHIP_MEMORY_BYTES: Mapping[str, int] = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "H100-80GB": 81559 * MiB,
    "H200": 143771 * MiB,
    "A100-80GB": 81920 * MiB,
    "A100-40GB": 40960 * MiB,
}
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
GPU_ALIASES = {"h100": "H100-80GB", "h100-80gb": "H100-80GB", "h200": "H200", "h200-141gb": "H200",
               "a100-80gb": "A100-80GB", "a100-40gb": "A100-40GB"}
# JAX preallocates this fraction of a GPU's memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
JAX_GPU_DEFAULT_MEMORY_FRACTION = 0.75

# Set in the subprocess that compiles a GPU target's programs on virtual CPU devices.
_ESTIMATE_CHILD_ENV = "EFFOPD_PLAN_CPU_DEVICES"
# XLA:CPU fuses dot chains into one library call (XNNPACK "ynn" fusions), which hides their
# intermediates from the buffer assignment; a GPU materialises them, so the estimate turns it off.
_CPU_ESTIMATE_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """What the programs are compiled for.

    Attributes:
      name: as given (``"v5p:4x4x4"``, ``"8xH100-80GB"``, ``"local"``).
      platform: ``"tpu"`` (a topology compiled by XLA:TPU), ``"gpu"`` (estimated on virtual CPU
        devices) or ``"local"`` (the devices of this process, as the trainer would use them).
      num_devices: devices of the slice (TPU: chips; GPU: GPUs).
      chip: the chip name (a key of :data:`CHIP_MEMORY_BYTES`, or a local device kind).
      device_memory_bytes: memory of one device.
      memory_fraction: the part of it a run may use.
    """

    name: str
    platform: str
    num_devices: int
    chip: str
    device_memory_bytes: int
    memory_fraction: float

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory_bytes * self.memory_fraction)

    @property
    def estimate(self) -> bool:
        return self.platform == "gpu"


def parse_target(name: str, *, memory_fraction: float | None = None) -> Target:
    """A TPU topology (``"v5e:4x4"``, ``"v5p:4x4x4"``) or a GPU node (``"8xH100-80GB"``).

    Raises:
      ValueError: an unknown chip or malformed name (the message lists what is known).
    """
    if memory_fraction is not None and not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"--memory_fraction must be in (0, 1], got {memory_fraction}")
    tpu = re.fullmatch(r"(v[0-9a-z]+):(\d+(?:x\d+){1,2})", name)
    if tpu:
        chip, dims = tpu.group(1), tpu.group(2)
        if chip not in TPU_CHIPS:
            raise ValueError(f"--topology={name}: unknown TPU chip {chip!r}; known: {', '.join(TPU_CHIPS)}")
        return Target(name, "tpu", math.prod(int(d) for d in dims.split("x")), chip, CHIP_MEMORY_BYTES[chip],
                      1.0 if memory_fraction is None else memory_fraction)
    gpu = re.fullmatch(r"(\d+)x([A-Za-z0-9-]+)", name)
    if gpu and gpu.group(2).lower() in GPU_ALIASES and int(gpu.group(1)) >= 1:
        chip = GPU_ALIASES[gpu.group(2).lower()]
        return Target(name, "gpu", int(gpu.group(1)), chip, CHIP_MEMORY_BYTES[chip],
                      JAX_GPU_DEFAULT_MEMORY_FRACTION if memory_fraction is None else memory_fraction)
    raise ValueError(
        f"--topology={name}: expected a TPU topology CHIP:AxB[xC] with CHIP in {TPU_CHIPS} (e.g. v5e:4x4, "
        f"v5p:4x4x4) or a GPU node NxGPU with GPU in {sorted(set(GPU_ALIASES.values()))} (e.g. 8xH100-80GB)")


def local_target(devices: Sequence[jax.Device] | None = None) -> Target:
    """The devices this process would train on (``plan_only``): their memory as the runtime
    reports it (``memory_stats()['bytes_limit']``); CPU devices share the host's memory."""
    devices = list(jax.devices() if devices is None else devices)
    device = devices[0]
    stats = None
    with contextlib.suppress(Exception):  # not every runtime reports memory statistics
        stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        memory = int(stats["bytes_limit"])
    elif device.platform == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory = host // max(1, len([d for d in devices if d.process_index == device.process_index]))
    else:
        raise ValueError(f"plan_only: the {device.platform} runtime reports no memory size for {device.device_kind}")
    return Target("local", "local", len(devices), device.device_kind, memory, 1.0)


def target_devices(target: Target) -> list[jax.Device]:
    """The devices the programs are compiled for.

    Raises:
      ValueError: no libtpu for a TPU topology; too few CPU devices for a GPU estimate (the
        command line starts a subprocess with enough).
    """
    if target.platform == "tpu":
        # Compiling only: let several processes load libtpu at once (it otherwise takes a lockfile
        # meant for processes that share a TPU).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            from jax.experimental import topologies  # noqa: PLC0415
            topology = topologies.get_topology_desc(topology_name=target.name, platform="tpu")
        except Exception as e:  # noqa: BLE001  (no libtpu: RuntimeError / ImportError, by jax version)
            raise ValueError(
                f"--topology={target.name}: cannot compile for TPU here ({type(e).__name__}: {str(e)[:300]}). "
                f"Compiling for a TPU topology needs libtpu, no TPU: pip install 'jax[tpu]=={jax.__version__}'"
            ) from None
        devices = list(topology.devices)
        if len(devices) != target.num_devices:
            raise ValueError(f"--topology={target.name}: expected {target.num_devices} chips, libtpu gave {len(devices)}")
        return devices
    if target.platform == "gpu":
        cpus = jax.devices("cpu")
        if len(cpus) < target.num_devices:
            raise ValueError(
                f"--topology={target.name}: an estimate on {target.num_devices} virtual CPU devices needs "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices} before jax starts "
                f"(python -m effopd_jax.plan sets it); this process has {len(cpus)}")
        return cpus[: target.num_devices]
    return list(jax.devices())


# ---------------------------------------------------------------------------------------------
# The abstract step: what a trainer step holds, as sharded ShapeDtypeStructs
# ---------------------------------------------------------------------------------------------


def per_device_bytes(tree: PyTree) -> int:
    """Bytes one device holds of the abstract (or concrete) arrays of ``tree``: each leaf's shard
    shape under its sharding (the whole leaf when it has none) times its item size."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += _leaf_device_bytes(leaf)
    return total


def _leaf_device_bytes(leaf: Any) -> int:
    shape = tuple(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    try:
        itemsize = np.dtype(leaf.dtype).itemsize
    except TypeError:  # extended dtypes (typed PRNG keys): the key data
        itemsize = 8
    return math.prod(shape) * itemsize


def _with_shardings(shapes: PyTree, shardings: PyTree) -> PyTree:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def _array(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)


def model_config(spec: ml_collections.ConfigDict, field: str, *, remat: str = "none") -> ModelConfig:
    """The architecture of ``config.student`` / ``config.teachers[i]`` (``field`` names it): from
    ``spec.path`` (an HF directory or ``config.json``), else from the bundled config of
    ``spec.hf_name``; with the spec's dtypes and layer layout.

    Raises:
      ValueError: neither is set, or the path holds no readable config.json (naming the field).
    """
    if spec.path:
        try:
            source = models.read_hf_config(spec.path)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"config.{field}.path: {e}") from None
    elif spec.hf_name:
        source = published_configs.hf_config(spec.hf_name)
    else:
        raise ValueError(
            f"config.{field}.path is empty and config.{field}.hf_name names no architecture: set one "
            f"(a checkpoint directory or config.json; or one of {', '.join(published_configs.names())})")
    try:
        return models.config_from_hf(source, param_dtype=spec.param_dtype, dtype=spec.compute_dtype,
                                     scan_layers=bool(spec.scan_layers), remat=remat)
    except ValueError as e:
        raise ValueError(f"config.{field}: {e}") from None


def abstract_params(config: ModelConfig, mesh: Mesh) -> PyTree:
    """The params of ``config`` as ``ShapeDtypeStruct``s laid out as the trainer loads them."""
    return _with_shardings(models.abstract_params(config), sharding_lib.param_shardings(config, mesh))


@dataclasses.dataclass(frozen=True)
class AbstractStep:
    """Everything one trainer step holds and the static settings of its programs (see
    ``Trainer.__init__`` / ``Trainer.train_one_step``); arrays are sharded ``ShapeDtypeStruct``s.

    Attributes:
      config: the (plan-validated) config.
      mesh: the config's mesh over the target's devices.
      student, teacher, reference: model configs (``reference``: G-OPD's pi_B, else None).
      rows: rollouts per step; prompt_length, response_length: ``P`` and ``T``.
      loss, loss_settings, parameterization, optimizer: as the trainer builds them.
      sampling: ``SamplingSettings`` by engine purpose (``rollout``, ``effopd_validation``, ``eval``).
      state: the ``TrainState``; frozen_params: the frozen part of the student.
      teacher_params, reference_params: the frozen models (``reference_params`` None without pi_B).
      rollout: one step's ``Rollout``; batch: the scored ``OPDBatch`` the update reads.
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    student: ModelConfig
    teacher: ModelConfig
    reference: ModelConfig | None
    rows: int
    prompt_length: int
    response_length: int
    loss: OPDLoss
    loss_settings: LossSettings
    parameterization: Parameterization
    optimizer: optax.GradientTransformation
    sampling: Mapping[str, SamplingSettings]
    state: TrainState
    frozen_params: PyTree
    teacher_params: PyTree
    reference_params: PyTree | None
    rollout: Rollout
    batch: OPDBatch

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def student_params(self) -> PyTree:
        return self.parameterization.merge(self.state.trainable_params, self.frozen_params)

    def frozen_models(self) -> dict[str, PyTree]:
        """The teacher's (and pi_B's) params by name, as :class:`Program` residents."""
        resident = {"teacher params": self.teacher_params}
        if self.reference_params is not None:
            resident["reference params"] = self.reference_params
        return resident

    def state_less_params(self) -> dict[str, PyTree]:
        """The train state without the student's params (optimizer state, counters, rng)."""
        return {"optimizer state": self.state._replace(trainable_params=())}


def rows_per_step(config: ml_collections.ConfigDict, mesh: Mesh, num_processes: int) -> int:
    """``setup.rows_per_step`` for ``num_processes`` hosts (the target's, not this machine's)."""
    rows = setup.rows_per_step(config, mesh)
    if config.data.prompts_per_step % num_processes:
        raise ValueError(
            f"config.data.prompts_per_step={config.data.prompts_per_step} is not divisible by the "
            f"{num_processes} hosts of the target")
    return rows


def sampling_settings(config: ml_collections.ConfigDict, student: ModelConfig) -> dict[str, SamplingSettings]:
    """The engines' settings by purpose, as ``setup.rollout_engines`` makes them (EOS and pad ids
    from the model config: the plan reads no tokenizer, and they do not change the memory)."""
    eos = student.eos_token_id
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
    pad = student.pad_token_id if isinstance(student.pad_token_id, int) else 0
    common = dict(top_k=config.rollout.top_k, top_p=config.rollout.top_p, eos_token_ids=eos_ids, pad_token_id=pad)
    budgets = {
        "rollout": (config.rollout.temperature, config.rollout.max_new_tokens),
        "effopd_validation": (config.effopd.val_temperature,
                              config.effopd.val_max_new_tokens or config.rollout.max_new_tokens),
        "eval": (config.eval.temperature, config.eval.max_new_tokens or config.rollout.max_new_tokens),
    }
    return {purpose: SamplingSettings(max_new_tokens=max_new, temperature=temperature, **common)
            for purpose, (temperature, max_new) in budgets.items()}


def abstract_step(config: ml_collections.ConfigDict, mesh: Mesh, *, num_processes: int = 1,
                  compile_fn: Callable[[Any], Any] | None = None) -> AbstractStep:
    """The step of ``config`` on ``mesh`` as abstract arrays, laid out as the trainer lays them out.

    ``compile_fn(lowered)`` (default ``lowered.compile()``) compiles what is needed to learn a
    sharding XLA chooses (the teacher's output head of the hidden-state losses).
    """
    compile_fn = compile_fn or (lambda lowered: lowered.compile())
    student = model_config(config.student, "student", remat=config.student.remat)
    teacher = model_config(config.teachers[0], "teachers[0]")
    loss = objectives.get_loss(config.loss.name)
    # Teacher and student score at the sampling temperature (greedy rollouts: T = 1), as the trainer.
    temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
    with_reference = config.loss.name == "sampled_token" and config.loss.reward_scale != 1.0
    rows = rows_per_step(config, mesh, num_processes)
    prompt_length, response_length = config.data.max_prompt_length, config.rollout.max_new_tokens
    replicated = NamedSharding(mesh, P())

    parameterization = FullFineTuning()
    trainable, frozen = parameterization.split(abstract_params(student, mesh))
    optimizer, _ = make_optimizer(config.optimizer, total_steps=config.total_steps, effopd_config=config.effopd,
                                  param_filter=parameterization.param_filter(models.layout(student)))
    opt_state = _with_shardings(jax.eval_shape(optimizer.init, trainable),
                                optimizer_state_shardings(optimizer, trainable, mesh))
    counter = _array((), jnp.int32, replicated)
    state = TrainState(step=counter, trainable_params=trainable, opt_state=opt_state,
                       rng=_array((2,), jnp.uint32, replicated), skipped_updates=counter, consecutive_skips=counter)

    rows_2d = sharding_lib.batch_sharding(mesh, 2)
    rollout = Rollout(
        prompt_ids=_array((rows, prompt_length), jnp.int32, rows_2d),
        prompt_mask=_array((rows, prompt_length), jnp.bool_, rows_2d),
        response_ids=_array((rows, response_length), jnp.int32, rows_2d),
        response_mask=_array((rows, response_length), jnp.bool_, rows_2d),
        behaviour_logprobs=_array((rows, response_length), jnp.float32, rows_2d),
    )
    teacher_params = abstract_params(teacher, mesh)
    batch = OPDBatch(*rollout)
    if loss.teacher_output == "token_logprobs":
        batch = batch._replace(teacher_logprobs=_array((rows, response_length), jnp.float32, rows_2d))
    else:
        head = jax.jit(functools.partial(models.lm_head_weight, teacher))
        with sharding_lib.sharding_context(mesh):
            head_sharding = compile_fn(head.lower(teacher_params)).output_shardings
        batch = batch._replace(
            teacher_hidden=_array((rows, response_length, teacher.hidden_size), teacher.dtype,
                                  sharding_lib.batch_sharding(mesh, 3)),
            teacher_head=_with_shardings(jax.eval_shape(head, teacher_params), head_sharding))
    reference_params = None
    if with_reference:
        reference_params = abstract_params(student, mesh)
        batch = batch._replace(base_logprobs=_array((rows, response_length), jnp.float32, rows_2d))
    loss_settings = LossSettings(
        aggregation=config.loss.aggregation, chunk_size=config.loss.chunk_size, temperature=temperature,
        reward_scale=config.loss.reward_scale, is_threshold=config.loss.is_threshold, topk=config.loss.topk)
    return AbstractStep(
        config=config, mesh=mesh, student=student, teacher=teacher, reference=student if with_reference else None,
        rows=rows, prompt_length=prompt_length, response_length=response_length, loss=loss,
        loss_settings=loss_settings, parameterization=parameterization, optimizer=optimizer,
        sampling=sampling_settings(config, student), state=state, frozen_params=frozen,
        teacher_params=teacher_params, reference_params=reference_params, rollout=rollout, batch=batch)


# ---------------------------------------------------------------------------------------------
# Programs and their registry
# ---------------------------------------------------------------------------------------------


class Program(NamedTuple):
    """One jitted program of a step, ready to lower.

    Attributes:
      fn: the jitted function (``jax.jit(...)``; anything with ``.lower``), the trainer's own.
      args: abstract positional arguments (``ShapeDtypeStruct`` leaves carrying shardings).
      kwargs: keyword arguments of ``lower`` (static arguments).
      resident: the other buffers the trainer holds on the devices while it runs, by what they
        are (``{"teacher params": tree, ...}``); not arguments of the program.
      under_mesh: traced inside ``sharding.sharding_context(mesh)``, as the trainer calls it.
      doc: what it is, one line.
    """

    fn: Any
    args: tuple
    kwargs: Mapping[str, Any] = {}
    resident: Mapping[str, PyTree] = {}
    under_mesh: bool = True
    doc: str = ""


ProgramBuilder = Callable[[AbstractStep], dict[str, Program]]
RolloutProgramBuilder = Callable[[AbstractStep, SamplingSettings, PyTree], dict[str, Program]]
"""``(step, settings, params) -> {suffix: Program}``: an engine's programs for one purpose, with
``params`` the student params it samples from; suffix ``""`` for a single program, else e.g.
``"prefill"`` / ``"decode"`` (named ``<purpose>_<suffix>``). Residents are added by the caller."""

_PROGRAMS: dict[str, ProgramBuilder] = {}
_ROLLOUT_PROGRAMS: dict[str, RolloutProgramBuilder] = {}


def register_programs(name: str, builder: ProgramBuilder) -> None:
    """Adds (or, for an existing ``name``, replaces) a group of programs of the step; groups are
    planned in registration order. ``builder(step)`` returns ``{program name: Program}`` ({} when
    the config does not run them)."""
    _PROGRAMS[name] = builder


def register_rollout_programs(engine: str, builder: RolloutProgramBuilder) -> None:
    """The programs of rollout engine ``engine`` (``config.rollout.engine``) for the plan."""
    _ROLLOUT_PROGRAMS[engine] = builder


def program_groups() -> tuple[str, ...]:
    """The registered groups, in planning order."""
    return tuple(_PROGRAMS)


def _static_engine_programs(step: AbstractStep, settings: SamplingSettings, params: PyTree) -> dict[str, Program]:
    """``StaticEngine``: one program, prefill + ``lax.while_loop`` decode over a dense KV cache of
    ``prompt_length + max_new_tokens`` slots for every row (allocated, then donated to it)."""
    config, mesh = step.student, step.mesh
    cache_shapes = jax.eval_shape(
        lambda: models.init_cache(config, step.rows, step.prompt_length + settings.max_new_tokens, config.dtype))
    cache = _with_shardings(cache_shapes, sharding_lib.cache_shardings(config, mesh))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=step.replicated)
    # The static engine's own jitted sampler (what StaticEngine.generate -> generate_padded calls).
    return {"": Program(
        fn=sampling._sample_padded_jit,  # noqa: SLF001
        args=(params, step.rollout.prompt_ids, step.rollout.prompt_mask, key, cache),
        kwargs=dict(config=config, settings=settings, mesh=mesh),
        doc=f"static engine: prefill + decode, {step.rows} rows x {step.prompt_length}+{settings.max_new_tokens} "
            "KV slots")}


register_rollout_programs("static", _static_engine_programs)


def rollout_programs(step: AbstractStep, purpose: str, params: PyTree,
                     resident: Mapping[str, PyTree]) -> dict[str, Program]:
    """The programs of the configured engine for ``purpose`` (``rollout``, ``effopd_validation``,
    ``eval``), named ``<purpose>_rollout[_<suffix>]``, with ``resident`` added."""
    engine = step.config.rollout.engine
    if engine not in _ROLLOUT_PROGRAMS:
        raise ValueError(
            f"config.rollout.engine={engine!r}: the memory plan has no programs for this engine; register them "
            f"with effopd_jax.plan.register_rollout_programs (registered: {sorted(_ROLLOUT_PROGRAMS)})")
    programs = _ROLLOUT_PROGRAMS[engine](step, step.sampling[purpose], params)
    base = "rollout" if purpose == "rollout" else f"{purpose}_rollout"
    return {(f"{base}_{suffix}" if suffix else base): program._replace(resident={**resident, **program.resident})
            for suffix, program in programs.items()}


def _optimizer_init_program(step: AbstractStep) -> dict[str, Program]:
    """``trainer.state.init_optimizer_state``: the optimizer's state laid out like the params."""
    params = step.state.trainable_params
    init = jax.jit(step.optimizer.init, out_shardings=optimizer_state_shardings(step.optimizer, params, step.mesh))
    return {"optimizer_init": Program(
        fn=init, args=(params,), resident=step.frozen_models(),
        doc="start-up: the optimizer's state (AdamW moments" + (", EffOPD's anchor" if step.config.effopd.enabled
                                                                else "") + ") of the trainable params")}


def _rollout_program(step: AbstractStep) -> dict[str, Program]:
    return rollout_programs(step, "rollout", step.student_params(),
                            {**step.state_less_params(), **step.frozen_models()})


def _scoring_programs(step: AbstractStep) -> dict[str, Program]:
    """The teacher's scoring of the rollout (``Teacher.score``), and G-OPD's pi_B
    (``Teacher.score_reference``) when ``loss.reward_scale != 1``."""
    chunk_size, temperature = step.config.loss.chunk_size, step.loss_settings.temperature
    if step.loss.teacher_output == "token_logprobs":
        score = jax.jit(functools.partial(teachers.score_token_logprobs, step.teacher, temperature=temperature,
                                          chunk_size=chunk_size))
        teacher_output = {"teacher log-probs": step.batch.teacher_logprobs}
    else:
        score = jax.jit(functools.partial(teachers.score_hidden_states, step.teacher))
        teacher_output = {"teacher hidden states": (step.batch.teacher_hidden, step.batch.teacher_head)}
    resident = {"train state": step.state}
    if step.reference_params is not None:
        resident["reference params"] = step.reference_params
    programs = {"teacher_scoring": Program(
        fn=score, args=(step.teacher_params, step.rollout), resident=resident,
        doc=f"teacher forward over {step.rows} x {step.prompt_length + step.response_length} tokens")}
    if step.reference is not None:
        score_reference = jax.jit(functools.partial(teachers.score_token_logprobs, step.reference,
                                                    temperature=temperature, chunk_size=chunk_size))
        programs["reference_scoring"] = Program(
            fn=score_reference, args=(step.reference_params, step.rollout),
            resident={"train state": step.state, "teacher params": step.teacher_params, **teacher_output},
            doc="G-OPD's pi_B forward (the initial student)")
    return programs


def _update_program(step: AbstractStep) -> dict[str, Program]:
    """``Trainer.update``: ``update_step`` jitted with the state donated and its shardings kept."""
    state_shardings = jax.tree.map(lambda x: x.sharding, step.state)
    update = jax.jit(
        functools.partial(update_step, optimizer=step.optimizer, model_config=step.student,
                          parameterization=step.parameterization, loss=step.loss, settings=step.loss_settings),
        out_shardings=(state_shardings, step.replicated),
        donate_argnums=(0,),
    )
    return {"update": Program(
        fn=update, args=(step.state, step.batch, step.frozen_params), resident=step.frozen_models(),
        doc=f"loss + gradient + AdamW over {step.rows} rows")}


def _anchor(opt_state: PyTree) -> PyTree:
    return effopd_lib.find_effopd_state(opt_state).anchor


def _without_anchor(opt_state: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x._replace(anchor=()) if isinstance(x, effopd_lib.EffOPDState) else x,
                        opt_state, is_leaf=lambda x: isinstance(x, effopd_lib.EffOPDState))


def _effopd_programs(step: AbstractStep) -> dict[str, Program]:
    """EffOPD's host search (``Trainer.effopd_search``): each candidate theta_B + m (theta - theta_B)
    is built by one jitted program, then scored by the validation engine's rollouts while the
    whole train state, the frozen models and the step's batch stay on the devices."""
    if not step.config.effopd.enabled:
        return {}
    params = step.state.trainable_params
    multiplier = _array((), jnp.float32, step.replicated)
    # effopd_host_search's own jitted builder (outside the sharding context, as the trainer calls it).
    candidate = Program(
        fn=effopd_lib._candidate_point_jit,  # noqa: SLF001
        args=(params, None, _anchor(step.state.opt_state), multiplier), under_mesh=False,
        resident={"optimizer state (less the anchor)": step.state._replace(
                      trainable_params=(), opt_state=_without_anchor(step.state.opt_state)),
                  **step.frozen_models(), "step batch": step.batch},
        doc="one extrapolated candidate of the student's params")
    candidate_params = step.parameterization.merge(params, step.frozen_params)
    validation = rollout_programs(step, "effopd_validation", candidate_params,
                                  {"train state": step.state, **step.frozen_models(), "step batch": step.batch})
    return {"effopd_candidate": candidate, **validation}


def _eval_programs(step: AbstractStep) -> dict[str, Program]:
    """``Trainer.evaluate`` (``eval_every`` > 0 or eval files given): the eval engine's rollouts."""
    config = step.config
    if not (config.eval_every > 0 or config.data.eval_files):
        return {}
    return rollout_programs(step, "eval", step.student_params(),
                            {**step.state_less_params(), **step.frozen_models()})


register_programs("optimizer_init", _optimizer_init_program)
register_programs("rollout", _rollout_program)
register_programs("scoring", _scoring_programs)
register_programs("update", _update_program)
register_programs("effopd", _effopd_programs)
register_programs("eval", _eval_programs)


# ---------------------------------------------------------------------------------------------
# Compiling and measuring
# ---------------------------------------------------------------------------------------------


class ProgramMemory(NamedTuple):
    """Per-device bytes of one compiled program (see the module docstring). ``exact`` is False when
    XLA refused to compile it for lack of memory: ``peak_bytes`` is then a lower bound."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    xla_temp_bytes: int
    resident_bytes: int
    peak_bytes: int
    largest_buffer: str
    compile_seconds: float
    exact: bool = True


@dataclasses.dataclass(frozen=True)
class Plan:
    """A finished plan: the target, the mesh and the figures of every program."""

    target: Target
    mesh_shape: Mapping[str, int]
    rows: int
    prompt_length: int
    response_length: int
    programs: Mapping[str, ProgramMemory]
    docs: Mapping[str, str]
    config_name: str = ""

    @property
    def fits(self) -> bool:
        return not self.too_large()

    @property
    def largest(self) -> str:
        """The program with the largest peak."""
        return max(self.programs, key=lambda name: self.programs[name].peak_bytes)

    def too_large(self) -> list[str]:
        """The programs that do not fit (XLA refused, or the peak exceeds the usable memory)."""
        return [name for name, p in self.programs.items()
                if not p.exact or p.peak_bytes > self.target.usable_bytes]


_DTYPE_BYTES = {"pred": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_HLO_ARRAY = re.compile(r"\b(pred|bf16|f8e\w+|[fsuc]\d+)\[([\d,]*)\]")
_HLO_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s")
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_HLO_CALLEES = re.compile(r"\b(?:body|condition|true_computation|false_computation|to_apply|calls)=%([\w.\-]+)")
_HLO_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
# Opcodes whose result is another buffer seen elsewhere (an argument, an operand, a loop's carry).
_HLO_NO_NEW_BUFFER = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
                      "opt-barrier", "async-done", "copy-done", "all-reduce-done", "all-gather-done"}


def _hlo_array_bytes(dtype: str, dims: str) -> int:
    if dtype in _DTYPE_BYTES:
        itemsize = _DTYPE_BYTES[dtype]
    elif dtype.startswith("f8"):
        itemsize = 1
    else:  # s8, u32, ...: the bit width
        itemsize = max(1, int(dtype[1:]) // 8)
    return math.prod(int(d) for d in dims.split(",") if d) * itemsize


def largest_hlo_buffer(hlo_text: str) -> tuple[int, str]:
    """The largest array an optimized (per-device) HLO module materialises outside fusions:
    ``(bytes, "dtype[dims] from 'op_name'")``; ``(0, "")`` when there is none.

    Walks the computations the entry runs (the entry, loop bodies and conditions, branches and
    called computations; not fusion bodies, whose intermediates stay in registers / VMEM) and
    takes every instruction's result array, skipping results that are another buffer (parameters,
    tuples, loop results).
    """
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header and line.rstrip().endswith("{"):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    best = (0, "")
    seen: set[str] = set()
    pending = [entry] if entry else []
    while pending:
        name = pending.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            match = _HLO_INSTRUCTION.match(line)
            if not match:
                continue
            rest = match.group(2)
            result, _, tail = _split_hlo_type(rest)
            opcode = re.match(r"\s*([\w\-]+)\(", tail)
            opcode = opcode.group(1) if opcode else ""
            if opcode != "fusion":
                pending += _HLO_CALLEES.findall(tail)
                for branches in _HLO_BRANCHES.findall(tail):
                    pending += [b.strip().lstrip("%") for b in branches.split(",") if b.strip()]
            if opcode in _HLO_NO_NEW_BUFFER:
                continue
            for dtype, dims in _HLO_ARRAY.findall(result):
                size = _hlo_array_bytes(dtype, dims)
                if size > best[0]:
                    op_name = re.search(r'op_name="([^"]*)"', tail)
                    where = op_name.group(1) if op_name else f"%{match.group(1)}"
                    best = (size, f"{dtype}[{dims}] from '{where}'")
    return best


def _split_hlo_type(rest: str) -> tuple[str, str, str]:
    """``"f32[2]{0} add(...)"`` -> (``"f32[2]{0}"``, " ", ``"add(...)"``); tuple types kept whole."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], " ", rest[i + 1 :]
    result, space, tail = rest.partition(" ")
    return result, space, tail


_STABLEHLO_OP = re.compile(r"=\s*\"?(stablehlo\.[\w.]+|func\.call|sdy\.\w+)")
_STABLEHLO_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")
_STABLEHLO_ITEM_BYTES = {"i1": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8}


def largest_stablehlo_value(module_text: str) -> tuple[int, str]:
    """The largest value a lowered (not yet partitioned) StableHLO module computes, with its
    global shape: ``(bytes, "f32[16,16,2048,18432] from stablehlo.dot_general")``."""
    best = (0, "")
    for line in module_text.splitlines():
        op = _STABLEHLO_OP.search(line)
        if not op:
            continue
        results = line.rsplit("->", 1)[1] if "->" in line else line.rsplit(" : ", 1)[-1]
        for dims, dtype in _STABLEHLO_TENSOR.findall(results):
            if dtype in _STABLEHLO_ITEM_BYTES:
                itemsize = _STABLEHLO_ITEM_BYTES[dtype]
            elif re.fullmatch(r"u?i\d+|f8\w*", dtype):
                itemsize = max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
            else:
                continue
            shape = [int(d) for d in dims.split("x") if d]
            size = math.prod(shape) * itemsize
            if size > best[0]:
                name = {"i1": "pred", "i32": "s32", "i64": "s64", "ui32": "u32"}.get(dtype, dtype)
                best = (size, f"{name}[{','.join(map(str, shape))}] from {op.group(1)}")
    return best


_XLA_OUT_OF_MEMORY = re.compile(
    r"required for HLO temporaries \(([\d.]+)([KMGTP]?)\) exceeds available HBM \(([\d.]+)([KMGTP]?)\)")


def _out_of_memory(error: Exception) -> tuple[int, int] | None:
    """``(temporaries, available)`` bytes of an XLA:TPU out-of-memory compile error, else None."""
    match = _XLA_OUT_OF_MEMORY.search(str(error))
    if not match or "RESOURCE_EXHAUSTED" not in str(error):
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
    return (int(float(match.group(1)) * scale[match.group(2)]), int(float(match.group(3)) * scale[match.group(4)]))


def _largest_leaf(tree: PyTree, label: str) -> tuple[int, str]:
    best = (0, "")
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        size = _leaf_device_bytes(leaf)
        if size > best[0]:
            dims = ",".join(str(d) for d in leaf.shape)
            best = (size, f"{label} {jax.tree_util.keystr(path)} {np.dtype(leaf.dtype).name}[{dims}]"
                          if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                          else f"{label} {jax.tree_util.keystr(path)}")
    return best


def measure(program: Program, mesh: Mesh, *, compile_fn: Callable[[Any], Any]) -> ProgramMemory:
    """Lowers and compiles ``program`` (``compile_fn(lowered)``) and reads its memory analysis."""
    start = time.perf_counter()
    context = sharding_lib.sharding_context(mesh) if program.under_mesh else contextlib.nullcontext()
    with context:
        lowered = program.fn.lower(*program.args, **program.kwargs)
    try:
        compiled = compile_fn(lowered)
    except Exception as e:  # noqa: BLE001  (XLA reports running out of memory as a runtime error)
        out_of_memory = _out_of_memory(e)
        if out_of_memory is None:
            raise
        return _refused(program, lowered, *out_of_memory, seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    arguments, outputs = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
    # XLA:TPU's peak counts some temporaries that temp_size leaves out; XLA:CPU's peak counts none.
    xla_peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    temporaries = max(temp, xla_peak - (arguments + outputs - alias))
    resident = per_device_bytes(program.resident)

    candidates = [_largest_leaf(program.args, "argument")]
    candidates += [_largest_leaf(tree, f"resident {label}") for label, tree in program.resident.items()]
    hlo_bytes, hlo_what = largest_hlo_buffer(compiled.as_text())
    if hlo_bytes:
        candidates.append((hlo_bytes, f"buffer {hlo_what}"))
    size, what = max(candidates, key=lambda c: c[0])
    return ProgramMemory(arguments, outputs, alias, temporaries, temp, resident,
                         arguments + outputs - alias + temporaries + resident, f"{what} ({size / GiB:.2f} GiB)", seconds)


def _refused(program: Program, lowered: Any, temporaries: int, available: int, *, seconds: float) -> ProgramMemory:
    """What is known of a program XLA refused to compile for lack of memory: a lower bound."""
    arguments = per_device_bytes(program.args)
    resident = per_device_bytes(program.resident)
    candidates = [_largest_leaf(program.args, "argument")]
    candidates += [_largest_leaf(tree, f"resident {label}") for label, tree in program.resident.items()]
    size, what = max(candidates, key=lambda c: c[0])
    value_bytes, value = largest_stablehlo_value(lowered.as_text())
    largest = (f"XLA refused to compile: temporaries {temporaries / GiB:.2f} GiB > {available / GiB:.2f} GiB "
               f"available; largest value {value} ({value_bytes / GiB:.2f} GiB before partitioning); "
               f"largest argument / resident: {what} ({size / GiB:.2f} GiB)")
    return ProgramMemory(arguments, 0, 0, temporaries, temporaries, resident, arguments + temporaries + resident,
                         largest, seconds, exact=False)


class CompileCache:
    """Compiles each distinct lowered program once (programs of several purposes often match:
    the validation and eval rollouts usually equal the training rollout's); a failure is
    remembered and raised again."""

    def __init__(self):
        self._compiled: dict[str, Any] = {}

    def __call__(self, lowered: Any) -> Any:
        key = hashlib.sha256(lowered.as_text().encode()).hexdigest()
        if key not in self._compiled:
            try:
                self._compiled[key] = lowered.compile()
            except Exception as e:  # noqa: BLE001
                self._compiled[key] = e
        if isinstance(self._compiled[key], Exception):
            raise self._compiled[key]
        return self._compiled[key]


def make_plan(config: ml_collections.ConfigDict, target: Target, *, devices: Sequence[jax.Device] | None = None,
              log: Log = lambda line: print(line, file=sys.stderr, flush=True), config_name: str = "") -> Plan:
    """Compiles every program of one step of ``config`` for ``target`` and measures them.

    Args:
      config: a config; checked with ``validate_config(config, for_plan=True)``.
      target: from :func:`parse_target` or :func:`local_target`.
      devices: the devices to compile for (default :func:`target_devices`).
      log: progress lines (one per program).
      config_name: how the report names the config.

    Raises:
      ValueError: a bad config (naming the field), an unknown engine, a target that cannot be
        compiled for here.
    """
    config_lib.validate_config(config, for_plan=True)
    devices = list(target_devices(target) if devices is None else devices)
    mesh = setup.make_mesh(config, devices)
    num_processes = len({d.process_index for d in devices})
    cache = CompileCache()
    started = time.perf_counter()
    log(f"plan: {target.name}, {len(devices)} devices, mesh {dict(mesh.shape)}; building the abstract step")
    if target.estimate and not all(flag in os.environ.get("XLA_FLAGS", "") for flag in _CPU_ESTIMATE_XLA_FLAGS):
        log(f"plan: warning: XLA_FLAGS lacks {' '.join(_CPU_ESTIMATE_XLA_FLAGS)}: XLA:CPU's library fusions hide "
            "the temporaries of fused dot chains (python -m effopd_jax.plan sets it)")
    step = abstract_step(config, mesh, num_processes=num_processes, compile_fn=cache)
    results: dict[str, ProgramMemory] = {}
    docs: dict[str, str] = {}
    for group, builder in _PROGRAMS.items():
        for name, program in builder(step).items():
            if name in results:
                raise ValueError(f"plan: program {name!r} of group {group!r} is already planned")
            log(f"plan: compiling {name} ...")
            results[name] = measure(program, mesh, compile_fn=cache)
            docs[name] = program.doc
            bound = "" if results[name].exact else ">= "
            log(f"plan: {name}: peak {bound}{results[name].peak_bytes / GiB:.2f} GiB per device "
                f"({results[name].compile_seconds:.1f} s)")
    log(f"plan: done in {time.perf_counter() - started:.0f} s")
    return Plan(target=target, mesh_shape=dict(mesh.shape), rows=step.rows, prompt_length=step.prompt_length,
                response_length=step.response_length, programs=results, docs=docs, config_name=config_name)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_report(plan: Plan) -> str:
    """The human-readable table and verdict (everything but the JSON line)."""
    target = plan.target
    usable = target.usable_bytes
    what = {"tpu": "XLA:TPU via jax.experimental.topologies",
            "gpu": f"ESTIMATE: XLA:CPU on {target.num_devices} virtual CPU devices standing in for the GPUs",
            "local": "this process's devices"}[target.platform]
    lines = [
        f"Memory plan{' of ' + plan.config_name if plan.config_name else ''} on {target.name}: "
        f"{target.num_devices} x {target.chip}, {_gib(target.device_memory_bytes)} GiB per device, usable "
        f"{_gib(usable)} GiB ({target.memory_fraction:g}); compiled by {what}",
        f"mesh {plan.mesh_shape}; {plan.rows} rows x ({plan.prompt_length} prompt + {plan.response_length} "
        f"response) tokens per step; GiB per device",
        "",
    ]
    header = ("program", "arguments", "outputs", "aliased", "temporaries", "resident", "peak", "fits")
    rows = []
    too_large = plan.too_large()
    for name, p in plan.programs.items():
        bound = "" if p.exact else ">="
        rows.append((name, _gib(p.argument_bytes), "?" if not p.exact else _gib(p.output_bytes),
                     "?" if not p.exact else _gib(p.alias_bytes), bound + _gib(p.temp_bytes),
                     _gib(p.resident_bytes), bound + _gib(p.peak_bytes), "NO" if name in too_large else "yes"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
    lines.append("")
    for name, p in plan.programs.items():
        lines.append(f"  {name}: {plan.docs.get(name, '')}; largest: {p.largest_buffer}")
    lines.append("")
    if plan.fits:
        lines.append(f"fits: every program's peak is within {_gib(usable)} GiB per device "
                     f"(largest: {plan.largest}, {_gib(plan.programs[plan.largest].peak_bytes)} GiB)")
    else:
        for name in too_large:
            p = plan.programs[name]
            lines.append(f"DOES NOT FIT: {name} needs {'' if p.exact else 'at least '}{_gib(p.peak_bytes)} GiB per "
                         f"device > {_gib(usable)} GiB usable; largest buffer: {p.largest_buffer}")
    if target.estimate:
        lines.append("estimate: XLA:CPU's buffer assignment of the same sharded programs; XLA:GPU fuses and "
                     "schedules differently, so leave a margin")
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan's last line: ``{"topology", "devices", "device_memory_bytes", "usable_bytes",
    "estimate", "mesh", "programs": {name: {"argument_bytes", "output_bytes", "temp_bytes",
    "peak_bytes", "alias_bytes", "resident_bytes", "xla_temp_bytes", "largest_buffer", "exact"}}, "fits",
    "largest", "too_large"}`` (bytes per device; ``largest``: the program with the largest peak;
    ``too_large``: the programs that do not fit)."""
    return {
        "topology": plan.target.name,
        "devices": plan.target.num_devices,
        "device_memory_bytes": plan.target.device_memory_bytes,
        "usable_bytes": plan.target.usable_bytes,
        "estimate": plan.target.estimate,
        "mesh": dict(plan.mesh_shape),
        "programs": {
            name: {"argument_bytes": p.argument_bytes, "output_bytes": p.output_bytes, "temp_bytes": p.temp_bytes,
                   "peak_bytes": p.peak_bytes, "alias_bytes": p.alias_bytes, "resident_bytes": p.resident_bytes,
                   "xla_temp_bytes": p.xla_temp_bytes, "largest_buffer": p.largest_buffer, "exact": p.exact}
            for name, p in plan.programs.items()
        },
        "fits": plan.fits,
        "largest": plan.largest,
        "too_large": plan.too_large(),
    }


def print_plan(plan: Plan) -> int:
    """Prints the report and, as the last line, the JSON; returns the exit code (0 fits, 1 not)."""
    print(format_report(plan), flush=True)
    print(json.dumps(plan_json(plan)), flush=True)
    return 0 if plan.fits else 1


def plan_only(config: ml_collections.ConfigDict) -> int:
    """``python -m effopd_jax.train --config.plan_only=True``: the plan on the trainer's devices,
    printed by process 0; returns the exit code (0 fits, 1 not, 2 bad input)."""
    is_main = jax.process_index() == 0
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if is_main else (lambda line: None)
    try:
        plan = make_plan(config, local_target(), log=log)
    except ValueError as e:
        print(f"effopd_jax.train (plan_only): {e}", file=sys.stderr, flush=True)
        return 2
    if not is_main:
        return 0 if plan.fits else 1
    return print_plan(plan)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _run_estimate_in_subprocess(num_devices: int) -> int:
    """Re-runs this command with ``num_devices`` virtual CPU devices (they must exist before jax
    starts) and the estimate's XLA:CPU flags; returns its exit code."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_ESTIMATE_CHILD_ENV: str(num_devices)})
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}",
                                 *_CPU_ESTIMATE_XLA_FLAGS])
    return subprocess.call([sys.executable, "-m", "effopd_jax.plan", *sys.argv[1:]], env=env)


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config = flags.FLAGS.config
    try:
        target = parse_target(flags.FLAGS.topology, memory_fraction=flags.FLAGS.memory_fraction)
    except ValueError as e:
        print(f"effopd_jax.plan: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if target.platform == "gpu" and os.environ.get(_ESTIMATE_CHILD_ENV) != str(target.num_devices):
        raise SystemExit(_run_estimate_in_subprocess(target.num_devices))
    try:
        plan = make_plan(config, target, config_name=config_flags.get_config_filename(flags.FLAGS["config"]))
    except ValueError as e:
        print(f"effopd_jax.plan: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    raise SystemExit(print_plan(plan))


def _define_flags() -> None:
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", None, "Path to a config file exporting get_config().")
    flags.DEFINE_string("topology", None, "TPU topology (v5e:4x4, v5p:4x4x4, v6e:8x8) or GPU node (8xH100-80GB).")
    flags.DEFINE_float("memory_fraction", None,
                       "part of each device's memory a run may use; default 1.0 on TPU, 0.75 on GPU (JAX's default "
                       "XLA_PYTHON_CLIENT_MEM_FRACTION: pass the value you run with)")
    flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
    from absl import app  # noqa: PLC0415

    _define_flags()
    if any(arg in ("-h", "--help", "--helpshort") for arg in sys.argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    app.run(main)
