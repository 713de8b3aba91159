"""EffOPD: extrapolation along the accumulated update direction, as an optax transform.

The rule (the authors' code; ``docs/effopd_rule.md#the-search``). Let t be the 1-based index of
the current update and θ_B the *anchor* (initially the filtered leaves of the initial params).
At trigger steps t = 1, 2, 4, 8, ... (powers of two):

  θ  = params + updates                         # the inner optimizer's step
  d  = θ − θ_B                                  # on the filtered leaves only
  s₀ = score(θ);  best = s₀
  for k = 1..K:                                 # K = max_candidates (5)
      θ_k = θ_B + m_k · d,  m_k = 2k + 1        # multipliers 3, 5, 7, 9, 11
      s_k = score(θ_k)
      if s_k > best: accept θ_k, best = s_k     # strict improvement only
      else: stop                                # greedy line search, early stop
  params ← best point;  θ_B ← best point (filtered leaves)

(The authors apply θ ← θ + a·(θ − θ_B) with a₁ = 2, a_{k+1} = a_k/(1 + a_k); in closed form that is
θ_B + (2k+1)·d.) At other steps the updates pass through unchanged. Leaves outside the filter are
never extrapolated, and no other transform's state (e.g. Adam's moments) is touched.

One rule, two drivers:

* **jit** (``effopd(search="jit")``, default): ``update(updates, state, params, score_fn=f)`` with a
  traceable ``f(params) -> scalar`` runs the whole search inside ``jax.jit``: ``lax.cond`` on the
  trigger, ``lax.while_loop`` over the candidates, no host synchronisation.
* **host** (``effopd(search="host")``): ``update`` only counts and passes through, and flags
  ``search_due`` at trigger steps; the trainer then calls :func:`effopd_host_search` with a Python
  ``score_fn`` (sampling + answer checking), which runs the same search with the same jitted
  building blocks and writes the new anchor and diagnostics back into the optimizer state.

Both drivers build candidates with ``_candidate_point``/``_candidate_updates`` and decide with
``_search_start``/``_search_advance``/``_search_info`` below (the host driver calls jitted copies of
the same functions); with the same scores they make the same decisions and produce bit-identical
parameters and anchors (tested).

Exactness: every scored point is exactly the point the trainer ends up holding. In the jit driver a
candidate is scored as ``optax.apply_updates(params, u_k)`` where ``u_k`` is the update the
transform would return for it, so ``apply_updates(params, returned_updates)`` equals the accepted
point bit for bit, and the anchor is set from that same point. Place ``effopd`` **last** in the
chain: a transform after it would change the updates after the search has scored them.

Other trainers, as they are:

* ``flax.nnx.Optimizer(model, optax.chain(..., effopd()), wrt=nnx.Param)`` keeps the optax state as
  a tree of nnx Variables (``to_opt_state`` wraps every array leaf in an ``OptArray``, or in an
  ``OptVariable`` with the parameter's metadata when the leaf sits in a ``Param``), while its
  ``update(model, grads, **kwargs)`` hands ``tx.update`` the Variables' values (``nnx.as_pure``),
  forwards ``score_fn=`` untouched and writes the new state back into the Variables. The jit
  driver therefore runs inside it as is. The functions below that take an ``opt_state`` read the
  values of such Variables without copying an array, and :func:`replace_effopd_state` /
  :func:`effopd_host_search` write their results into them in place (with ``nnx.update``, as the
  optimizer does), so ``optimizer.opt_state`` and a model whose ``nnx.state`` was passed as
  ``params`` are up to date when they return. This module never imports flax: a state can only
  hold nnx Variables once ``flax.nnx`` has been loaded.
* ``flax.training.train_state.TrainState`` holds a plain optax state: the host driver works with
  ``state.apply_gradients`` as is. Its ``apply_gradients`` does not forward extra arguments to
  ``tx.update``, so the jit driver needs a step that calls ``state.tx.update(..., score_fn=f)``
  itself.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

PyTree = Any
ScoreFn = Callable[[optax.Params], Any]

# The authors' `_should_modify_param` (docs/effopd_rule.md#parameter-filter): a lower-cased
# name containing any of these substrings is extrapolated. On our Qwen paths (docs/architecture.md)
# it selects q/k/v/o_proj, gate/up/down_proj, q_norm/k_norm (under `self_attn/`) and
# `post_attention_layernorm` (contains "attention"); it leaves out `input_layernorm`, the final
# `norm`, `embed_tokens` and `lm_head`. It works for unscanned `layers_{i}/...` and scanned
# `layers/...` paths alike.
DEFAULT_PARAM_FILTER = (
    r"attn|attention|q_proj|k_proj|v_proj|o_proj|mlp|feed_forward|ffn|gate_proj|up_proj|down_proj"
)


def default_multipliers(max_candidates: int) -> tuple[float, ...]:
    """The authors' ladder: candidate k (1-based) is θ_B + (2k + 1)·d, i.e. 3, 5, 7, ..."""
    return tuple(float(2 * k + 1) for k in range(1, max_candidates + 1))


