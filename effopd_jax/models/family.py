"""The model seam: a family protocol, the parameter layout, and the registry by HF `model_type`.

Everything outside `effopd_jax/models/` sees a model through three things:

* a **config** (a frozen, hashable dataclass of the family, so it can be a static `jax.jit`
  argument) with at least the fields of :class:`ModelConfig`;
* the family's functions (:class:`ModelFamily`): the forward, its cache, the lm-head weight,
  the logical axes of params and cache, and the config <-> HF `config.json` conversion;
* the **layout** (:class:`ModelLayout`): one :class:`ParamInfo` per parameter leaf, saying what
  the leaf is (an attention / MLP matrix of which layer and module, a norm, the embedding, ...),
  its Hugging Face tensor name(s) and orientation, and whether EffOPD extrapolates it by default.
  Conversion, EffOPD's default filter, the foresight monitor and the offline analysis read it
  instead of hard-coding parameter names.

A family registers itself under the HF `model_type`s it reads (:func:`register_family`);
:func:`family_for` finds it and refuses an unknown type with the list of supported ones.
How to add a family: docs/architecture.md#how-to-add.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

PyTree = Any


class UnsupportedConfigError(ValueError):
    """A Hugging Face config asks for something no registered family implements.

    Raised for unknown `model_type`s and for fields a family refuses (e.g. sliding-window
    attention, RoPE scaling, mixture-of-experts fields); the message names the field.
    """


@runtime_checkable
class ModelConfig(Protocol):
    """What the library reads from any family's config (the family adds its own fields).

    Runtime fields (not part of a checkpoint): `param_dtype` (storage dtype of the params),
    `dtype` (compute dtype), `scan_layers` (layers stacked on a leading axis), `remat`
    (activation checkpointing policy).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    max_position_embeddings: int
    eos_token_id: int | tuple[int, ...] | None
    pad_token_id: int | None
    param_dtype: Any
    dtype: Any
    scan_layers: bool
    remat: str

    def to_hf(self) -> dict[str, Any]: ...

    def to_dict(self) -> dict[str, Any]: ...


# Roles of a parameter leaf.
MATRIX = "matrix"  # a 2-D weight of a decoder layer (kernel [in, out]): what the monitor analyses
BIAS = "bias"
NORM = "norm"
EMBEDDING = "embedding"
LM_HEAD = "lm_head"
CONV = "conv"  # a convolution kernel of a decoder layer (e.g. Qwen3.5's depthwise conv1d)
DECAY = "decay"  # a recurrent state's decay-rate parameter (e.g. Qwen3.5's A_log)
ROLES = (MATRIX, BIAS, NORM, EMBEDDING, LM_HEAD, CONV, DECAY)


