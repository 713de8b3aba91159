"""The foresight monitor: truncated-SVD analysis of weight updates, jitted.

The paper explains OPD's efficiency by two measurable properties of the cumulative updates
ΔW = W_t − W_0 of the attention and MLP matrices (docs/foresight.md; the authors' code stores SVDs
but computes no metric, so the forms below are ours: docs/foresight.md#metrics-the-authors-do-not-define):

* module allocation: which modules/layers move, measured by the relative update
  ‖ΔW‖_F / ‖W_0‖_F and each module type's share of a layer's squared update norm;
* low-rank lock-in: the update concentrates in a few directions (effective rank, top-k energy)
  whose dominant subspace aligns early with the final one (subspace overlap).

Orientation. Parameter kernels are stored ``[in, out]`` (docs/architecture.md). Every metric here
is reported in the Hugging Face / torch orientation ``ΔW_hf = ΔW_kernelᵀ`` of shape
``[out, in]``, like the authors' ``svd.py`` (docs/foresight.md#cumulative-update-svd): **U (the "left" subspace) spans the
output space** ``[out, k]`` and **V (the "right" subspace) spans the input space** ``[in, k]``.
Singular values, effective rank, energy and norms do not depend on the orientation.

Layers. Both parameter layouts are supported: unscanned (``layers_{i}/self_attn/q_proj/kernel``)
and scanned (``layers/self_attn/q_proj/kernel`` with a leading ``[num_layers]`` axis). Per-layer
work is ``vmap``-ed over the stacked layer axis (or ``lax.map``-ed in chunks of
``MonitorConfig.layer_batch_size`` to bound memory).

Mixture of experts. A stack of expert matrices (``mlp/experts/gate_proj/kernel`` ``[E, in, out]``,
``[L, E, in, out]`` scanned; ``ParamInfo.experts``) contributes one row per (layer, expert): each
expert is its own linear map, so its ΔW has its own spectrum, effective rank and subspace, while
a concatenation of experts would mix unrelated maps (and the experts the routing favoured would
dominate its spectrum). The stack as a whole appears where sums are meaningful: a module's share
of a layer's squared update (allocation) adds its experts, and per-layer keys aggregate them
(``monitor_step``). The router (``mlp/gate``, ``[H, E]``) is a matrix module of its own.

CPU note: with jaxlib 0.10.2 on a single CPU device, a jitted program holding several *batched*
(vmapped) LAPACK SVDs intermittently never finishes (every XLA worker idle on a futex; seen in
about half the runs of a 2-layer model's monitor pass, never with one layer at a time, never with
``--xla_force_host_platform_device_count=8``). ``layer_batch_size="auto"`` (the default) therefore
maps over layers one at a time on the CPU backend and vmaps over all layers elsewhere.

Public API
  truncated_svd, singular_values             the SVDs (randomized range finder / exact)
  effective_rank, energy_ratio, subspace_overlap   the metrics, on singular values / bases
  rank_k_update, rank_k_reconstruct_params   norm-preserving rank-k reconstruction (docs/foresight.md)
  module_kernels, replace_module_kernels, module_groups, check_same_architecture
                                              read/write the layout's matrices per module
  update_metrics, allocation, map_layers      all metrics of one module type over stacked layers
  MonitorConfig, MonitorState, init_monitor_state, monitor_step, Monitor   the live hook

Cost of one live monitor pass (``monitor_step``), per monitored matrix ΔW of shape m × n
(m = out, n = in), sketch width l = k + oversample, q = power_iters, randomized path:
  FLOPs  ≈ 2·m·n·l·(2q + 2)   (A·Ω, q × (Aᵀ·Q, A·Z), Qᵀ·A)  + 3·m·n (ΔW, ‖ΔW‖², ‖·‖ on W_0 is cached)
         + (2q + 1) Householder QRs of tall [m|n, l] panels ≈ 4·(2q+1)·max(m, n)·l² + SVD of [l, n].
  With the defaults (k = 8, l = 18, q = 2) that is ≈ 216·m·n FLOPs per matrix, i.e. ≈ 216 FLOPs
  per monitored parameter, versus ≈ 6·T FLOPs per parameter for one training step on T tokens:
  a FLOP ratio of ≈ 36 / T (< 1 % for T ≥ 4096 tokens per step). QR/SVD run at a lower
  efficiency than matmuls, so measure with ``benchmarks/monitor_cost.py``.
  ``full_spectrum=True`` replaces this by an exact SVD, O(m·n·min(m, n)) per matrix.
Memory:
  state: a copy of W_0 for the layout's matrices (the 7 of every Qwen layer; params dtype; ~the whole
  non-embedding model) + the previous top-k bases, Σ L·(m + n)·k float32 values;
  transient: one module type's stacked ΔW in float32 (L·m·n·4 bytes; only
  ``layer_batch_size`` layers at a time when it is set) plus, for the unscanned layout, the
  stacked W_t of that module type.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from effopd_jax.models.family import ModelLayout, ParamInfo

Array = jax.Array
PyTree = Any

SVDMethod = Literal["auto", "randomized", "exact"]
_HIGHEST = jax.lax.Precision.HIGHEST


class SVDResult(NamedTuple):
    """A (truncated) SVD ``matrix ≈ u @ diag(s) @ vt``.

    Attributes:
      u: ``[m, k]`` orthonormal columns (left singular vectors).
      s: ``[k]`` singular values, descending.
      vt: ``[k, n]`` orthonormal rows (right singular vectors).
    """

    u: Array
    s: Array
    vt: Array


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    # bf16/fp16 lose too much in QR/SVD; fp64 (x64 mode) is kept.
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _check_matrix(matrix: Array, name: str) -> None:
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(matrix.shape)}")


def _check_k(k: int, m: int, n: int, name: str = "k") -> None:
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"{name} must be a Python int (it sets static shapes), got {k!r}")
    if not 1 <= k <= min(m, n):
        raise ValueError(
            f"{name}={k} must satisfy 1 <= {name} <= min(m, n) = {min(m, n)} for a {m}x{n} matrix"
            " (a matrix has at most min(m, n) singular directions)"
        )


def _use_exact_svd(m: int, n: int, k: int, oversample: int, method: SVDMethod) -> bool:
    return method == "exact" or (method == "auto" and min(m, n) <= 2 * min(k + oversample, m, n))


def truncated_svd(
    matrix: Array,
    k: int,
    key: Array,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    method: SVDMethod = "auto",
    test_matrix: Array | None = None,
) -> SVDResult:
    """Top-``k`` singular triplets of ``matrix`` ``[m, n]``.

    Randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4): with a Gaussian test
    matrix Ω ``[n, l]``, l = min(k + oversample, min(m, n)),
        Q = qr(A Ω);  repeat q times: Z = qr(Aᵀ Q), Q = qr(A Z);
        B = Qᵀ A  [l, n];  B = Ũ Σ Vᵀ (exact);  U = Q Ũ.
    Re-orthonormalising between the power iterations keeps the small singular directions from
    being lost to round-off; each iteration sharpens the spectrum by (σ_j/σ_{l+1})^2. Matmuls run
    at HIGHEST precision in float32 (float64 under x64) whatever the input dtype.

    ``method="exact"`` uses ``jnp.linalg.svd``; ``"auto"`` does so when min(m, n) <= 2·l, where a
    sketch of half the spectrum would save little.

    Args:
      matrix: ``[m, n]``.
      k: number of triplets, 1 <= k <= min(m, n) (static).
      key: PRNG key for Ω (unused on the exact path).
      oversample: extra sketch columns beyond k (>= 0).
      power_iters: subspace iterations q (>= 0).
      method: "auto", "randomized" or "exact".
      test_matrix: optional ``[>= n, >= l]`` Gaussian Ω to use (its top-left ``[n, l]`` block)
        instead of drawing one from ``key``. The monitor draws one Ω per pass and shares it
        across matrices: one RNG op instead of one per matrix (on CPU each threefry draw costs
        ~0.7 s of compile time). Each matrix's estimate is as good as with its own Ω; only the
        errors of different matrices become correlated.

    Returns:
      ``SVDResult(u [m, k], s [k], vt [k, n])`` in the compute dtype (float32 unless float64).

    Raises:
      ValueError: matrix not 2-D, k out of range, negative oversample/power_iters, bad method.
    """
    _check_matrix(matrix, "matrix")
    m, n = matrix.shape
    _check_k(k, m, n)
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    if power_iters < 0:
        raise ValueError(f"power_iters must be >= 0, got {power_iters}")
    if method not in ("auto", "randomized", "exact"):
        raise ValueError(f"method must be 'auto', 'randomized' or 'exact', got {method!r}")
    a = matrix.astype(_compute_dtype(matrix.dtype))
    sketch = min(k + oversample, m, n)
    if _use_exact_svd(m, n, k, oversample, method):
        u, s, vt = jnp.linalg.svd(a, full_matrices=False)
        return SVDResult(u[:, :k], s[:k], vt[:k])

    if test_matrix is None:
        omega = jax.random.normal(key, (n, sketch), a.dtype)
    else:
        if test_matrix.ndim != 2 or test_matrix.shape[0] < n or test_matrix.shape[1] < sketch:
            raise ValueError(
                f"test_matrix must be at least [n, l] = [{n}, {sketch}], got {tuple(test_matrix.shape)}"
            )
        omega = test_matrix[:n, :sketch].astype(a.dtype)
    q, _ = jnp.linalg.qr(jnp.matmul(a, omega, precision=_HIGHEST))
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(jnp.matmul(a.T, q, precision=_HIGHEST))
        q, _ = jnp.linalg.qr(jnp.matmul(a, z, precision=_HIGHEST))
    b = jnp.matmul(q.T, a, precision=_HIGHEST)  # [l, n]
    u_small, s, vt = jnp.linalg.svd(b, full_matrices=False)
    u = jnp.matmul(q, u_small[:, :k], precision=_HIGHEST)
    return SVDResult(u, s[:k], vt[:k])


def singular_values(matrix: Array) -> Array:
    """All min(m, n) singular values of ``matrix`` ``[..., m, n]``, descending, exact."""
    return jnp.linalg.svd(matrix.astype(_compute_dtype(matrix.dtype)), compute_uv=False)


def effective_rank(singular_values: Array) -> Array:
    """Roy & Vetterli effective rank of a spectrum ``[..., r]`` -> ``[...]``.

        erank = exp(H(p)),  H(p) = −Σ_j p_j log p_j,  p_j = σ_j / Σ_i σ_i.

    1 for a rank-1 matrix, r for r equal singular values. Entries with p_j = 0 contribute 0.
    For an all-zero spectrum (no update) p is undefined; we define erank = 0 there.
    Computed from the values given: pass the full spectrum for the true effective rank (a top-k
    spectrum gives the effective rank of the rank-k truncation, at most k).
    """
    s = jnp.asarray(singular_values)
    total = jnp.sum(s, axis=-1, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    p = s / safe_total
    entropy = -jnp.sum(xlogy(p, p), axis=-1)
    return jnp.where(total[..., 0] > 0, jnp.exp(entropy), 0.0)


def energy_ratio(singular_values: Array, k: int, total_energy: Array | float | None = None) -> Array:
    """Top-``k`` energy fraction of a spectrum ``[..., r]`` -> ``[...]``.

        E_k = Σ_{j<=k} σ_j² / total,   total = ‖ΔW‖_F² = Σ_all σ_j².

    The k largest values are used (the input need not be sorted). ``total_energy`` defaults to
    Σ σ_j² of the values given; pass the exact ‖ΔW‖_F² when only a truncated spectrum is at hand.
    0 when total is 0 (no update).

    Raises:
      ValueError: k < 1 or k > r.
    """
    s = jnp.asarray(singular_values)
    if s.ndim < 1:
        raise ValueError(f"singular_values must have at least 1 dimension, got shape {s.shape}")
    if not isinstance(k, int) or not 1 <= k <= s.shape[-1]:
        raise ValueError(f"k={k!r} must be an int in [1, {s.shape[-1]}] (number of singular values)")
    squares = jnp.square(s)
    top = jnp.sum(jax.lax.top_k(squares, k)[0], axis=-1)
    total = jnp.sum(squares, axis=-1) if total_energy is None else jnp.asarray(total_energy)
    return jnp.where(total > 0, top / jnp.where(total > 0, total, 1.0), 0.0)


def subspace_overlap(u_a: Array, u_b: Array) -> Array:
    """Overlap of two k-dim subspaces given by orthonormal bases ``[..., m, k]`` -> ``[...]``.

        overlap = ‖U_aᵀ U_b‖_F² / k = (1/k) Σ_j cos² θ_j,

    the mean squared cosine of the principal angles θ_j: 1 for identical subspaces, 0 for
    orthogonal ones, ≈ k/m in expectation for random ones.

    Raises:
      ValueError: fewer than 2 dimensions or different shapes.
    """
    if u_a.ndim < 2 or u_a.shape != u_b.shape:
        raise ValueError(
            f"u_a and u_b must be bases of the same shape [..., m, k]; got {tuple(u_a.shape)} and"
            f" {tuple(u_b.shape)}"
        )
    k = u_a.shape[-1]
    cross = jnp.einsum("...mi,...mj->...ij", u_a, u_b, precision=_HIGHEST)
    return jnp.sum(jnp.square(cross), axis=(-2, -1)) / k


# ----------------------------------------------------------------------------------------------
# Rank-k reconstruction (docs/foresight.md#rank-k-reconstruction)


def rank_k_update(
    w_0: Array,
    w_t: Array,
    k: int,
    key: Array,
    *,
    alpha: float = 1.0,
    oversample: int = 10,
    power_iters: int = 2,
    method: SVDMethod = "auto",
) -> Array:
    """Norm-preserving rank-k reconstruction of one matrix (docs/foresight.md#rank-k-reconstruction, the authors' ``upd_rank.py``).

        ΔW = W_t − W_0,  ΔW_k = U_{:, :k} diag(σ_{:k}) V_{:, :k}ᵀ,
        W' = W_0 + α · (‖ΔW‖_F / ‖ΔW_k‖_F) · ΔW_k,

    with ‖ΔW‖_F exact and ‖ΔW_k‖_F = sqrt(Σ_{j<=k} σ_j²). So ‖W' − W_0‖_F = α‖ΔW‖_F whatever the
    SVD's accuracy. Orientation-free ((ΔWᵀ)_k = (ΔW_k)ᵀ): works on kernels ``[in, out]``.
    When ΔW = 0, W' = W_0. Computed in float32 (the authors cast U, S, Vt to bf16;
    we do not), returned in ``w_0.dtype``.

    Args:
      w_0, w_t: ``[m, n]`` base and trained matrices.
      k: rank (static), 1 <= k <= min(m, n).
      key: PRNG key for the randomized SVD.
      alpha: extrapolation factor α.

    Returns:
      W' ``[m, n]`` in ``w_0.dtype``.
    """
    if w_0.shape != w_t.shape:
        raise ValueError(f"w_0 and w_t shapes differ: {tuple(w_0.shape)} vs {tuple(w_t.shape)}")
    _check_matrix(w_0, "w_0")
    dtype = _compute_dtype(w_0.dtype)
    delta = w_t.astype(dtype) - w_0.astype(dtype)
    svd = truncated_svd(delta, k, key, oversample=oversample, power_iters=power_iters, method=method)
    delta_norm = jnp.sqrt(jnp.sum(jnp.square(delta)))
    delta_k_norm = jnp.sqrt(jnp.sum(jnp.square(svd.s)))
    scale = jnp.where(delta_k_norm > 0, alpha * delta_norm / jnp.where(delta_k_norm > 0, delta_k_norm, 1.0), 0.0)
    delta_k = jnp.matmul(svd.u * svd.s, svd.vt, precision=_HIGHEST)
    return (w_0.astype(dtype) + scale * delta_k).astype(w_0.dtype)


# ----------------------------------------------------------------------------------------------
# Parameter-pytree access, through the model's layout


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"params has no entry {'/'.join(path)!r} (missing {part!r})")
        node = node[part]
    return node


def _check_params_collection(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping (the 'params' collection), got {type(params)}")
    if set(params.keys()) == {"params"}:
        raise ValueError("pass the 'params' collection (variables['params']), not the variables dict")


def _matrix_rows(info: ParamInfo, leaf: Array) -> Array:
    """A matrix leaf as ``[rows, in, out]``: one row per layer it holds and, for an expert stack,
    per expert (``info.rows`` order)."""
    rows = len(info.rows)
    if leaf.ndim < 2 or leaf.ndim > 4 or math.prod(leaf.shape[:-2]) != rows:
        raise ValueError(f"{info.name} has shape {tuple(leaf.shape)}; the layout expects {rows} "
                         f"[in, out] matrices (layers {info.layers}, experts {info.experts})")
    return leaf.reshape((rows,) + leaf.shape[-2:])


def module_kernels(params: Mapping[str, Any], layout: ModelLayout,
                   modules: tuple[str, ...] | None = None) -> dict[str, Array]:
    """The matrices of each module stacked: ``{module: [n, in, out]}``, one row per matrix.

    Row j is ``layout.module_rows(module)[j]`` = (layer, expert): for a dense module one row per
    layer that holds it; for a mixture of experts' expert module one row per (layer, expert),
    each expert's matrix analysed on its own (docs/architecture.md#mixture-of-experts).
    Scanned leaves are reshaped (no copy); unscanned ones are stacked (a copy).
    ``modules`` defaults to every matrix module of the layout.
    """
    _check_params_collection(params)
    out = {}
    for module in layout.matrix_modules if modules is None else modules:
        stacks = [_matrix_rows(info, _get(params, info.path)) for info in layout.matrices(module)]
        for info, stack in zip(layout.matrices(module), stacks):
            if stack.shape[1:] != stacks[0].shape[1:]:
                raise ValueError(f"{info.name} has shape {tuple(stack.shape[1:])}; expected "
                                 f"{tuple(stacks[0].shape[1:])} like the other layers of {module}")
        out[module] = stacks[0] if len(stacks) == 1 else jnp.concatenate(stacks)
    return out


def _set(tree: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    new = dict(tree)
    new[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return new


def replace_module_kernels(params: Mapping[str, Any], layout: ModelLayout,
                           kernels: Mapping[str, Array]) -> dict[str, Any]:
    """A new params tree (plain dicts) with ``kernels[module]`` ``[n, in, out]`` put in place.

    The inverse of :func:`module_kernels`; only the given modules are replaced, everything else
    is shared with ``params``.
    """
    new: dict[str, Any] = dict(params)
    for module, stacked in kernels.items():
        entries = layout.matrices(module)
        expected = module_kernels(params, layout, (module,))[module].shape
        if tuple(stacked.shape) != tuple(expected):
            raise ValueError(f"{module}: new kernels {tuple(stacked.shape)} != existing {tuple(expected)}")
        start = 0
        for info in entries:
            rows = stacked[start:start + len(info.rows)]
            start += len(info.rows)
            leaf_shape = tuple(_get(params, info.path).shape)
            new = _set(new, info.path, rows.reshape(leaf_shape[:-2] + rows.shape[-2:]))
    return new


def short_module_name(module: str) -> str:
    """A plot label: the last component without ``_proj`` (``"self_attn/q_proj"`` -> ``"q"``)."""
    return module.split("/")[-1].removesuffix("_proj")


def module_groups(layout: ModelLayout) -> dict[str, tuple[str, ...]]:
    """Module groups for summaries and the marginal-utility ablation: the layout's groups
    (``"attention"``, ``"mlp"``) and every matrix module alone under its short name."""
    groups = dict(layout.module_groups())
    for module in layout.matrix_modules:
        groups.setdefault(short_module_name(module), (module,))
    return groups


def map_layers(fn, xs: PyTree, layer_batch_size: int | Literal["all", "auto"] = "auto") -> PyTree:
    """Applies ``fn`` to every slice ``xs[i]`` along the leading (layer) axis and stacks the results.

    "all": ``jax.vmap``; an int b: ``lax.map`` over chunks of b layers (vmapped inside a chunk);
    "auto": 1 on the CPU backend, "all" elsewhere (see the CPU note in the module docstring).
    """
    if layer_batch_size == "auto":
        layer_batch_size = 1 if jax.default_backend() == "cpu" else "all"
    if layer_batch_size == "all":
        return jax.vmap(fn)(xs)
    num_layers = jax.tree.leaves(xs)[0].shape[0]
    if layer_batch_size == 1:
        return jax.lax.map(fn, xs)
    return jax.lax.map(fn, xs, batch_size=min(layer_batch_size, num_layers))


@functools.partial(jax.jit, static_argnames=("k", "method", "oversample", "power_iters", "layer_batch_size"))
def _stacked_rank_k_update(w_0, w_t, keys, alpha, *, k, method, oversample, power_iters, layer_batch_size):
    """``rank_k_update`` over stacked layers ``[L, in, out]`` (one compilation per shape and k)."""

    def one(x):
        return rank_k_update(
            x[0], x[1], k, x[2], alpha=alpha, oversample=oversample, power_iters=power_iters, method=method
        )

    return map_layers(one, (w_0, w_t, keys), layer_batch_size)


def rank_k_reconstruct_params(
    params_0: Mapping[str, Any],
    params_t: Mapping[str, Any],
    k: int,
    key: Array,
    *,
    layout: ModelLayout,
    alpha: float = 1.0,
    method: SVDMethod = "auto",
    oversample: int = 10,
    power_iters: int = 2,
    others_from: Literal["base", "final"] = "base",
    layer_batch_size: int | Literal["all", "auto"] = "auto",
) -> dict[str, Any]:
    """The rank-k reconstruction over a whole model (docs/foresight.md#rank-k-reconstruction): every attention/MLP kernel becomes ``rank_k_update``.

    As in the authors' ``upd_rank.py``, only the 2-D attention/MLP weights change; with
    ``others_from="base"`` (their behaviour) every other parameter (embeddings, lm_head, norms,
    q/k_norm, the Qwen2 q/k/v biases) keeps its base value; ``"final"`` takes them from
    ``params_t`` instead.

    Returns:
      A params tree (plain dicts) in the layout of ``params_0``.
    """
    if others_from not in ("base", "final"):
        raise ValueError(f"others_from must be 'base' or 'final', got {others_from!r}")
    check_same_architecture(params_0, params_t)
    base = module_kernels(params_0, layout)
    final = module_kernels(params_t, layout)
    new_kernels = {}
    for index, name in enumerate(layout.matrix_modules):
        keys = jax.random.split(jax.random.fold_in(key, index), base[name].shape[0])
        new_kernels[name] = _stacked_rank_k_update(
            base[name], final[name], keys, jnp.float32(alpha), k=k, method=method, oversample=oversample,
            power_iters=power_iters, layer_batch_size=layer_batch_size,
        )
    return replace_module_kernels(params_0 if others_from == "base" else params_t, layout, new_kernels)


def check_same_architecture(params_a: PyTree, params_b: PyTree, names: tuple[str, str] = ("a", "b")) -> None:
    """Raises ValueError unless two params trees have the same paths, shapes and layout."""
    flat_a = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params_a)}
    flat_b = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params_b)}
    if flat_a.keys() != flat_b.keys():
        only_a = sorted(flat_a.keys() - flat_b.keys())[:5]
        only_b = sorted(flat_b.keys() - flat_a.keys())[:5]
        raise ValueError(
            f"checkpoints {names[0]} and {names[1]} have different architectures: parameters only in"
            f" {names[0]}: {only_a}, only in {names[1]}: {only_b}"
        )
    for path, shape in flat_a.items():
        if flat_b[path] != shape:
            raise ValueError(
                f"checkpoints {names[0]} and {names[1]} have different architectures: {path} has"
                f" shape {shape} vs {flat_b[path]}"
            )


# ----------------------------------------------------------------------------------------------
# Metrics of one module type over stacked layers


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """Static settings of the monitor (hashable: a static jit argument).

    Attributes:
      k: top-k for energy, overlap and the bases kept in the state.
      oversample, power_iters, svd_method: see ``truncated_svd``.
      full_spectrum: exact SVD of every ΔW: ``erank`` of the full spectrum (exact). Otherwise the
        randomized top-k SVD only, and the effective rank of the top-k spectrum is reported as
        ``erank_topk`` (a different quantity, at most k; named so it is never mistaken for it).
      layer_batch_size: "all" vmaps over all layers at once; an int ``lax.map``s over chunks of
        that many layers (less transient memory, more sequential steps); "auto" is 1 on the
        CPU backend (see the CPU note in the module docstring) and "all" elsewhere.
      per_layer: emit the per-layer/per-module keys (~8 scalars per matrix) besides the summaries.
      every: the ``Monitor`` wrapper runs every this many steps (0 = never).
      prefix: first component of every metric key.
    """

    k: int = 8
    oversample: int = 10
    power_iters: int = 2
    svd_method: SVDMethod = "auto"
    full_spectrum: bool = False
    layer_batch_size: int | Literal["all", "auto"] = "auto"
    per_layer: bool = True
    every: int = 0
    prefix: str = "monitor"

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"MonitorConfig.k must be a positive int, got {self.k!r}")
        if self.oversample < 0 or self.power_iters < 0:
            raise ValueError("MonitorConfig.oversample and power_iters must be >= 0")
        if self.svd_method not in ("auto", "randomized", "exact"):
            raise ValueError(f"MonitorConfig.svd_method must be auto/randomized/exact, got {self.svd_method!r}")
        if self.layer_batch_size not in ("all", "auto") and not (
            isinstance(self.layer_batch_size, int) and self.layer_batch_size >= 1
        ):
            raise ValueError(
                f"MonitorConfig.layer_batch_size must be an int >= 1, 'all' or 'auto', got {self.layer_batch_size!r}"
            )
        if self.every < 0:
            raise ValueError(f"MonitorConfig.every must be >= 0, got {self.every}")


def _single_update_metrics(
    w_t: Array, w_0: Array, ref_u: Array | None, ref_v: Array | None, omega: Array | None,
    config: MonitorConfig,
) -> dict[str, Array]:
    """Metrics of one kernel pair ``[in, out]``; see ``update_metrics``."""
    dtype = _compute_dtype(w_0.dtype)
    delta_hf = (w_t.astype(dtype) - w_0.astype(dtype)).T  # [out, in], HF orientation
    energy = jnp.sum(jnp.square(delta_hf))
    out: dict[str, Array] = {"update_norm": jnp.sqrt(energy)}
    if config.full_spectrum:
        u, s, vt = jnp.linalg.svd(delta_hf, full_matrices=False)
        out["erank"] = effective_rank(s)
        out["spectrum"] = s
        u, s_top, vt = u[:, : config.k], s[: config.k], vt[: config.k]
    else:
        u, s_top, vt = truncated_svd(
            delta_hf, config.k, None, oversample=config.oversample,
            power_iters=config.power_iters, method=config.svd_method, test_matrix=omega,
        )
        out["erank_topk"] = effective_rank(s_top)
        out["spectrum"] = s_top
    out["energy"] = energy_ratio(s_top, config.k, energy)
    out["u"] = u  # [out, k]
    out["v"] = vt.T  # [in, k]
    if ref_u is not None:
        # A zero update has an arbitrary basis: overlap is defined as 0 when either is zero.
        nonzero = (energy > 0) & (jnp.sum(jnp.square(ref_u)) > 0)
        out["overlap_left"] = jnp.where(nonzero, subspace_overlap(u, ref_u), 0.0)
        out["overlap_right"] = jnp.where(nonzero, subspace_overlap(out["v"], ref_v), 0.0)
    return out


def update_metrics(
    w_t: Array,
    w_0: Array,
    key: Array,
    *,
    config: MonitorConfig,
    w0_norm: Array | None = None,
    ref_u: Array | None = None,
    ref_v: Array | None = None,
    test_matrix: Array | None = None,
) -> dict[str, Array]:
    """All metrics of one module type over stacked layers, from ΔW = W_t − W_0.

    Args:
      w_t, w_0: ``[L, in, out]`` kernels (any float dtype; computed in float32).
      key: PRNG key of the Gaussian sketch Ω ``[in, k + oversample]``, drawn once and shared by
        the layers (see ``truncated_svd``); unused when ``test_matrix`` is given or on the exact
        path.
      config: static settings (k, SVD, chunking).
      w0_norm: ``[L]`` ‖W_0‖_F when cached (computed otherwise).
      ref_u, ref_v: ``[L, out, k]`` / ``[L, in, k]`` reference bases (HF orientation) to measure
        the subspace overlap against; both or neither.
      test_matrix: optional shared Ω ``[>= in, >= k + oversample]``.

    Returns (per layer, HF orientation ΔW_hf ``[out, in]``):
      update_norm ``[L]`` ‖ΔW‖_F;  rel_update ``[L]`` ‖ΔW‖_F / ‖W_0‖_F (0 if W_0 = 0);
      energy ``[L]`` Σ_{j<=k} σ_j² / ‖ΔW‖_F² (exact denominator);
      erank ``[L]`` (full_spectrum) or erank_topk ``[L]``;
      spectrum ``[L, min(out,in)]`` (full) or ``[L, k]``;  u ``[L, out, k]``;  v ``[L, in, k]``;
      overlap_left / overlap_right ``[L]`` when a reference is given.
    """
    if w_t.shape != w_0.shape or w_t.ndim != 3:
        raise ValueError(f"w_t and w_0 must both be [L, in, out]; got {tuple(w_t.shape)} and {tuple(w_0.shape)}")
    if (ref_u is None) != (ref_v is None):
        raise ValueError("pass both ref_u and ref_v, or neither")
    num_layers, fan_in, fan_out = w_t.shape
    if ref_u is not None:
        if ref_u.shape != (num_layers, fan_out, config.k) or ref_v.shape != (num_layers, fan_in, config.k):
            raise ValueError(
                f"reference bases must be [L, out, k]={(num_layers, fan_out, config.k)} and"
                f" [L, in, k]={(num_layers, fan_in, config.k)}; got {tuple(ref_u.shape)}, {tuple(ref_v.shape)}"
            )
    _check_k(config.k, fan_out, fan_in, "MonitorConfig.k")
    omega = None
    if not config.full_spectrum and not _use_exact_svd(fan_out, fan_in, config.k, config.oversample, config.svd_method):
        omega = test_matrix
        if omega is None:
            omega = jax.random.normal(key, (fan_in, config.k + config.oversample), jnp.float32)
    xs = (w_t, w_0, ref_u, ref_v)

    def one(x):
        return _single_update_metrics(*x, omega, config)

    out = map_layers(one, xs, config.layer_batch_size)
    if w0_norm is None:
        w0_norm = jnp.sqrt(jnp.sum(jnp.square(w_0.astype(jnp.float32)), axis=(1, 2)))
    out["w0_norm"] = w0_norm
    out["rel_update"] = jnp.where(w0_norm > 0, out["update_norm"] / jnp.where(w0_norm > 0, w0_norm, 1.0), 0.0)
    return out


def allocation(update_norms: Mapping[str, Array],
               module_layers: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Array]:
    """Module allocation: each module's share of its layer's squared update norm.

        share_m[ℓ] = ‖ΔW_{m,ℓ}‖_F² / Σ_{m' in layer ℓ} ‖ΔW_{m',ℓ}‖_F²

    (sums to 1 over the modules of a layer; 0 where the layer did not move). Squared norms make
    the shares additive: grouping modules (e.g. all of attention) adds their shares.

    Args:
      update_norms: ``{module: [n_m]}`` ‖ΔW‖_F, row j of module m in layer
        ``module_layers[m][j]``.
      module_layers: the layers of each module's rows (``ModelLayout.module_layers``); None when
        every module has one row per layer in the same order.
    Returns:
      ``{module: [n_m]}`` shares.
    """
    if module_layers is None:
        total = sum(jnp.square(v) for v in update_norms.values())
        safe = jnp.where(total > 0, total, 1.0)
        return {name: jnp.where(total > 0, jnp.square(v) / safe, 0.0) for name, v in update_norms.items()}
    num_layers = 1 + max(max(layers) for layers in module_layers.values())
    totals = jnp.zeros((num_layers,), jnp.float32)
    for name, v in update_norms.items():
        totals = totals.at[jnp.asarray(module_layers[name])].add(jnp.square(v).astype(jnp.float32))
    shares = {}
    for name, v in update_norms.items():
        total = totals[jnp.asarray(module_layers[name])]
        shares[name] = jnp.where(total > 0, jnp.square(v) / jnp.where(total > 0, total, 1.0), 0.0)
    return shares


# ----------------------------------------------------------------------------------------------
# Live hook


class MonitorState(NamedTuple):
    """Pytree state of the live monitor.

    Attributes:
      w0: ``{module: [n, in, out]}`` copy of the base matrices (params dtype; see
        :func:`module_kernels` for the rows).
      w0_norm: ``{module: [n]}`` ‖W_0‖_F, float32.
      ref_u, ref_v: ``{module: [n, out, k]}`` / ``{module: [n, in, k]}`` top-k bases of the
        previous logged update (HF orientation), or None before the first pass.
    """

    w0: dict[str, Array]
    w0_norm: dict[str, Array]
    ref_u: dict[str, Array] | None
    ref_v: dict[str, Array] | None


def init_monitor_state(params: Mapping[str, Any], layout: ModelLayout) -> MonitorState:
    """Snapshots W_0 (the layout's matrices of ``params``) for the live monitor.

    The kernels are copied, so donating ``params``' buffers to a train step later is safe.
    """
    kernels = module_kernels(params, layout)
    w0 = {name: jnp.copy(x) for name, x in kernels.items()}
    w0_norm = {
        name: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2))) for name, x in w0.items()
    }
    return MonitorState(w0=w0, w0_norm=w0_norm, ref_u=None, ref_v=None)


def _mean(x: Array) -> Array:
    return jnp.mean(x.astype(jnp.float32))


def _rows_by_layer(layers: tuple[int, ...]) -> dict[int, Array]:
    """{layer: the row indices of that layer} (several rows per layer for an expert module)."""
    grouped: dict[int, list[int]] = {}
    for row, layer in enumerate(layers):
        grouped.setdefault(layer, []).append(row)
    return {layer: jnp.asarray(rows) for layer, rows in grouped.items()}


def _layer_value(metric: str, stats: Mapping[str, Array], rows: Array) -> Array:
    """One layer's value of a metric from its rows (one row, or one per expert): norms add in
    squares (the layer's expert stack as a whole), the other metrics are means over experts."""
    if metric == "update_norm":
        return jnp.sqrt(jnp.sum(jnp.square(stats["update_norm"][rows].astype(jnp.float32))))
    if metric == "rel_update":
        update2 = jnp.sum(jnp.square(stats["update_norm"][rows].astype(jnp.float32)))
        w02 = jnp.sum(jnp.square(stats["w0_norm"][rows].astype(jnp.float32)))
        return jnp.where(w02 > 0, jnp.sqrt(update2 / jnp.where(w02 > 0, w02, 1.0)), 0.0)
    return _mean(stats[metric][rows])


@functools.partial(jax.jit, static_argnames=("config", "layout"))
def monitor_step(
    state: MonitorState, params: Mapping[str, Any], key: Array, *, config: MonitorConfig,
    layout: ModelLayout,
) -> tuple[MonitorState, dict[str, Array]]:
    """One live monitor pass over ``params`` (jitted; ``config`` and ``layout`` static).

    Computes ΔW = W_t − W_0 for every matrix the layout lists (the attention and MLP matrices of
    every layer) and returns ``(new_state, metrics)``, the new state holding this pass's top-k
    bases as the reference of the next pass. ``metrics`` maps flat keys to float32 scalars
    (``P`` = config.prefix):

    per layer/module (``config.per_layer``), e.g. ``P/layers_3/mlp/up_proj/<metric>`` with
      update_norm, rel_update, alloc (share of the layer's squared update norm),
      energy_top{k}, erank (full_spectrum) or erank_topk,
      overlap_left / overlap_right vs the previous pass (absent on the first pass);
      for an expert module (``mlp/experts/up_proj``) each expert's matrix is analysed on its own
      and the layer's key aggregates its experts: update_norm and rel_update of the whole stack
      (root of summed squares), alloc summed, the other metrics averaged over the experts;
    per module (mean over its matrices: layers, and experts), ``P/mean/<module>/<metric>`` for
      the same metrics except alloc, plus ``P/alloc/<module>`` its share of the whole model's
      squared update;
    model-wide: ``P/total/update_norm``, ``P/total/rel_update`` (‖ΔW‖/‖W_0‖ over all monitored
      matrices), ``P/mean/<metric>`` (mean over all modules and layers).

    Cost: see the module docstring.
    """
    modules = layout.matrix_modules
    kernels_t = module_kernels(params, layout)
    for name in modules:
        if kernels_t[name].shape != state.w0[name].shape:
            raise ValueError(f"{name}: params kernels {kernels_t[name].shape} != W_0 {state.w0[name].shape}")
    # One Gaussian sketch Ω per pass, shared by every matrix (see truncated_svd: test_matrix).
    omega = None
    if not config.full_spectrum:
        max_in = max(state.w0[name].shape[1] for name in modules)
        omega = jax.random.normal(key, (max_in, config.k + config.oversample), jnp.float32)
    new_u, new_v, per_module = {}, {}, {}
    for name in modules:
        stats = update_metrics(
            kernels_t[name], state.w0[name], key, config=config, w0_norm=state.w0_norm[name],
            ref_u=None if state.ref_u is None else state.ref_u[name],
            ref_v=None if state.ref_v is None else state.ref_v[name],
            test_matrix=omega,
        )
        new_u[name], new_v[name] = stats.pop("u"), stats.pop("v")
        stats.pop("spectrum")
        per_module[name] = stats
    module_layers = {name: layout.module_layers(name) for name in modules}
    shares = allocation({name: s["update_norm"] for name, s in per_module.items()}, module_layers)
    erank_key = "erank" if config.full_spectrum else "erank_topk"
    named = {
        "update_norm": "update_norm", "rel_update": "rel_update", "energy": f"energy_top{config.k}",
        erank_key: erank_key,
    }
    if state.ref_u is not None:
        named.update(overlap_left="overlap_left", overlap_right="overlap_right")

    p = config.prefix
    metrics: dict[str, Array] = {}
    for name, stats in per_module.items():
        if config.per_layer:
            for layer, rows in _rows_by_layer(module_layers[name]).items():
                base = f"{p}/layers_{layer}/{name}"
                for src, dst in named.items():
                    metrics[f"{base}/{dst}"] = _layer_value(src, stats, rows)
                metrics[f"{base}/alloc"] = jnp.sum(shares[name][rows]).astype(jnp.float32)
        for src, dst in named.items():
            metrics[f"{p}/mean/{name}/{dst}"] = _mean(stats[src])
    total_update2 = sum(jnp.sum(jnp.square(s["update_norm"])) for s in per_module.values())
    total_w02 = sum(jnp.sum(jnp.square(s["w0_norm"])) for s in per_module.values())
    for name, stats in per_module.items():
        metrics[f"{p}/alloc/{name}"] = jnp.where(
            total_update2 > 0, jnp.sum(jnp.square(stats["update_norm"])) / jnp.where(total_update2 > 0, total_update2, 1.0), 0.0
        )
    metrics[f"{p}/total/update_norm"] = jnp.sqrt(total_update2)
    metrics[f"{p}/total/rel_update"] = jnp.where(total_w02 > 0, jnp.sqrt(total_update2 / jnp.where(total_w02 > 0, total_w02, 1.0)), 0.0)
    for src, dst in named.items():
        if src in ("update_norm",):
            continue
        metrics[f"{p}/mean/{dst}"] = _mean(jnp.concatenate([per_module[n][src] for n in modules]))
    return state._replace(ref_u=new_u, ref_v=new_v), metrics


class Monitor:
    """Stateful convenience wrapper the trainer calls every step (host side, not jitted).

    ``monitor = Monitor(config, initial_params, layout, seed=0)``; then each step
    ``metrics = monitor.maybe_run(step, params)`` returns a ``dict[str, float]`` every
    ``config.every`` steps (step % every == 0, step > 0) and None otherwise. The PRNG key of a
    pass is ``fold_in(PRNGKey(seed), step)``, so a resumed run reproduces the same sketches.
    The reference bases of the last pass go into the trainer's checkpoints
    (:meth:`reference_bases` / :meth:`set_reference_bases`), so a resumed run's passes equal an
    uninterrupted run's.
    """

    def __init__(self, config: MonitorConfig, initial_params: Mapping[str, Any], layout: ModelLayout,
                 *, seed: int = 0):
        self.config = config
        self.layout = layout
        self.state = init_monitor_state(initial_params, layout)
        self._key = jax.random.PRNGKey(seed)

    def reference_bases(self) -> dict[str, dict[str, Array]] | None:
        """``{"u": ref_u, "v": ref_v}``, the bases the next pass compares with (None before the
        first pass): what a checkpoint must keep for an exact resume."""
        if self.state.ref_u is None:
            return None
        return {"u": self.state.ref_u, "v": self.state.ref_v}

    def abstract_reference_bases(self, params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Shapes and dtypes of :meth:`reference_bases` after a pass over ``params`` (no compute)."""
        new_state = jax.eval_shape(
            lambda s, p: monitor_step(s, p, self._key, config=self.config, layout=self.layout)[0],
            self.state, params,
        )
        return {"u": new_state.ref_u, "v": new_state.ref_v}

    def set_reference_bases(self, bases: Mapping[str, Mapping[str, Array]]) -> None:
        """Restores :meth:`reference_bases` (e.g. from a checkpoint)."""
        self.state = self.state._replace(ref_u=dict(bases["u"]), ref_v=dict(bases["v"]))

    def should_run(self, step: int) -> bool:
        return self.config.every > 0 and step > 0 and step % self.config.every == 0

    def run(self, step: int, params: Mapping[str, Any]) -> dict[str, float]:
        """One pass now, whatever the step; returns host floats."""
        self.state, metrics = monitor_step(
            self.state, params, jax.random.fold_in(self._key, step), config=self.config, layout=self.layout
        )
        return {name: float(value) for name, value in jax.device_get(metrics).items()}

    def maybe_run(self, step: int, params: Mapping[str, Any]) -> dict[str, float] | None:
        return self.run(step, params) if self.should_run(step) else None