class EffOPDSearchInfo(NamedTuple):
    """Diagnostics of the most recent completed search (jit-friendly; lives in the state).

    Attributes:
      step: int32 [] — the 1-based update index of that search; 0 before the first one.
      scores: float32 [K+1] — ``scores[0]`` = score(θ), ``scores[k]`` = score of candidate k;
        NaN for candidates not evaluated (the search stopped earlier).
      accepted_index: int32 [] — 0 when θ was kept (no candidate improved), else k.
      accepted_multiplier: float32 [] — 1.0 when θ was kept, else the multiplier m_k of d.
      num_evals: int32 [] — number of ``score_fn`` calls (1 + candidates scored).
    """

    step: jax.Array
    scores: jax.Array
    accepted_index: jax.Array
    accepted_multiplier: jax.Array
    num_evals: jax.Array


class EffOPDState(NamedTuple):
    """State of :func:`effopd`. A pytree that orbax saves and restores as is.

    Attributes:
      count: int32 [] — number of updates applied so far (t of the last update).
      anchor: θ_B — the params' tree with the filtered leaves (same shape and sharding as the
        params, dtype ``anchor_dtype`` or the params' dtype) and ``optax.MaskedNode()`` in place
        of every leaf outside the filter (an empty pytree node: no memory, nothing to save).
      multipliers: float32 [K] — the candidate ladder (m_1, ..., m_K), kept here so that the host
        driver needs nothing but the state.
      search_due: bool [] — host mode only: the last update was a trigger step and
        :func:`effopd_host_search` has not run yet. Always False in jit mode.
      last_search: :class:`EffOPDSearchInfo` of the most recent completed search.
    """

    count: jax.Array
    anchor: PyTree
    multipliers: jax.Array
    search_due: jax.Array
    last_search: EffOPDSearchInfo


@dataclasses.dataclass(frozen=True)
class EffOPDSearchReport:
    """Host-side summary of one search, for logs (Python numbers).

    ``multipliers[i]`` is the multiplier of d whose point scored ``scores[i]``; index 0 is θ itself
    (multiplier 1). Only evaluated points are listed.
    """

    step: int
    multipliers: tuple[float, ...]
    scores: tuple[float, ...]
    accepted_index: int
    accepted_multiplier: float
    num_evals: int

    @classmethod
    def from_state(cls, opt_state: PyTree) -> "EffOPDSearchReport":
        """Reads the last search out of an optimizer state holding one :class:`EffOPDState`."""
        state = find_effopd_state(opt_state)
        info = jax.device_get(state.last_search)
        ladder = np.concatenate([[1.0], np.asarray(jax.device_get(state.multipliers))])
        num_evals = int(info.num_evals)
        return cls(
            step=int(info.step),
            multipliers=tuple(float(m) for m in ladder[:num_evals]),
            scores=tuple(float(s) for s in np.asarray(info.scores)[:num_evals]),
            accepted_index=int(info.accepted_index),
            accepted_multiplier=float(info.accepted_multiplier),
            num_evals=num_evals,
        )


# ----------------------------------------------------------------------------------------------
# nnx Variables: flax.nnx.Optimizer keeps the optax state as a tree of Variables.


def _nnx_variable_type() -> type | None:
    """``flax.nnx.Variable`` when flax.nnx is loaded, else None.

    Looked up rather than imported: a tree can only hold nnx Variables once flax.nnx has been
    imported by whoever built it, and plain optax users then pay nothing for flax.
    """
    return getattr(sys.modules.get("flax.nnx"), "Variable", None)


def _is_variable(x: Any) -> bool:
    variable_type = _nnx_variable_type()
    return variable_type is not None and isinstance(x, variable_type)


def _holds_variables(tree: PyTree) -> bool:
    return any(_is_variable(x) for x in jax.tree.leaves(tree, is_leaf=_is_variable))


def _values(tree: PyTree) -> PyTree:
    """``tree`` with every nnx Variable replaced by the value it holds (``nnx.as_pure``).

    The arrays are the Variables' own (nothing is copied), and a tree without Variables is
    returned as it is. This is exactly the tree ``nnx.Optimizer.update`` hands ``tx.update``.
    """
    if not _holds_variables(tree):
        return tree
    return sys.modules["flax.nnx"].as_pure(tree)