@dataclasses.dataclass(frozen=True)
class FusedHF:
    """A second form a checkpoint may store a stacked leaf in: the HF tensors of its last stack
    axis (a mixture of experts' `experts`) fused into one tensor per index of the other stack
    axes (one per layer), e.g. Qwen3.5-MoE's `...mlp.experts.gate_up_proj [E, 2I, H]`.

    The fused tensor is `[n, parts * d0, d1, ...]`, `n` the last stack axis' size and
    `[d0, d1, ...]` the leaf's per-tensor HF shape; the tensor `hf_names` names at index `j`
    of that axis is chunk `part` of the `parts` equal chunks of `fused[j]` along its first
    axis (`torch.chunk(fused[j], parts, 0)[part]`: gate = part 0, up = part 1 of
    `gate_up_proj`; `down_proj` is part 0 of 1). Leaves with the same name share its tensor.

    Attributes:
      names: the fused tensors' names, one per index of the stack axes but the last
        (row-major: one per layer of the leaf).
      part, parts: which chunk of each fused slice the leaf is, of how many.
    """

    names: tuple[str, ...]
    part: int = 0
    parts: int = 1

    def __post_init__(self):
        if not 0 <= self.part < self.parts:
            raise ValueError(f"FusedHF.part must be in [0, parts={self.parts}), got {self.part}")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What one leaf of the params pytree is.

    Attributes:
      path: the leaf's key path, e.g. `("layers_3", "self_attn", "q_proj", "kernel")`.
      role: one of `ROLES`. Only `matrix` leaves are analysed by the monitor; the others say
        what a leaf is for conversion and summaries.
      module: the module the leaf belongs to, the same for every layer, e.g.
        `"self_attn/q_proj"`, `"input_layernorm"`, `"embed_tokens"`, `"norm"`.
      group: a coarse grouping of modules used by summaries, e.g. `"attention"`, `"mlp"`,
        `"norm"`, `"embedding"`.
      layers: the decoder layers the leaf holds, `(i,)` for an unscanned layer leaf,
        `(0, ..., L-1)` for a scanned one (leading axis = layer), `()` for global leaves.
      stack_axes: names of the leaf's leading axes that stack several HF tensors, e.g.
        `("layers",)` for a scanned leaf; `()` when the leaf is one HF tensor.
      hf_names: the HF tensor names, one per slice along `stack_axes` (row-major order).
      transpose: the HF tensor is the (per-slice) leaf with every axis reversed: kernels are
        stored `[in, out]` here and `[out, in]` in HF (for a 3-D leaf, all three axes reverse).
      extrapolate: whether EffOPD's default filter selects the leaf for this family (the
        authors' rule; docs/effopd_rule.md#parameter-filter).
      experts: for a stack of mixture-of-experts matrices, the number of experts on its
        `experts` axis (the axis after the `layers` one, when scanned); 0 otherwise. Each
        expert's `[in, out]` matrix is one row of the monitor's analyses (`module_rows`).
    """

    path: tuple[str, ...]
    role: str
    module: str
    group: str
    layers: tuple[int, ...]
    stack_axes: tuple[str, ...]
    hf_names: tuple[str, ...]
    transpose: bool
    extrapolate: bool
    experts: int = 0
    hf_fused: FusedHF | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"ParamInfo.role must be one of {ROLES}, got {self.role!r}")
        if self.experts < 0 or (self.experts and self.role != MATRIX):
            raise ValueError(f"ParamInfo.experts must be 0, or > 0 on a matrix; got {self.experts} "
                             f"on a {self.role} ({self.name})")

    @property
    def rows(self) -> tuple[tuple[int, int | None], ...]:
        """`(layer, expert)` of each `[in, out]` matrix the leaf holds, in row-major order
        (`expert` None when the leaf is not an expert stack)."""
        experts: tuple[int | None, ...] = tuple(range(self.experts)) if self.experts else (None,)
        return tuple((layer, expert) for layer in self.layers for expert in experts)

    @property
    def name(self) -> str:
        """The `/`-joined path, as EffOPD's filter and the metric names spell it."""
        return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """Every parameter leaf of one config's params tree, in tree-flattening order.

    Frozen and hashable (a static `jax.jit` argument of the monitor). Built by the family's
    `layout(config)`; the params tree of `init_params(config, ...)` has exactly these leaves.

    Attributes:
      params: one entry per leaf, in tree-flattening order.
      module_order: the family's reading order of its matrix modules (e.g. q, k, v, o, gate,
        up, down), used for tables and plots; modules it does not list follow in tree order.
    """

    params: tuple[ParamInfo, ...]
    module_order: tuple[str, ...] = ()

    def __post_init__(self):
        names = [info.name for info in self.params]
        if len(set(names)) != len(names):
            raise ValueError("ModelLayout: duplicate parameter paths")

    def find(self, path: tuple[str, ...] | str) -> ParamInfo:
        """The entry of a leaf, by key path or `/`-joined name; KeyError naming it otherwise."""
        name = path if isinstance(path, str) else "/".join(path)
        for info in self.params:
            if info.name == name:
                return info
        raise KeyError(f"the layout has no parameter {name!r}")

    @property
    def matrix_modules(self) -> tuple[str, ...]:
        """The modules that hold decoder-layer matrices, in first-appearance order."""
        seen: dict[str, None] = {}
        for info in self.params:
            if info.role == MATRIX:
                seen.setdefault(info.module, None)
        listed = [module for module in self.module_order if module in seen]
        return tuple(listed + [module for module in seen if module not in listed])

    def matrices(self, module: str) -> tuple[ParamInfo, ...]:
        """The matrix leaves of `module`, ordered by layer; ValueError for an unknown module."""
        entries = tuple(sorted((i for i in self.params if i.role == MATRIX and i.module == module),
                               key=lambda info: info.layers))
        if not entries:
            raise ValueError(f"unknown module {module!r}; the layout's matrix modules are "
                             f"{self.matrix_modules}")
        return entries

    def module_layers(self, module: str) -> tuple[int, ...]:
        """The decoder layer of each row of `module`'s stacked matrices, in order: the layers
        that hold the module, each repeated once per expert for an expert stack."""
        return tuple(layer for layer, _ in self.module_rows(module))

    def module_rows(self, module: str) -> tuple[tuple[int, int | None], ...]:
        """`(layer, expert)` of each row of `module`'s stacked matrices (`ParamInfo.rows` over
        its leaves, ordered by layer); `expert` is None for a module without experts."""
        return tuple(row for info in self.matrices(module) for row in info.rows)

    def module_experts(self, module: str) -> int:
        """How many experts each layer of `module` stacks (0: not an expert module)."""
        return self.matrices(module)[0].experts

    def module_groups(self) -> dict[str, tuple[str, ...]]:
        """`{group: modules}` over the matrix modules, e.g. `{"attention": (...), "mlp": (...)}`."""
        groups: dict[str, list[str]] = {}
        for module in self.matrix_modules:
            groups.setdefault(self.matrices(module)[0].group, []).append(module)
        return {group: tuple(modules) for group, modules in groups.items()}

    def extrapolated_names(self) -> frozenset[str]:
        """The `/`-joined names EffOPD extrapolates by default."""
        return frozenset(info.name for info in self.params if info.extrapolate)

    def effopd_filter(self) -> Callable[[str], bool]:
        """EffOPD's default parameter filter for this family: `path -> bool` on `/`-joined names
        (what `effopd(param_filter=...)` takes)."""
        selected = self.extrapolated_names()
        return lambda name: name in selected


