"""LoRA students: low-rank adapters on a frozen base, trained by OPD and extrapolated by EffOPD.

    lora = LoRA.for_model(model_config, rank=8, alpha=16.0, base_dtype="bfloat16")
    trainable, frozen = lora.split(params)        # adapters (A random, B = 0), the cast base
    params = lora.merge(trainable, frozen)        # W + (alpha / rank) · A · B on every target
    save_peft(model_config, lora, trainable, "out/peft")   # loads with peft.PeftModel

The math. Every targeted kernel ``W [in, out]`` (a matrix of the family's layout: for Qwen the
attention q/k/v/o and MLP gate/up/down projections of every layer) gets two factors,

    A [in, r] ~ U(-1/√in, 1/√in)   (PEFT's default: torch's kaiming_uniform(a=√5) of lora_A)
    B [r, out] = 0,
    W' = W + s · A · B,   s = alpha / r,

so the adapted model starts exactly at the base. Only A and B are trainable: the optimizer's
state, EffOPD's anchor and the checkpoints hold them alone (2·r·(in + out) numbers per matrix
instead of in·out). The base stays frozen, held in ``base_dtype`` (e.g. bfloat16); the merged
kernel ``W'`` is computed in ``promote(base_dtype, adapter dtype)`` (float32 for float32
adapters), so a bfloat16 base never rounds the update away before the model's own cast to its
compute dtype.

Merged or unmerged. :meth:`LoRA.merge` materialises ``W'`` (what the trainer's rollouts,
update, evaluation, monitor and export use); :func:`unmerged_forward` computes
``y = x·W + s·(x·A)·B`` without forming ``W'`` (an interceptor on the shared ``Linear`` layer
reads the adapters from the params tree, so no model family changes). Both give the same
logits (tested to 1e-5); ``benchmarks/lora_forward.py`` times them side by side, and the
trainer uses the merged weights (README "LoRA students" has the figures and the reason).

Dropout. The standard LoRA dropout, ``s · dropout(x) · A · B`` on the adapter's input, is
refused (``config.lora.dropout`` must be 0): the OPD loss scores the sampled tokens under the
student that sampled them (its importance weight divides by the behaviour log-prob), and a
dropped-out adapter is a different, random policy at every token, so the log-probs and the
gradient would no longer be those of the on-policy student. (On-policy data is fresh at every
step, which removes the overfitting dropout exists to fight.)

EffOPD on adapters. EffOPD extrapolates the trainable leaves it is given. With
``effopd_space="factors"`` (the default) those are A and B themselves:
``A(m) = A_B + m·ΔA``, ``B(m) = B_B + m·ΔB``, so the merged update is

    s·(A(m)·B(m) − A_B·B_B) = m·s·(ΔA·B_B + A_B·ΔB) + m²·s·ΔA·ΔB,

quadratic in m, not the merged update extrapolated (``m·s·(A_t·B_t − A_B·B_B)``, whose cross
term has m, not m²). ``effopd_space="merged"`` extrapolates the merged update itself,

    P(m) = A_B·B_B + m·(A_t·B_t − A_B·B_B) = [A_B, A_t] · [(1 − m)·B_B ; m·B_t],

and re-factors P(m) to rank r (:func:`extrapolate_merged`): QR of the two rank-2r factors and
an SVD of the 2r × 2r core, then the rank-r truncation. That is exact if and only if
rank(P(m)) ≤ r: always at the first search of a run (the anchor is the initial adapters, whose
B_B = 0, so P(m) = m·A_t·B_t), and later whenever the new and the anchor's products share
their column (or row) space; otherwise it is the best rank-r approximation (Eckart–Young) and
the trainer logs the relative error ``effopd/lora_refactor_error``. Of the factorisations of
P_r it picks the one whose A is closest to the current A_t (A' = U·Uᵀ·A_t, B' solving
A'·B' = P_r), so at the first search it returns A_t unchanged and B' = m·B_t, and Adam's moments
of A keep describing the same coordinates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import models
from effopd_jax.models import ModelConfig, ModelLayout
from effopd_jax.models.layers import Linear

PyTree = Any

ADAPTER_A = "lora_a"  # [..., in, r]
ADAPTER_B = "lora_b"  # [..., r, out]
EFFOPD_SPACES = ("factors", "merged")
PEFT_DIRECTORY = "peft"
# G = Uᵀ·A_t must be this well conditioned (σ_min / σ_max) for the gauge that keeps A close to A_t;
# otherwise the re-factoring splits P_r's singular values evenly between the two factors.
_GAUGE_MIN_CONDITION = 1e-4


# ----------------------------------------------------------------------------------------------
# Which matrices are adapted


def resolve_targets(layout: ModelLayout, target: Sequence[str]) -> tuple[str, ...]:
    """The layout's matrix modules named by ``target``, in the layout's module order.

    Each name is a matrix module of the layout (``"self_attn/q_proj"``) or its last component
    (``"q_proj"``, as PEFT's ``target_modules`` spell it) when that is unambiguous; ``()``
    selects every matrix module (for Qwen: the attention and MLP projections).

    Raises:
      ValueError: an unknown or ambiguous name, or a repeated module (the message lists the
        layout's modules).
    """
    modules = layout.matrix_modules
    if not target:
        return modules
    chosen: list[str] = []
    for name in target:
        if name in modules:
            matches = [name]
        else:
            matches = [module for module in modules if module.rsplit("/", 1)[-1] == name]
        if len(matches) != 1:
            problem = "is ambiguous" if matches else "is not a matrix module of the model"
            raise ValueError(f"config.lora.target: {name!r} {problem}; the model's matrix modules are "
                             f"{list(modules)} (or their last component)")
        if matches[0] in chosen:
            raise ValueError(f"config.lora.target: {matches[0]!r} is named twice")
        chosen.append(matches[0])
    return tuple(module for module in modules if module in chosen)


def adapter_path(kernel_path: tuple[str, ...], factor: str) -> tuple[str, ...]:
    """``(..., "q_proj", "kernel")`` -> ``(..., "q_proj", factor)``."""
    return kernel_path[:-1] + (factor,)


# ----------------------------------------------------------------------------------------------
# The parameterization


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adapters on the matrices ``kernel_paths`` of a frozen base (a
    :class:`effopd_jax.trainer.Parameterization`; hashable, a static jit argument).

    Build it with :meth:`for_model` (or :func:`from_config`), which resolves the targets through
    the model's layout and checks the rank. See the module docstring for the math.

    Attributes:
      rank: r, the adapters' inner dimension.
      alpha: the scale numerator: W' = W + (alpha / r)·A·B.
      kernel_paths: key paths of the adapted kernels (``("layers_0", "self_attn", "q_proj",
        "kernel")``; ``("layers", ...)`` with a leading layer axis when scanned).
      modules: the adapted layout modules (``"self_attn/q_proj"``), for the record.
      base_dtype: dtype the frozen base is held in (``None``: as loaded).
      seed: seed of A's random initialisation (kernel i draws from numpy's
        ``default_rng([seed, i])``, on the host).
      effopd_space: ``"factors"`` (EffOPD extrapolates A and B) or ``"merged"`` (it
        extrapolates A·B and re-factors; see :func:`extrapolate_merged`).
    """

    rank: int
    alpha: float
    kernel_paths: tuple[tuple[str, ...], ...]
    modules: tuple[str, ...] = ()
    base_dtype: str | None = None
    seed: int = 0
    effopd_space: str = "factors"
    name: str = "lora"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"LoRA.rank must be an int >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and np.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA.alpha must be a finite number > 0, got {self.alpha!r}")
        if not self.kernel_paths:
            raise ValueError("LoRA.kernel_paths is empty: nothing would be trained")
        if self.effopd_space not in EFFOPD_SPACES:
            raise ValueError(f"LoRA.effopd_space must be one of {EFFOPD_SPACES}, got {self.effopd_space!r}")
        if self.base_dtype is not None:
            object.__setattr__(self, "base_dtype", jnp.dtype(self.base_dtype).name)

    @classmethod
    def for_model(cls, model_config: ModelConfig, *, rank: int, alpha: float, target: Sequence[str] = (),
                  base_dtype: str | None = None, seed: int = 0, effopd_space: str = "factors") -> "LoRA":
        """Adapters on ``target``'s modules (``()``: every matrix module) of ``model_config``.

        Raises:
          ValueError: an unknown target (see :func:`resolve_targets`), or a rank larger than
            min(in, out) of an adapted matrix (such adapters add parameters, not expressiveness).
        """
        layout = models.layout(model_config)
        modules = resolve_targets(layout, target)
        shapes = {info.path: leaf.shape for info, leaf in
                  zip(layout.params, jax.tree.leaves(models.abstract_params(model_config)))}
        paths = []
        for module in modules:
            for info in layout.matrices(module):
                fan_in, fan_out = shapes[info.path][-2:]
                if rank > min(fan_in, fan_out):
                    raise ValueError(
                        f"config.lora.rank: {rank} is larger than min(in, out) = {min(fan_in, fan_out)} of "
                        f"{module} ([in, out] = [{fan_in}, {fan_out}]); adapters of a higher rank add "
                        "parameters, not expressiveness")
                paths.append(info.path)
        return cls(rank=int(rank), alpha=float(alpha), kernel_paths=tuple(paths), modules=modules,
                   base_dtype=base_dtype, seed=int(seed), effopd_space=effopd_space)

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    # -- Parameterization ------------------------------------------------------------------

    def split(self, params: PyTree) -> tuple[PyTree, PyTree]:
        """``(adapters, frozen base)``: A random and B = 0 for every adapted kernel, in the kernel's
        dtype and laid out like it (A follows its ``in`` axis, B its ``out`` axis); the base is
        every leaf of ``params``, cast to ``base_dtype``."""
        kernels = []
        for path in self.kernel_paths:
            kernel = _get(params, path)
            if kernel.ndim < 2:
                raise ValueError(f"LoRA: {'/'.join(path)} is not a matrix (shape {kernel.shape})")
            kernels.append(kernel)
        # Drawn on the host (no compilation; the same numbers on every process and platform) and
        # placed like their kernels.
        adapters: dict[str, Any] = {}
        for index, (path, kernel) in enumerate(zip(self.kernel_paths, kernels)):
            a_sharding, b_sharding = _adapter_shardings(kernel, self.rank)
            bound = 1.0 / np.sqrt(kernel.shape[-2])
            rng = np.random.default_rng([self.seed, index])
            a = rng.uniform(-bound, bound, kernel.shape[:-1] + (self.rank,)).astype(np.float32)
            b = np.zeros(kernel.shape[:-2] + (self.rank, kernel.shape[-1]), np.float32)
            adapters = _set(adapters, adapter_path(path, ADAPTER_A), _place(a.astype(kernel.dtype), a_sharding))
            adapters = _set(adapters, adapter_path(path, ADAPTER_B), _place(b.astype(kernel.dtype), b_sharding))
        return adapters, self.cast_base(params)

    def cast_base(self, params: PyTree) -> PyTree:
        """``params`` with every floating leaf in ``base_dtype`` (the same arrays when they are)."""
        if self.base_dtype is None:
            return params
        dtype = jnp.dtype(self.base_dtype)
        leaves, treedef = jax.tree.flatten(params)
        to_cast = [i for i, x in enumerate(leaves) if x.dtype != dtype and jnp.issubdtype(x.dtype, jnp.floating)]
        if not to_cast:
            return params
        cast = _cast_jit([leaves[i] for i in to_cast], dtype.name)  # elementwise: keeps the shardings
        for i, x in zip(to_cast, cast):
            leaves[i] = x
        return jax.tree.unflatten(treedef, leaves)

    def merge(self, trainable: PyTree, frozen: PyTree) -> PyTree:
        """The model params: ``frozen`` with each adapted kernel replaced by W + s·A·B (pure)."""
        return _merge_jit(frozen, trainable, self.scale)

    def param_filter(self, layout: ModelLayout) -> Callable[[str], bool]:
        """EffOPD's default over the adapters' ``/``-joined paths: both factors of every adapted
        kernel the layout marks for extrapolation (for Qwen: all of them)."""
        selected = frozenset(
            "/".join(adapter_path(path, factor)) for path in self.kernel_paths
            if layout.find(path).extrapolate for factor in (ADAPTER_A, ADAPTER_B))
        return lambda name: name in selected

    def effopd_extrapolation(self) -> Callable[[PyTree, PyTree, jax.Array], PyTree] | None:
        """What ``effopd_host_search(..., extrapolate=...)`` takes: None (EffOPD's own rule on
        each factor) for ``effopd_space="factors"``; :func:`extrapolate_merged` at this rank for
        ``"merged"``."""
        if self.effopd_space == "factors":
            return None
        return lambda theta, anchor, multiplier: _extrapolate_merged_jit(theta, anchor, multiplier, self.rank)[0]

    def refactor_error(self, theta: PyTree, anchor: PyTree, multiplier: float) -> float:
        """:func:`refactor_error` of the merged-space candidate ``multiplier`` (a Python float)."""
        return float(_extrapolate_merged_jit(theta, anchor, jnp.float32(multiplier), self.rank)[1])

    def save_adapters(self, model_config: ModelConfig, adapters: PyTree, path: str, *,
                      base_model_name_or_path: str = "") -> None:
        """The adapters in PEFT's format (:func:`save_peft`)."""
        save_peft(model_config, self, adapters, path, base_model_name_or_path=base_model_name_or_path)

    def to_dict(self) -> dict[str, Any]:
        """What the trainer writes into a checkpoint's meta (JSON)."""
        return {"name": self.name, "rank": self.rank, "alpha": self.alpha, "scale": self.scale,
                "modules": list(self.modules), "base_dtype": self.base_dtype,
                "effopd_space": self.effopd_space}


def from_config(config, model_config: ModelConfig) -> LoRA:
    """The :class:`LoRA` of a trainer config's ``lora`` group (``config.lora.enabled``); A is
    initialised from ``config.seed``."""
    lora = config.lora
    if not lora.enabled:
        raise ValueError("config.lora.enabled is False")
    if lora.dropout != 0.0:  # validate_config refuses it; a config built around it must too
        raise ValueError(f"config.lora.dropout: must be 0, got {lora.dropout} (see effopd_jax/lora.py)")
    return LoRA.for_model(model_config, rank=lora.rank, alpha=lora.alpha, target=tuple(lora.target),
                          base_dtype=lora.base_dtype, seed=config.seed, effopd_space=lora.effopd_space)


# ----------------------------------------------------------------------------------------------
# Merged weights


def merge_adapters(params: PyTree, adapters: PyTree, scale: float) -> PyTree:
    """``params`` with every kernel that has adapters in ``adapters`` replaced by
    ``W + scale·A·B`` (computed in ``promote(W.dtype, A.dtype)``; A·B at full precision).

    ``adapters`` mirrors the params tree down to the adapted modules (``{..., "q_proj":
    {"lora_a": A, "lora_b": B}}``), scanned or not like ``params``. Pure and jit-able.
    """

    def walk(node: Mapping[str, Any], adapter_node: Mapping[str, Any], where: str) -> dict[str, Any]:
        out = dict(node)
        if ADAPTER_A in adapter_node or ADAPTER_B in adapter_node:
            if "kernel" not in node:
                raise ValueError(f"adapters at {where} but the params have no kernel there")
            kernel, a, b = node["kernel"], adapter_node[ADAPTER_A], adapter_node[ADAPTER_B]
            dtype = jnp.promote_types(kernel.dtype, a.dtype)
            delta = jnp.einsum("...ir,...ro->...io", a.astype(dtype), b.astype(dtype),
                               precision=jax.lax.Precision.HIGHEST)
            out["kernel"] = kernel.astype(dtype) + jnp.asarray(scale, dtype) * delta
        for key, child in adapter_node.items():
            if key in (ADAPTER_A, ADAPTER_B):
                continue
            if key not in node:
                raise ValueError(f"adapters at {where}/{key} but the params have no such module")
            out[key] = walk(node[key], child, f"{where}/{key}")
        return out

    return walk(params, adapters, "")


_merge_jit = jax.jit(merge_adapters, static_argnums=2)


def adapter_product(adapters: PyTree, scale: float) -> dict[str, jax.Array]:
    """``{kernel path (/-joined): scale·A·B [..., in, out]}``: the merged updates ΔW."""
    out = {}
    for path, node in _adapter_nodes(adapters):
        out["/".join(path + ("kernel",))] = scale * jnp.einsum(
            "...ir,...ro->...io", node[ADAPTER_A], node[ADAPTER_B], precision=jax.lax.Precision.HIGHEST)
    return out


# ----------------------------------------------------------------------------------------------
# Unmerged forward


def with_adapters(frozen: PyTree, adapters: PyTree) -> PyTree:
    """The params tree with the adapters next to their kernels (``.../q_proj/{kernel, lora_a,
    lora_b}``): what :func:`unmerged_forward` takes. A forward without the adapter interceptor
    would ignore them, so only pass this tree to :func:`unmerged_forward`."""

    def walk(node, adapter_node):
        out = dict(node)
        for key, child in adapter_node.items():
            out[key] = child if key in (ADAPTER_A, ADAPTER_B) else walk(node[key], child)
        return out

    return walk(frozen, adapters)


def adapter_interceptor(scale: float) -> Callable:
    """A ``flax.linen.intercept_methods`` interceptor: every ``layers.Linear`` call whose params
    hold ``lora_a`` / ``lora_b`` returns ``base(x) + scale·(x·A)·B``, computed in the layer's
    compute dtype (PEFT's ``lora_B(lora_A(x)) * scaling``). Inside ``nn.scan`` the module sees its
    layer's slice of the stacked adapters, as it does of its kernel."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, Linear) and context.method_name == "__call__"
                and module.has_variable("params", ADAPTER_A)):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0].astype(module.dtype)
        a = module.get_variable("params", ADAPTER_A).astype(module.dtype)
        b = module.get_variable("params", ADAPTER_B).astype(module.dtype)
        low_rank = jnp.einsum("...i,ir->...r", x, a)
        return y + jnp.asarray(scale, module.dtype) * jnp.einsum("...r,ro->...o", low_rank, b)

    return interceptor


def unmerged(scale: float):
    """Context manager: every model forward *traced* inside it applies the adapters held in its
    params tree (:func:`with_adapters`) unmerged. Enter it inside the function you jit (as
    :func:`unmerged_forward` does), so the interceptor is part of that function's compiled program;
    a program traced outside it ignores the adapters."""
    return nn.intercept_methods(adapter_interceptor(scale))


def unmerged_forward(config: ModelConfig, params_with_adapters: PyTree, input_ids: jax.Array, *,
                     scale: float, **forward_kwargs: Any) -> Any:
    """``models.forward`` of the adapted model without merging: ``y = x·W + s·(x·A)·B`` at every
    adapted layer. ``params_with_adapters`` comes from :func:`with_adapters`; the keyword
    arguments are ``models.forward``'s. Pure and jit-able (the interceptor is installed while the
    forward is traced, so it is part of every compiled program of this function)."""
    with unmerged(scale):
        return models.forward(config, params_with_adapters, input_ids, **forward_kwargs)


# ----------------------------------------------------------------------------------------------
# EffOPD in the merged space


def _refactor(a_anchor, b_anchor, a_now, b_now, multiplier, rank: int):
    """(A', B', relative error) with A'·B' the rank-r truncation of
    P(m) = A_B·B_B + m·(A_t·B_t − A_B·B_B); batched over leading axes. See the module docstring."""
    dtype = jnp.promote_types(a_now.dtype, jnp.float32)
    a_anchor, b_anchor, a_now, b_now = (x.astype(dtype) for x in (a_anchor, b_anchor, a_now, b_now))
    m = jnp.asarray(multiplier, dtype)
    hi = jax.lax.Precision.HIGHEST
    left = jnp.concatenate([a_anchor, a_now], axis=-1)                         # [..., in, 2r]
    right = jnp.concatenate([(1 - m) * b_anchor, m * b_now], axis=-2)          # [..., 2r, out]
    q_left, r_left = jnp.linalg.qr(left)                                       # [..., in, k], [..., k, 2r]
    q_right, r_right = jnp.linalg.qr(jnp.swapaxes(right, -1, -2))              # [..., out, k'], [..., k', 2r]
    core = jnp.matmul(r_left, jnp.swapaxes(r_right, -1, -2), precision=hi)     # [..., k, k']
    u, s, vt = jnp.linalg.svd(core, full_matrices=False)
    basis = jnp.matmul(q_left, u[..., :rank], precision=hi)                    # [..., in, r] orthonormal
    row_basis = jnp.matmul(vt[..., :rank, :], jnp.swapaxes(q_right, -1, -2), precision=hi)  # [..., r, out]
    coeffs = s[..., :rank, None] * row_basis                                    # P_r = basis · coeffs
    # Gauge: A' = U·(Uᵀ·A_t) (A_t projected onto P_r's column space), B' = (Uᵀ·A_t)⁻¹·S·Vᵀ.
    gauge = jnp.matmul(jnp.swapaxes(basis, -1, -2), a_now, precision=hi)       # [..., r, r]
    gauge_sv = jnp.linalg.svd(gauge, compute_uv=False)
    well_conditioned = gauge_sv[..., -1] > _GAUGE_MIN_CONDITION * gauge_sv[..., 0]
    safe_gauge = jnp.where(well_conditioned[..., None, None], gauge, jnp.eye(rank, dtype=dtype))
    a_gauge = jnp.matmul(basis, safe_gauge, precision=hi)
    b_gauge = jnp.linalg.solve(safe_gauge, coeffs)
    root = jnp.sqrt(s[..., :rank])
    a_even, b_even = basis * root[..., None, :], root[..., :, None] * row_basis
    choose = well_conditioned[..., None, None]
    a_new = jnp.where(choose, a_gauge, a_even)
    b_new = jnp.where(choose, b_gauge, b_even)
    # The error of the re-factored product against P(m), relative to the extrapolated update.
    target = jnp.matmul(left, right, precision=hi)
    update = target - jnp.matmul(a_anchor, b_anchor, precision=hi)
    error = jnp.linalg.norm(jnp.matmul(a_new, b_new, precision=hi) - target, axis=(-2, -1))
    relative = error / jnp.maximum(jnp.linalg.norm(update, axis=(-2, -1)), jnp.finfo(dtype).tiny)
    return a_new, b_new, jnp.max(relative)


def _adapter_nodes(tree: PyTree, prefix: tuple[str, ...] = ()):
    """(module path, node) of every node holding ``lora_a`` / ``lora_b``, in key order."""
    if isinstance(tree, Mapping):
        if ADAPTER_A in tree:
            yield prefix, tree
        for key in sorted(tree):
            if key not in (ADAPTER_A, ADAPTER_B):
                yield from _adapter_nodes(tree[key], prefix + (key,))


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def extrapolate_merged(theta: PyTree, anchor: PyTree, multiplier: jax.Array, *, rank: int) -> PyTree:
    """EffOPD's candidate in the merged space: for every module whose two factors are in the
    anchor, (A', B') with A'·B' the rank-``rank`` truncation of
    ``A_B·B_B + m·(A_t·B_t − A_B·B_B)``; other leaves are θ's (what ``effopd_host_search(...,
    extrapolate=...)`` takes; pure and jit-able, ``rank`` static).

    Exact iff that matrix has rank ≤ r (see the module docstring); :func:`refactor_error` gives
    the error where it is not.
    """
    return _extrapolate_merged(theta, anchor, multiplier, rank)[0]


def refactor_error(theta: PyTree, anchor: PyTree, multiplier: jax.Array, *, rank: int) -> jax.Array:
    """max over modules and layers of ‖A'·B' − P(m)‖_F / ‖P(m) − A_B·B_B‖_F for
    :func:`extrapolate_merged`'s point: 0 (to rounding) when the re-factoring is exact."""
    return _extrapolate_merged(theta, anchor, multiplier, rank)[1]