def _write_values(target: PyTree, values: PyTree, what: str) -> PyTree:
    """``values`` (a tree without Variables) delivered in the form of ``target``.

    ``target`` has the structure of ``values`` except that some of its subtrees are nnx Variables
    holding them. Each such Variable receives its new value in place (``nnx.update``, as
    ``nnx.Optimizer.update`` writes its state), so whoever holds the Variable (the optimizer, the
    model) sees it; the returned tree holds those same Variables. Without Variables: ``values``.
    The structures are checked before anything is written.
    """
    if not _holds_variables(target):
        return values
    parts, treedef = jax.tree.flatten(target, is_leaf=_is_variable)
    try:
        new_parts = treedef.flatten_up_to(values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{what}: new values do not match the given tree: {err}") from err
    update = sys.modules["flax.nnx"].update
    for old, new in zip(parts, new_parts):
        if _is_variable(old):
            update(old, new)
    kept = [old if _is_variable(old) else new for old, new in zip(parts, new_parts)]
    return jax.tree.unflatten(treedef, kept)


# ----------------------------------------------------------------------------------------------
# Parameter filter and anchor.


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _path_string(path: tuple) -> str:
    """``('layers_0', 'self_attn', 'q_proj', 'kernel')`` key path -> ``layers_0/self_attn/q_proj/kernel``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _make_path_predicate(param_filter: Any) -> Callable[[str], bool]:
    if hasattr(param_filter, "effopd_filter"):  # a model layout (effopd_jax.models.layout(config))
        return param_filter.effopd_filter()
    if param_filter is None:
        pattern = re.compile(DEFAULT_PARAM_FILTER, re.IGNORECASE)
        return lambda path: pattern.search(path) is not None
    if isinstance(param_filter, str):
        try:
            pattern = re.compile(param_filter)
        except re.error as err:
            raise ValueError(f"param_filter: invalid regular expression {param_filter!r}: {err}") from err
        return lambda path: pattern.search(path) is not None
    if callable(param_filter):
        return param_filter
    raise ValueError(
        "param_filter must be None, a model layout, a regex string or a callable(path: str) -> bool; "
        f"got {type(param_filter).__name__}"
    )


def _make_anchor(params: optax.Params, selects: Callable[[str], bool], anchor_dtype) -> PyTree:
    """Copies the selected leaves (a fresh buffer, so donating params later is safe).

    nnx Variables in ``params`` (``nnx.Optimizer`` initialises with ``nnx.state(model, wrt)``) are
    kept around their anchor leaf, so the optimizer wraps it with the parameter's metadata as it
    does Adam's moments; the path the filter sees is the parameter's own (``mlp/up_proj/kernel``),
    without the Variable's ``value`` key.
    """
    selected_paths: list[str] = []
    all_paths: list[str] = []

    def leaf(path, param):
        name = _path_string(path)
        all_paths.append(name)
        if not selects(name):
            return optax.MaskedNode()
        if not jnp.issubdtype(jnp.result_type(param), jnp.floating):
            raise ValueError(f"param_filter selected the non-floating parameter {name!r} ({jnp.result_type(param)})")
        selected_paths.append(name)
        return jnp.array(param, dtype=anchor_dtype or jnp.result_type(param), copy=True)

    def leaf_or_variable(path, node):
        if _is_variable(node):
            return jax.tree.map(lambda value: leaf(path, value), node)
        return leaf(path, node)

    anchor = jax.tree_util.tree_map_with_path(leaf_or_variable, params, is_leaf=_is_variable)
    if not selected_paths:
        raise ValueError(
            "param_filter selected no parameter, so EffOPD would never extrapolate anything; "
            f"parameter paths are e.g. {all_paths[:6]}"
        )
    return anchor


def _anchor_from_point(point: optax.Params, anchor: PyTree) -> PyTree:
    """The filtered leaves of ``point`` in the anchor's dtype; MaskedNode elsewhere."""
    return jax.tree.map(
        lambda a, p: a if _is_masked(a) else p.astype(a.dtype), anchor, point, is_leaf=_is_masked
    )


# ----------------------------------------------------------------------------------------------
# The rule: candidate points (shared by both drivers).


def _apply_leaf(param: jax.Array, update: jax.Array) -> jax.Array:
    """``optax.apply_updates`` for one leaf (same arithmetic, so the results are bit-identical)."""
    return jnp.asarray(param + update).astype(jnp.asarray(param).dtype)


def _theta_point(params: optax.Params, updates: optax.Updates | None) -> optax.Params:
    """θ = params + updates (or params itself when the step is already applied)."""
    if updates is None:
        return params
    return optax.apply_updates(params, updates)


def _extrapolated_target(param, update, anchor_leaf, multiplier):
    """θ_B + m·(θ − θ_B) for one filtered leaf, in float32 (or wider, e.g. float64 params)."""
    compute_dtype = jnp.promote_types(jnp.result_type(param), jnp.float32)
    theta = param if update is None else _apply_leaf(param, update)
    base = anchor_leaf.astype(compute_dtype)
    return base + multiplier.astype(compute_dtype) * (theta.astype(compute_dtype) - base)


def _candidate_updates(
    params: optax.Params, updates: optax.Updates, anchor: PyTree, multiplier: jax.Array
) -> optax.Updates:
    """Updates u_m with ``params + u_m`` = θ_B + m·d on filtered leaves and = θ elsewhere.

    Args:
      params: the params before this step, any tree of ``[...]`` arrays.
      updates: the inner optimizer's updates, same tree.
      anchor: θ_B (MaskedNode on unfiltered leaves).
      multiplier: float32 [] — m.
    """

    def leaf(anchor_leaf, param, update):
        if _is_masked(anchor_leaf):
            return update
        target = _extrapolated_target(param, update, anchor_leaf, multiplier)
        return (target - param.astype(target.dtype)).astype(jnp.result_type(update))

    return jax.tree.map(leaf, anchor, params, updates, is_leaf=_is_masked)


def _candidate_point(
    params: optax.Params, updates: optax.Updates | None, anchor: PyTree, multiplier: jax.Array
) -> optax.Params:
    """The parameters the trainer would hold if candidate ``multiplier`` were accepted.

    With ``updates``: ``apply_updates(params, _candidate_updates(...))`` (what the jit driver returns).
    With ``updates=None`` (params already hold θ): θ_B + m·(θ − θ_B) cast to the params' dtype.
    """
    if updates is not None:
        return optax.apply_updates(params, _candidate_updates(params, updates, anchor, multiplier))
    return jax.tree.map(
        lambda a, p: p if _is_masked(a) else _extrapolated_target(p, None, a, multiplier).astype(p.dtype),
        anchor,
        params,
        is_leaf=_is_masked,
    )


# ----------------------------------------------------------------------------------------------
# The rule: acceptance (shared by both drivers).


class _SearchCarry(NamedTuple):
    num_scored: jax.Array  # int32 []: candidates scored so far
    best_index: jax.Array  # int32 []: 0 = θ, k = candidate k
    best_score: jax.Array  # float32 []
    scores: jax.Array  # float32 [K+1]
    done: jax.Array  # bool []


def _as_score(value: Any) -> jax.Array:
    score = jnp.asarray(value, dtype=jnp.float32)
    if score.shape != ():
        raise ValueError(f"score_fn must return a scalar; got shape {score.shape}")
    return score


def _search_start(theta_score: jax.Array, num_candidates: int) -> _SearchCarry:
    """Scores θ first: it is the incumbent every candidate must beat."""
    theta_score = _as_score(theta_score)
    return _SearchCarry(
        num_scored=jnp.zeros((), jnp.int32),
        best_index=jnp.zeros((), jnp.int32),
        best_score=theta_score,
        scores=jnp.full((num_candidates + 1,), jnp.nan, jnp.float32).at[0].set(theta_score),
        done=jnp.asarray(num_candidates == 0),
    )


def _search_advance(carry: _SearchCarry, score: jax.Array) -> _SearchCarry:
    """Records the score of candidate ``num_scored + 1``; accepts it only on strict improvement.

    The search stops at the first candidate that does not improve (NaN never improves) or after
    the last candidate.
    """
    score = _as_score(score)
    num_candidates = carry.scores.shape[0] - 1
    index = carry.num_scored + 1
    improved = score > carry.best_score
    return _SearchCarry(
        num_scored=index,
        best_index=jnp.where(improved, index, carry.best_index),
        best_score=jnp.where(improved, score, carry.best_score),
        scores=carry.scores.at[index].set(score),
        done=jnp.logical_or(jnp.logical_not(improved), index >= num_candidates),
    )


def _search_info(carry: _SearchCarry, multipliers: jax.Array, step: jax.Array) -> EffOPDSearchInfo:
    ladder = jnp.concatenate([jnp.ones((1,), jnp.float32), multipliers.astype(jnp.float32)])
    return EffOPDSearchInfo(
        step=jnp.asarray(step, jnp.int32),
        scores=carry.scores,
        accepted_index=carry.best_index,
        accepted_multiplier=ladder[carry.best_index],
        num_evals=carry.num_scored + 1,
    )


def _empty_info(num_candidates: int) -> EffOPDSearchInfo:
    return EffOPDSearchInfo(
        step=jnp.zeros((), jnp.int32),
        scores=jnp.full((num_candidates + 1,), jnp.nan, jnp.float32),
        accepted_index=jnp.zeros((), jnp.int32),
        accepted_multiplier=jnp.ones((), jnp.float32),
        num_evals=jnp.zeros((), jnp.int32),
    )


def _is_trigger(step: jax.Array, trigger: str | int) -> jax.Array:
    """Whether 1-based update ``step`` triggers a search: powers of two, or multiples of N."""
    if trigger == "pow2":
        return jnp.logical_and(step > 0, jnp.bitwise_and(step, step - 1) == 0)
    return step % trigger == 0


# ----------------------------------------------------------------------------------------------
# Jit driver.


def _jit_search(
    params: optax.Params,
    updates: optax.Updates,
    anchor: PyTree,
    multipliers: jax.Array,
    score_fn: ScoreFn,
    step: jax.Array,
) -> tuple[optax.Updates, PyTree, EffOPDSearchInfo]:
    """The whole search as traced code: returns (new updates, new anchor, diagnostics).

    Only scalars are carried through the ``while_loop``; the accepted point is rebuilt from its
    index afterwards, so the peak memory is one candidate tree on top of params, updates, anchor.
    """
    num_candidates = multipliers.shape[0]
    carry = _search_start(score_fn(_theta_point(params, updates)), num_candidates)

    def body(carry: _SearchCarry) -> _SearchCarry:
        multiplier = multipliers[carry.num_scored]
        return _search_advance(carry, score_fn(_candidate_point(params, updates, anchor, multiplier)))

    carry = lax.while_loop(lambda c: jnp.logical_not(c.done), body, carry)
    accepted_multiplier = multipliers[jnp.maximum(carry.best_index - 1, 0)]
    new_updates = lax.cond(
        carry.best_index == 0,
        lambda: updates,  # rollback: θ exactly as the inner optimizer produced it
        lambda: _candidate_updates(params, updates, anchor, accepted_multiplier),
    )
    new_anchor = _anchor_from_point(optax.apply_updates(params, new_updates), anchor)
    return new_updates, new_anchor, _search_info(carry, multipliers, step)


def effopd(
    *,
    max_candidates: int | None = None,
    param_filter: Callable[[str], bool] | str | Any | None = None,
    trigger: str | int = "pow2",
    multipliers: Sequence[float] | None = None,
    anchor_dtype: Any = None,
    search: str = "jit",
) -> optax.GradientTransformationExtraArgs:
    """EffOPD as an optax transform; put it last: ``optax.chain(optax.adamw(lr), effopd())``.

    ``update(updates, state, params, *, score_fn)``: ``score_fn(params) -> scalar``, higher is
    better (e.g. minus a validation loss, or validation accuracy). See the module docstring for
    the rule.

    Args:
      max_candidates: K, the number of extrapolation candidates per search (>= 1). Default 5 with
        the authors' ladder, or ``len(multipliers)`` when ``multipliers`` is given.
      param_filter: which leaves are extrapolated: a callable on the ``/``-joined key path (e.g.
        ``"layers_3/self_attn/q_proj/kernel"``) returning bool, or a regex string searched in
        that path (``re.search``); with ``nnx.Optimizer`` it is the ``nnx.state`` path without the
        Variable's ``value`` key (``mlp/up_proj/kernel``). ``None``: :data:`DEFAULT_PARAM_FILTER`,
        the authors' rule (``docs/effopd_rule.md#parameter-filter``: attention and MLP weights,
        q/k norms, post-attention norm; not the input norm, the final norm, embeddings or
        ``lm_head``). A model layout (``effopd_jax.models.layout(config)``): the leaves its family
        marks for extrapolation (for Qwen the same set as the default; what the trainer passes).
        Must select at least one leaf.
      trigger: ``"pow2"`` (the authors': t = 1, 2, 4, 8, ...) or a positive int N: every N-th
        update (t = N, 2N, 3N, ...). [beyond the paper]
      multipliers: the ladder (m_1, ..., m_K) of d = θ − θ_B, each finite and > 1. Default:
        3, 5, 7, ... (2k + 1). [beyond the paper]
      anchor_dtype: dtype in which θ_B is stored, e.g. ``jnp.bfloat16`` to halve its memory.
        Default: the params' dtype. Caveat: d = θ − θ_B then carries θ_B's rounding error
        (relative 2⁻⁹ for bfloat16), which the ladder multiplies; use it only when the update
        between triggers is large compared with that. [beyond the paper]
      search: ``"jit"`` — ``update`` needs ``score_fn=`` (traceable) and runs the search itself;
        ``"host"`` — ``update`` takes no ``score_fn``, only counts, passes updates through and sets
        ``state.search_due`` at trigger steps; run :func:`effopd_host_search` after it.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`EffOPDState`.

    Raises:
      ValueError: on a bad option (the message names it), on ``update`` without ``params``, with a
        missing / unexpected ``score_fn``, or a non-scalar score.
    """
    if multipliers is None:
        if max_candidates is None:
            max_candidates = 5
        if isinstance(max_candidates, bool) or not isinstance(max_candidates, (int, np.integer)) or max_candidates < 1:
            raise ValueError(f"max_candidates must be an int >= 1; got {max_candidates!r}")
        ladder = default_multipliers(int(max_candidates))
    else:
        ladder = tuple(float(m) for m in multipliers)
        if not ladder:
            raise ValueError("multipliers must be non-empty")
        if not all(np.isfinite(m) and m > 1.0 for m in ladder):
            raise ValueError(f"multipliers must all be finite and > 1; got {ladder}")
        if max_candidates is not None and max_candidates != len(ladder):
            raise ValueError(
                f"max_candidates={max_candidates!r} disagrees with len(multipliers)={len(ladder)}"
            )
    if trigger != "pow2" and (
        isinstance(trigger, bool) or not isinstance(trigger, (int, np.integer)) or trigger < 1
    ):
        raise ValueError(f"trigger must be 'pow2' or a positive int; got {trigger!r}")
    if anchor_dtype is not None:
        anchor_dtype = jnp.dtype(anchor_dtype)
        if not jnp.issubdtype(anchor_dtype, jnp.floating):
            raise ValueError(f"anchor_dtype must be a floating dtype; got {anchor_dtype}")
    if search not in ("jit", "host"):
        raise ValueError(f"search must be 'jit' or 'host'; got {search!r}")
    selects = _make_path_predicate(param_filter)

    def init_fn(params: optax.Params) -> EffOPDState:
        return EffOPDState(
            count=jnp.zeros((), jnp.int32),
            anchor=_make_anchor(params, selects, anchor_dtype),
            multipliers=jnp.asarray(ladder, jnp.float32),
            search_due=jnp.zeros((), jnp.bool_),
            last_search=_empty_info(len(ladder)),
        )

    def update_fn(
        updates: optax.Updates,
        state: EffOPDState,
        params: optax.Params | None = None,
        *,
        score_fn: ScoreFn | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, EffOPDState]:
        del extra_args  # other transforms' extra arguments (optax.chain broadcasts them)
        if params is None:
            raise ValueError("effopd.update needs params (θ = params + updates)")
        step = state.count + 1  # 1-based index of this update
        is_trigger = _is_trigger(step, trigger)
        if search == "host":
            if score_fn is not None:
                raise ValueError("effopd(search='host').update takes no score_fn; pass it to effopd_host_search")
            return updates, state._replace(count=step, search_due=is_trigger)
        if score_fn is None:
            raise ValueError(
                "effopd(search='jit').update needs score_fn=<traceable fn(params) -> scalar>; "
                "use effopd(search='host') with effopd_host_search for an untraceable scorer"
            )
        new_updates, new_anchor, info = lax.cond(
            is_trigger,
            lambda: _jit_search(params, updates, state.anchor, state.multipliers, score_fn, step),
            lambda: (updates, state.anchor, state.last_search),
        )
        return new_updates, EffOPDState(
            count=step,
            anchor=new_anchor,
            multipliers=state.multipliers,
            search_due=jnp.zeros((), jnp.bool_),
            last_search=info,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Locating the state inside a composed optimizer state.


def _is_effopd_state(x: Any) -> bool:
    return isinstance(x, EffOPDState)


def _find_effopd_node(opt_state: PyTree) -> EffOPDState:
    """The one :class:`EffOPDState` node inside ``opt_state`` as stored (nnx Variables and all)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_effopd_state) if _is_effopd_state(x)]
    if len(found) != 1:
        raise ValueError(f"opt_state must contain exactly one EffOPDState; found {len(found)}")
    return found[0]


def find_effopd_state(opt_state: PyTree) -> EffOPDState:
    """The one :class:`EffOPDState` inside ``opt_state`` (chain, MultiSteps, ... or itself).

    ``opt_state`` may also be the state of ``flax.nnx.Optimizer``, whose leaves are nnx Variables:
    the result then holds the Variables' values (their own arrays, not copies). Read it; to change
    it, use :func:`replace_effopd_state`.

    Raises:
      ValueError: when ``opt_state`` holds no or several EffOPD states.
    """
    return _values(_find_effopd_node(opt_state))


def replace_effopd_state(opt_state: PyTree, new_state: EffOPDState) -> PyTree:
    """``opt_state`` with its :class:`EffOPDState` replaced by ``new_state`` (a state of arrays).

    Where the old state's leaves are nnx Variables (``flax.nnx.Optimizer``), the new values are
    written into those Variables in place, so ``optimizer.opt_state`` already holds them; the
    returned tree holds the same Variables (every other Variable is passed through untouched).
    """
    new_node = _write_values(_find_effopd_node(opt_state), new_state, "replace_effopd_state")
    return jax.tree.map(
        lambda x: new_node if _is_effopd_state(x) else x,
        opt_state,
        is_leaf=lambda x: _is_effopd_state(x) or _is_variable(x),
    )


def effopd_search_due(opt_state: PyTree) -> bool:
    """Host check (one scalar device-to-host copy): must :func:`effopd_host_search` run now?

    ``opt_state``: a plain optax state or ``nnx.Optimizer.opt_state``
    (see :func:`find_effopd_state`).
    """
    return bool(jax.device_get(find_effopd_state(opt_state).search_due))


def effopd_metrics(opt_state: PyTree) -> dict[str, jax.Array]:
    """Search diagnostics as a dict of arrays; traceable, so it can be returned from a jitted step.

    Keys: ``effopd/searched`` (bool: a search completed at this update), ``effopd/accepted_multiplier``
    (1 = θ kept), ``effopd/accepted_index``, ``effopd/num_evals``, ``effopd/score_theta`` (score of
    θ), ``effopd/best_score``, ``effopd/scores`` (float32 [K+1], NaN = not evaluated). The values
    describe the last search; ``searched`` tells whether it happened at the current update.
    ``opt_state``: a plain optax state or ``nnx.Optimizer.opt_state`` (also inside ``nnx.jit``).
    """
    state = find_effopd_state(opt_state)
    info = state.last_search
    return {
        "effopd/searched": jnp.logical_and(info.step == state.count, info.step > 0),
        "effopd/accepted_multiplier": info.accepted_multiplier,
        "effopd/accepted_index": info.accepted_index,
        "effopd/num_evals": info.num_evals,
        "effopd/score_theta": info.scores[0],
        "effopd/best_score": info.scores[info.accepted_index],
        "effopd/scores": info.scores,
    }


# ----------------------------------------------------------------------------------------------
# Host driver: the same search with a Python scorer. Each building block is jitted once.

_candidate_point_jit = jax.jit(_candidate_point)
_candidate_updates_jit = jax.jit(_candidate_updates)
_search_start_jit = jax.jit(_search_start, static_argnums=1)
_search_advance_jit = jax.jit(_search_advance)
_search_info_jit = jax.jit(_search_info)
_anchor_from_point_jit = jax.jit(_anchor_from_point)
_apply_updates_jit = jax.jit(optax.apply_updates)


def effopd_host_search(
    params: optax.Params,
    opt_state: PyTree,
    *,
    score_fn: ScoreFn,
    updates: optax.Updates | None = None,
    extrapolate: Callable[[optax.Params, PyTree, jax.Array], optax.Params] | None = None,
) -> tuple[optax.Params, PyTree, EffOPDSearchReport]:
    """Runs the EffOPD search with an arbitrary Python scorer (sampling, answer checking, ...).

    Call it when :func:`effopd_search_due` is True, i.e. right after an update of a chain that
    ends in ``effopd(search="host")``. Two ways to call it:

    * ``updates=None`` (typical): ``params`` already include the step (θ = params, e.g. the jitted
      train step applied the updates). Candidates are θ_B + m·(θ − θ_B) in the params' dtype.
    * ``updates=<the chain's output, not yet applied>``: θ = ``apply_updates(params, updates)`` and
      every candidate is exactly what ``effopd(search="jit")`` would have returned, so the result is
      bit-identical to the jit driver with the same scores.

    Run it before the next ``update``: that update overwrites ``search_due``, and the search of
    this trigger step is then skipped. On several hosts every process must call it with the same
    ``score_fn`` results (e.g. all-reduced accuracy), or the processes would accept different points.

    With ``flax.nnx`` (``opt_state=optimizer.opt_state``, ``params=nnx.state(model, nnx.Param)``):
    the results are written into the given Variables in place, so the optimizer and the model hold
    the accepted point and the new EffOPD state when this returns, and the returned trees hold the
    given Variables (nothing to assign back). ``score_fn`` receives the candidates as values (a
    ``State`` of arrays, as ``nnx.Optimizer.update`` hands its ``score_fn``): evaluate them with
    ``nnx.merge(graphdef, candidate, ...)``; a ``score_fn`` that loads them into the model instead
    is fine too, as the accepted point is written last.

    Args:
      params: see above; any tree of ``[...]`` arrays (sharded as you like), or of nnx Variables
        holding them.
      opt_state: the optimizer state holding one :class:`EffOPDState` with ``search_due`` (a plain
        optax state, or the tree of nnx Variables of ``nnx.Optimizer.opt_state``).
      score_fn: ``score_fn(params) -> float`` (higher is better), called 1 to K + 1 times with
        candidate parameter trees (device arrays, no Variables); scores are compared in float32.
      updates: see above (arrays or nnx Variables).
      extrapolate: ``extrapolate(θ, anchor, m) -> candidate`` replacing the rule's
        θ_B + m·(θ − θ_B) (``anchor`` holds ``optax.MaskedNode()`` off the filter), e.g.
        ``effopd_jax.lora.LoRA.effopd_extrapolation()`` (low-rank adapters extrapolated in the merged
        space). The accepted candidate becomes the params and, on the filtered leaves, the anchor.
        Default None: the rule above (and, with ``updates``, bit-identity with the jit driver).

    Returns:
      ``(new_params, new_opt_state, report)``: the accepted point (θ itself on rollback), the
      state with the anchor moved to it, ``search_due`` cleared and ``last_search`` filled in,
      and a :class:`EffOPDSearchReport`. Each is of the kind given: plain trees for plain trees;
      the given nnx Variables, now holding the new values, for Variables.
    """
    given_params = params
    params, updates = _values(params), _values(updates)  # views: Variables' arrays, not copies
    state = find_effopd_state(opt_state)
    if not bool(jax.device_get(state.search_due)):
        raise ValueError(
            "effopd_host_search: no search is due (state.search_due is False); call it only when "
            "effopd_search_due(opt_state) is True, with a chain ending in effopd(search='host')"
        )
    multipliers = state.multipliers
    num_candidates = int(multipliers.shape[0])
    ladder = np.asarray(jax.device_get(multipliers))

    theta = params if updates is None else _apply_updates_jit(params, updates)
    carry = _search_start_jit(_as_score(score_fn(theta)), num_candidates)
    while not bool(jax.device_get(carry.done)):
        multiplier = multipliers[int(jax.device_get(carry.num_scored))]
        if extrapolate is None:
            candidate = _candidate_point_jit(params, updates, state.anchor, multiplier)
        else:
            candidate = extrapolate(theta, state.anchor, multiplier)
        score = _as_score(score_fn(candidate))
        del candidate  # free it before the next candidate is built
        carry = _search_advance_jit(carry, score)

    best_index = int(jax.device_get(carry.best_index))
    if best_index == 0:
        new_params = theta  # rollback: θ exactly
    elif extrapolate is not None:
        new_params = extrapolate(theta, state.anchor, multipliers[best_index - 1])
    elif updates is None:
        new_params = _candidate_point_jit(params, None, state.anchor, multipliers[best_index - 1])
    else:
        new_updates = _candidate_updates_jit(params, updates, state.anchor, multipliers[best_index - 1])
        new_params = _apply_updates_jit(params, new_updates)
    info = _search_info_jit(carry, multipliers, state.count)
    new_state = state._replace(
        anchor=_anchor_from_point_jit(new_params, state.anchor),
        search_due=jnp.zeros((), jnp.bool_),
        last_search=info,
    )
    num_evals = int(jax.device_get(info.num_evals))
    scores = np.asarray(jax.device_get(carry.scores))
    report = EffOPDSearchReport(
        step=int(jax.device_get(state.count)),
        multipliers=tuple(float(m) for m in np.concatenate([[1.0], ladder])[:num_evals]),
        scores=tuple(float(s) for s in scores[:num_evals]),
        accepted_index=best_index,
        accepted_multiplier=1.0 if best_index == 0 else float(ladder[best_index - 1]),
        num_evals=num_evals,
    )
    new_opt_state = replace_effopd_state(opt_state, new_state)
    new_params = _write_values(given_params, new_params, "effopd_host_search params")
    return new_params, new_opt_state, report