class AuxOutput(NamedTuple):
    """What a training forward adds besides its output (:meth:`ModelFamily.apply_with_aux`).

    Attributes:
      loss: float32 scalar, already weighted: add it to the objective (e.g. a mixture of
        experts' router load-balancing loss times its coefficient); 0 when the family has none.
      metrics: unweighted terms for logging, by name (e.g. ``"moe/load_balancing_loss"``).
    """

    loss: jax.Array
    metrics: dict[str, jax.Array]


class ModelFamily(abc.ABC):
    """A model family: how its configs, forward, cache and parameters look.

    Subclasses set `name` and `model_types` and implement the abstract methods; every method is
    pure (no I/O) and the array functions are jit-able with the config static.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()

    # -- configs -------------------------------------------------------------------------------
    @abc.abstractmethod
    def config_from_hf(self, hf: Mapping[str, Any], **runtime: Any) -> ModelConfig:
        """The config of a HF `config.json` dict; `runtime` sets the runtime fields.

        Raises:
          UnsupportedConfigError: naming a field the family does not implement.
          ValueError: a required field is missing.
        """

    @abc.abstractmethod
    def config_from_dict(self, fields: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Inverse of `config.to_dict()` (how orbax checkpoints store the config)."""

    # -- the network ---------------------------------------------------------------------------
    @abc.abstractmethod
    def apply(self, config: ModelConfig, params: PyTree, input_ids: jax.Array, *,
              positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
              cache: PyTree | None = None, return_hidden_states: bool = False,
              segment_ids: jax.Array | None = None) -> Any:
        """The forward pass; see :func:`effopd_jax.models.forward` for the contract."""

    def apply_with_aux(self, config: ModelConfig, params: PyTree, input_ids: jax.Array, *,
                       positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                       return_hidden_states: bool = False) -> tuple[Any, AuxOutput]:
        """The uncached forward plus the model's own training losses (:class:`AuxOutput`).

        The default (families without such losses) is `apply` and a zero loss; a mixture of
        experts returns its router losses, from statistics its layers sow during the forward.
        """
        out = self.apply(config, params, input_ids, positions=positions,
                         attention_mask=attention_mask, return_hidden_states=return_hidden_states)
        return out, AuxOutput(jnp.zeros((), jnp.float32), {})

    @abc.abstractmethod
    def init_params(self, config: ModelConfig, rng: jax.Array) -> PyTree:
        """Random params (plain arrays, traceable: callers jit it with out_shardings)."""

    @abc.abstractmethod
    def param_logical_axes(self, config: ModelConfig) -> PyTree:
        """A tree like the params of `PartitionSpec`s of logical axis names."""

    @abc.abstractmethod
    def lm_head_weight(self, config: ModelConfig, params: PyTree) -> jax.Array:
        """The output projection `[hidden, vocab]` in the param dtype."""

    # -- incremental decoding ------------------------------------------------------------------
    @abc.abstractmethod
    def init_cache(self, config: ModelConfig, batch: int, max_len: int, dtype: Any) -> PyTree:
        """An empty decoding cache for `batch` rows of up to `max_len` positions (opaque to
        callers: the sampler only passes it back to `apply`)."""

    @abc.abstractmethod
    def cache_logical_axes(self, config: ModelConfig) -> PyTree:
        """A tree like the cache whose leaves are tuples of logical axis names (`None` for a
        replicated dimension), from which `sharding.cache_shardings` builds shardings."""

    # -- paged decoding (continuous batching); optional ------------------------------------------
    # A family without these cannot run `rollout.engine="continuous"` (the static engine only
    # needs `init_cache` / `apply`). Contract: docs/architecture.md#paged-cache.
    def init_paged_cache(self, config: ModelConfig, *, shards: int, pages_per_shard: int, page_size: int,
                         dtype: Any) -> PyTree:
        """An empty paged cache: for each of `shards` batch shards, `pages_per_shard` pages of
        `page_size` positions (page 0 of each shard is the null page; see `models.paged`)."""
        raise NotImplementedError(f"the {self.name!r} model family has no paged cache "
                                  "(rollout.engine='continuous' needs one; use 'static')")

    def paged_cache_logical_axes(self, config: ModelConfig) -> PyTree:
        """A tree like the paged cache of logical-axis tuples (the shard axis is `act_batch`)."""
        raise NotImplementedError(f"the {self.name!r} model family has no paged cache")

    def apply_paged(self, config: ModelConfig, params: PyTree, input_ids: jax.Array, *, index: Any,
                    cache: PyTree, return_hidden_states: bool = False) -> tuple[Any, PyTree]:
        """The forward over a paged cache; see :func:`effopd_jax.models.forward_paged`."""
        raise NotImplementedError(f"the {self.name!r} model family has no paged cache")

    @property
    def supports_packing(self) -> bool:
        """Whether the family's `apply` takes `segment_ids` (packed sequences)."""
        return "segment_ids" in inspect.signature(self.apply).parameters

    @property
    def supports_paged_cache(self) -> bool:
        """Whether the family implements the paged-cache methods."""
        return type(self).apply_paged is not ModelFamily.apply_paged

    # -- parameters ----------------------------------------------------------------------------
    @abc.abstractmethod
    def layout(self, config: ModelConfig) -> ModelLayout:
        """The :class:`ModelLayout` of `config`'s params tree."""

    def carried_hf_prefixes(self, config: ModelConfig) -> tuple[str, ...]:
        """HF tensor-name prefixes of tensors that belong to `config`'s checkpoints but not to
        the model (e.g. a vision tower `model.visual.`, a multi-token-prediction head `mtp.`).

        Loading leaves such tensors untouched and reports them in one log line instead of
        refusing them as unexpected; `save_hf(..., carry_from=source)` copies them unchanged
        from the source checkpoint. Default: none (every tensor must be a parameter)."""
        return ()


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Registers `family` under each of its `model_types`; returns it (usable as a decorator
    on an instance). A `model_type` can belong to one family only."""
    if not family.model_types:
        raise ValueError(f"family {family.name!r} declares no model_types")
    for model_type in family.model_types:
        owner = _FAMILIES.get(model_type)
        if owner is not None and owner is not family:
            raise ValueError(f"model_type {model_type!r} is already registered by {owner.name!r}")
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    """Every registered HF `model_type`, sorted."""
    return tuple(sorted(_FAMILIES))


def family_for(config_or_model_type: ModelConfig | str) -> ModelFamily:
    """The family of a config or of a HF `model_type`.

    Raises:
      UnsupportedConfigError: no family reads this `model_type` (the message lists those that do).
    """
    model_type = (config_or_model_type if isinstance(config_or_model_type, str)
                  else getattr(config_or_model_type, "model_type", None))
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        hint = (" (this mixture-of-experts family is not implemented)"
                if "moe" in str(model_type) else "")
        raise UnsupportedConfigError(
            f"config field model_type={model_type!r} is not supported{hint}; "
            f"supported: {supported_model_types()}")
    return family


def read_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A HF `config.json` as a dict: from a model directory, the file itself, or a mapping.

    Raises:
      FileNotFoundError: no config.json there.
      ValueError: the file is not a JSON object (the message names the file).
    """
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HF config.json at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON config ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: a HF config must be a JSON object, got {type(hf).__name__}")
    return hf


def stacked_hf_names(name_of: Callable[..., str], stack_shape: tuple[int, ...]) -> tuple[str, ...]:
    """`name_of(*index)` for every index of `stack_shape` in row-major order (helper for
    families building `ParamInfo.hf_names` of stacked leaves)."""
    count = math.prod(stack_shape)
    names = []
    for flat in range(count):
        index, rest = [], flat
        for size in reversed(stack_shape):
            index.append(rest % size)
            rest //= size
        names.append(name_of(*reversed(index)))
    return tuple(names)