def _extrapolate_merged(theta, anchor, multiplier, rank):
    errors = [jnp.zeros((), jnp.float32)]

    def walk(node, anchor_node):
        out = dict(node)
        if ADAPTER_A in node:
            a_b, b_b = anchor_node[ADAPTER_A], anchor_node[ADAPTER_B]
            if _is_masked(a_b) != _is_masked(b_b):
                raise ValueError("extrapolate_merged: EffOPD's filter must select both factors of a module "
                                 "or neither")
            if not _is_masked(a_b):
                a, b = node[ADAPTER_A], node[ADAPTER_B]
                a_new, b_new, error = _refactor(a_b, b_b, a, b, multiplier, rank)
                out[ADAPTER_A], out[ADAPTER_B] = a_new.astype(a.dtype), b_new.astype(b.dtype)
                errors.append(error.astype(jnp.float32))
        for key, child in node.items():
            if key not in (ADAPTER_A, ADAPTER_B):
                out[key] = walk(child, anchor_node[key])
        return out

    point = walk(theta, anchor)
    return point, jnp.max(jnp.stack(errors))


_extrapolate_merged_jit = jax.jit(_extrapolate_merged, static_argnums=3)


# ----------------------------------------------------------------------------------------------
# PEFT export


def peft_module_names(layout: ModelLayout, modules: Sequence[str]) -> list[str]:
    """PEFT ``target_modules`` for ``modules``: each module's last component (``q_proj``), or
    its dotted path (``self_attn.q_proj``) where the last component is not unique in the layout."""
    last = [module.rsplit("/", 1)[-1] for module in layout.matrix_modules]
    return [module.rsplit("/", 1)[-1] if last.count(module.rsplit("/", 1)[-1]) == 1
            else module.replace("/", ".") for module in modules]


def peft_state_dict(model_config: ModelConfig, lora: LoRA, adapters: PyTree) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names: for the HF weight ``model.layers.0.self_attn.q_proj.weight``,
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` = Aᵀ ``[r, in]`` and
    ``...lora_B.weight`` = Bᵀ ``[out, r]`` (torch's ``Linear`` stores ``[out, in]``). Scanned
    adapters are split per layer, as the layout's ``hf_names`` order them."""
    layout = models.layout(model_config)
    tensors: dict[str, np.ndarray] = {}
    for path in lora.kernel_paths:
        info = layout.find(path)
        a = np.asarray(jax.device_get(_get(adapters, adapter_path(path, ADAPTER_A))))
        b = np.asarray(jax.device_get(_get(adapters, adapter_path(path, ADAPTER_B))))
        a = a.reshape((-1,) + a.shape[-2:])
        b = b.reshape((-1,) + b.shape[-2:])
        if len(info.hf_names) != a.shape[0]:
            raise ValueError(f"{info.name}: {len(info.hf_names)} HF names for {a.shape[0]} adapter slices")
        for index, hf_name in enumerate(info.hf_names):
            if not hf_name.endswith(".weight"):
                raise ValueError(f"{info.name}: HF tensor {hf_name!r} is not a weight")
            module = "base_model.model." + hf_name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[index].T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[index].T)
    return tensors


def peft_adapter_config(model_config: ModelConfig, lora: LoRA, *, base_model_name_or_path: str = "") -> dict:
    """``adapter_config.json`` of a PEFT LoRA adapter for a causal LM."""
    layout = models.layout(model_config)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": peft_module_names(layout, lora.modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft(model_config: ModelConfig, lora: LoRA, adapters: PyTree, path: str, *,
              base_model_name_or_path: str = "") -> None:
    """Writes ``path/adapter_config.json`` and ``path/adapter_model.safetensors`` (PEFT's LoRA
    format), loadable with ``peft.PeftModel.from_pretrained(base_model, path)`` onto the
    ``transformers`` model of the same base checkpoint."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file(peft_state_dict(model_config, lora, adapters), os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(peft_adapter_config(model_config, lora, base_model_name_or_path=base_model_name_or_path),
                  f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Tree helpers


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"no parameter {'/'.join(path)!r}")
        node = node[key]
    return node


def _set(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set(tree.get(path[0], {}), path[1:], value)
    return out


_cast_jit = jax.jit(lambda leaves, dtype: [x.astype(dtype) for x in leaves], static_argnums=1)


def _place(value: np.ndarray, sharding) -> jax.Array:
    return jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)


def _adapter_shardings(kernel: jax.Array, rank: int):
    """Shardings of A [..., in, r] and B [..., r, out] from the kernel's: A follows the kernel's
    leading and ``in`` axes, B its leading and ``out`` axes; the rank axis is replicated."""
    sharding = getattr(kernel, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return sharding, sharding
    spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
    a_spec = spec[:-1] + (None,)
    b_spec = spec[:-2] + (None, spec[-1])
    return NamedSharding(sharding.mesh, P(*a_spec)), NamedSharding(sharding.mesh, P(*b_spec))
