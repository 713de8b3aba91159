"""Tests of effopd_jax.effopd against hand-computed values and an independent numpy reference.

The numpy reference (`numpy_search`) re-implements the authors' loop literally (docs/effopd_rule.md#the-search):
score θ, then θ ← θ_B + (2k+1)·d for k = 1..K, accept on strict improvement, stop at the first
non-improvement, in float64 on plain dicts.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from effopd_jax import effopd as E
from effopd_jax.effopd import (
    DEFAULT_PARAM_FILTER,
    EffOPDState,
    effopd,
    effopd_host_search,
    effopd_metrics,
    effopd_search_due,
    find_effopd_state,
)
from helpers_tiny import REPO_ROOT

# A small Qwen-named tree (docs/architecture.md): 3 filtered and 4 unfiltered leaves.
FILTERED = (
    "layers_0/self_attn/q_proj/kernel",
    "layers_0/mlp/up_proj/kernel",
    "layers_0/post_attention_layernorm/scale",
)
UNFILTERED = ("layers_0/input_layernorm/scale", "embed_tokens/embedding", "norm/scale", "lm_head/kernel")
SHAPES = {
    "layers_0/self_attn/q_proj/kernel": (4, 6),
    "layers_0/mlp/up_proj/kernel": (4, 5),
    "layers_0/post_attention_layernorm/scale": (4,),
    "layers_0/input_layernorm/scale": (4,),
    "embed_tokens/embedding": (7, 4),
    "norm/scale": (4,),
    "lm_head/kernel": (4, 7),
}


def nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def flatten(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
    return {E._path_string(p): v for p, v in leaves}


def make_params(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return nest({k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()})


def peaked_score(anchor, direction, peak: float):
    """−Σ_filtered ‖x − (θ_B + peak·d)‖²: maximal on the ray at multiplier ``peak``."""
    anchor_flat, direction_flat = flatten(anchor), flatten(direction)
    target = {k: anchor_flat[k] + peak * direction_flat[k] for k in FILTERED}

    def score(params):
        flat = flatten(params)
        return -sum(jnp.sum((flat[k] - target[k]) ** 2) for k in FILTERED)

    return score


def implied_multiplier(anchor, direction):
    """m such that the filtered leaves of x are θ_B + m·d (least squares), as a traceable fn."""
    a, d = flatten(anchor), flatten(direction)
    dd = sum(jnp.sum(d[k] ** 2) for k in FILTERED)

    def m_of(params):
        x = flatten(params)
        return sum(jnp.sum((x[k] - a[k]) * d[k]) for k in FILTERED) / dd

    return m_of


def numpy_search(theta: dict, anchor: dict, score, multipliers, filtered=FILTERED):
    """Independent float64 reference of the authors' loop; returns (best point, scores, multiplier)."""
    theta = {k: np.asarray(v, np.float64) for k, v in theta.items()}
    anchor = {k: np.asarray(anchor[k], np.float64) for k in filtered}
    best, best_score, best_m = theta, score(theta), 1.0
    scores = [best_score]
    for m in multipliers:
        cand = dict(theta)
        for k in filtered:
            cand[k] = anchor[k] + m * (theta[k] - anchor[k])
        s = score(cand)
        scores.append(s)
        if s > best_score:
            best, best_score, best_m = cand, s, m
        else:
            break
    return best, scores, best_m


def one_step(tx, params, updates, score_fn):
    """init + one jitted update (t = 1, a trigger) of a bare effopd transform."""
    state = tx.init(params)
    new_updates, new_state = jax.jit(lambda u, s, p: tx.update(u, s, p, score_fn=score_fn))(updates, state, params)
    return new_updates, new_state


# ------------------------------------------------------------------------------------------------
# The ladder.


def test_peaked_score_accepts_multiplier_seven_with_hand_computed_scores():
    params, updates = make_params(0), make_params(1, scale=0.1)
    tx = effopd()
    anchor = tx.init(params).anchor  # θ_B = params at t = 1, so d = updates
    new_updates, state = one_step(tx, params, updates, peaked_score(anchor, updates, 6.2))

    # By hand: score(m) = −(6.2 − m)²·‖d‖²: m = 1, 3, 5, 7 improve (27.04 > 10.24 > 1.44 > 0.64),
    # m = 9 does not (7.84) and stops the search; 11 is never scored.
    dd = float(sum(np.sum(np.asarray(flatten(updates)[k]) ** 2) for k in FILTERED))
    info = state.last_search
    np.testing.assert_allclose(
        np.asarray(info.scores), [-(6.2 - m) ** 2 * dd for m in (1, 3, 5, 7, 9)] + [np.nan], rtol=1e-5
    )
    assert float(info.accepted_multiplier) == 7.0
    assert int(info.accepted_index) == 3 and int(info.num_evals) == 5 and int(info.step) == 1

    new_params = flatten(optax.apply_updates(params, new_updates))
    p, u = flatten(params), flatten(updates)
    for k in FILTERED:
        np.testing.assert_allclose(new_params[k], np.asarray(p[k]) + 7.0 * np.asarray(u[k]), rtol=1e-6, atol=1e-6)
    for k in UNFILTERED:
        np.testing.assert_array_equal(new_params[k], np.asarray(p[k] + u[k]))


def test_peak_beyond_the_ladder_accepts_the_last_candidate():
    params, updates = make_params(0), make_params(1, scale=0.1)
    tx = effopd(max_candidates=5)
    anchor = tx.init(params).anchor
    _, state = one_step(tx, params, updates, peaked_score(anchor, updates, 100.0))
    assert float(state.last_search.accepted_multiplier) == 11.0
    assert int(state.last_search.num_evals) == 6  # θ + all 5 candidates
    assert not np.isnan(np.asarray(state.last_search.scores)).any()


def test_worse_first_candidate_rolls_back_to_theta_exactly():
    params, updates = make_params(0), make_params(1, scale=0.1)
    tx = effopd()
    anchor = tx.init(params).anchor
    # Peak at 0.5: score(θ) = −0.25‖d‖² beats score(3) = −6.25‖d‖².
    new_updates, state = one_step(tx, params, updates, peaked_score(anchor, updates, 0.5))
    for got, want in zip(jax.tree.leaves(new_updates), jax.tree.leaves(updates)):
        np.testing.assert_array_equal(got, want)  # the inner updates, bit for bit
    assert float(state.last_search.accepted_multiplier) == 1.0
    assert int(state.last_search.num_evals) == 2
    theta = flatten(optax.apply_updates(params, updates))
    for k in FILTERED:  # anchor moves to θ
        np.testing.assert_array_equal(flatten(state.anchor)[k], theta[k])


def test_equal_scores_are_rejected_and_search_stops_at_first_non_improvement():
    params, updates = make_params(0), make_params(1, scale=0.1)
    tx = effopd()
    anchor = tx.init(params).anchor
    m_of = implied_multiplier(anchor, updates)
    # score: 0 at θ and at m = 3 (a tie), 1 at m = 5. Strict ">" rejects the tie and stops, so the
    # better m = 5 is never looked at.
    score = lambda p: jnp.where(jnp.abs(m_of(p) - 5.0) < 0.5, 1.0, 0.0)
    new_updates, state = one_step(tx, params, updates, score)
    assert float(state.last_search.accepted_multiplier) == 1.0
    assert int(state.last_search.num_evals) == 2
    np.testing.assert_array_equal(np.asarray(state.last_search.scores)[:2], [0.0, 0.0])
    for got, want in zip(jax.tree.leaves(new_updates), jax.tree.leaves(updates)):
        np.testing.assert_array_equal(got, want)


def test_nan_score_never_improves():
    params, updates = make_params(0), make_params(1, scale=0.1)
    tx = effopd()
    m_of = implied_multiplier(tx.init(params).anchor, updates)
    score = lambda p: jnp.where(m_of(p) > 2.0, jnp.nan, 0.0)
    _, state = one_step(tx, params, updates, score)
    assert float(state.last_search.accepted_multiplier) == 1.0 and int(state.last_search.num_evals) == 2


def test_custom_multiplier_ladder():
    params, updates = make_params(0), make_params(1, scale=0.1)
    tx = effopd(multipliers=(2.0, 4.0, 8.0))
    anchor = tx.init(params).anchor
    # peak 5: |5−1|=4 > |5−2|=3 > |5−4|=1 < |5−8|=3 → accepts 4.
    _, state = one_step(tx, params, updates, peaked_score(anchor, updates, 5.0))
    assert float(state.last_search.accepted_multiplier) == 4.0
    assert state.last_search.scores.shape == (4,)
    np.testing.assert_array_equal(state.multipliers, [2.0, 4.0, 8.0])


# ------------------------------------------------------------------------------------------------
# Steps, anchor, filter, inner state.


def run_bare(tx, params, updates_seq, score_of_step):
    """Applies a list of given updates through ``tx`` (jitted), returns per-step (updates, state)."""
    state = tx.init(params)
    step = jax.jit(lambda u, s, p, a, d: tx.update(u, s, p, score_fn=score_of_step(a, d)))
    out = []
    for updates in updates_seq:
        direction = jax.tree.map(
            lambda a, p, u: a if isinstance(a, optax.MaskedNode) else (p + u) - a,
            state.anchor, params, updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
        new_updates, state = step(updates, state, params, state.anchor, direction)
        out.append((updates, new_updates, state))
        params = optax.apply_updates(params, new_updates)
    return out, params


def masked_peaked(anchor, direction, peak):
    """Peaked score on the filtered leaves of traced (anchor, direction) trees with MaskedNodes."""
    def score(params):
        terms = jax.tree.map(
            lambda a, d, x: 0.0 if isinstance(a, optax.MaskedNode) else jnp.sum((x - (a + peak * d)) ** 2),
            anchor, direction, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
        return -sum(jax.tree.leaves(terms))

    return score


@pytest.mark.parametrize("trigger,expected", [("pow2", {1, 2, 4, 8}), (3, {3, 6, 9})])
def test_only_trigger_steps_search_and_others_pass_through(trigger, expected):
    params = make_params(0)
    updates_seq = [make_params(10 + i, scale=0.05) for i in range(9)]
    out, _ = run_bare(effopd(trigger=trigger), params, updates_seq, lambda a, d: masked_peaked(a, d, 4.2))
    for t, (updates, new_updates, state) in enumerate(out, start=1):
        assert int(state.count) == t
        if t in expected:
            assert int(state.last_search.step) == t
            assert float(state.last_search.accepted_multiplier) == 5.0  # peak 4.2: 1 < 3 < 5 > 7
        else:
            assert int(state.last_search.step) == max(s for s in expected | {0} if s < t)
            for got, want in zip(jax.tree.leaves(new_updates), jax.tree.leaves(updates)):
                np.testing.assert_array_equal(got, want)


def test_anchor_equals_returned_point_and_only_filtered_leaves_are_extrapolated():
    params = make_params(0)
    updates_seq = [make_params(10 + i, scale=0.05) for i in range(4)]
    out, _ = run_bare(effopd(), params, updates_seq, lambda a, d: masked_peaked(a, d, 6.2))
    p_prev, anchor_prev = params, None
    for t, (updates, new_updates, state) in enumerate(out, start=1):
        returned = flatten(optax.apply_updates(p_prev, new_updates))
        theta = flatten(optax.apply_updates(p_prev, updates))
        anchor = flatten(state.anchor)
        assert {k for k, v in anchor.items() if not isinstance(v, optax.MaskedNode)} == set(FILTERED)
        for k in UNFILTERED:  # never extrapolated: exactly the inner optimizer's step
            np.testing.assert_array_equal(returned[k], theta[k])
        if t in (1, 2, 4):
            assert float(state.last_search.accepted_multiplier) == 7.0 and int(state.last_search.step) == t
            for k in FILTERED:
                np.testing.assert_array_equal(anchor[k], returned[k])  # bit for bit
                assert not np.allclose(returned[k], theta[k])  # these leaves did move off θ
        else:  # t = 3: the anchor stays where the search at t = 2 put it
            for k in FILTERED:
                np.testing.assert_array_equal(anchor[k], anchor_prev[k])
        p_prev, anchor_prev = optax.apply_updates(p_prev, new_updates), anchor


def test_multi_step_run_matches_numpy_reference():
    """Steps 1..8 with the anchor moving: same points as the literal float64 loop."""
    params = make_params(0)
    target = flatten(make_params(99))
    # Each step moves 2% of the way to the target, plus noise: early extrapolations are accepted
    # (up to x11), and at t = 8 the first candidate overshoots, so θ is kept.
    direction = {k: 0.02 * (target[k] - flatten(params)[k]) for k in target}
    updates_seq = [
        nest({k: direction[k] + 0.002 * flatten(make_params(10 + i))[k] for k in target}) for i in range(8)
    ]
    score_jax = lambda p: -sum(jnp.sum((flatten(p)[k] - target[k]) ** 2) for k in FILTERED)
    score_np = lambda p: -sum(np.sum((p[k] - np.asarray(target[k], np.float64)) ** 2) for k in FILTERED)

    tx = effopd()
    state = tx.init(params)
    step = jax.jit(lambda u, s, p: tx.update(u, s, p, score_fn=score_jax))
    ref_params = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
    ref_anchor = {k: ref_params[k] for k in FILTERED}
    accepted = []
    for t, updates in enumerate(updates_seq, start=1):
        new_updates, state = step(updates, state, params)
        params = optax.apply_updates(params, new_updates)
        theta = {k: ref_params[k] + np.asarray(v, np.float64) for k, v in flatten(updates).items()}
        if t & (t - 1) == 0:
            ref_params, _, m = numpy_search(theta, ref_anchor, score_np, (3, 5, 7, 9, 11))
            ref_anchor = {k: ref_params[k] for k in FILTERED}
            assert float(state.last_search.accepted_multiplier) == m
            accepted.append(m)
        else:
            ref_params = theta
        for k, v in flatten(params).items():
            np.testing.assert_allclose(v, ref_params[k], rtol=1e-5, atol=1e-5)
    assert any(m > 1 for m in accepted) and any(m == 1 for m in accepted), accepted  # both paths ran


def test_default_filter_on_qwen_paths_unscanned_and_scanned():
    select = E._make_path_predicate(None)
    for prefix in ("layers_3", "layers", "params/layers_0"):
        for name in (
            "self_attn/q_proj/kernel", "self_attn/q_proj/bias", "self_attn/k_proj/kernel",
            "self_attn/v_proj/kernel", "self_attn/o_proj/kernel", "self_attn/q_norm/scale",
            "self_attn/k_norm/scale", "post_attention_layernorm/scale", "mlp/gate_proj/kernel",
            "mlp/up_proj/kernel", "mlp/down_proj/kernel",
        ):
            assert select(f"{prefix}/{name}"), f"{prefix}/{name}"
        assert not select(f"{prefix}/input_layernorm/scale")
    for name in ("embed_tokens/embedding", "norm/scale", "lm_head/kernel"):
        assert not select(name)
    assert re.search(DEFAULT_PARAM_FILTER, "layers_0/mlp/up_proj/kernel")


def test_regex_and_callable_filters():
    params = make_params(0)
    as_regex = flatten(effopd(param_filter=r"q_proj|embed").init(params).anchor)
    as_callable = flatten(effopd(param_filter=lambda path: path.endswith("scale")).init(params).anchor)
    kept = lambda anchor: {k for k, v in anchor.items() if not isinstance(v, optax.MaskedNode)}
    assert kept(as_regex) == {"layers_0/self_attn/q_proj/kernel", "embed_tokens/embedding"}
    assert kept(as_callable) == {
        "layers_0/post_attention_layernorm/scale", "layers_0/input_layernorm/scale", "norm/scale"
    }


def test_scanned_params_anchor_keeps_layer_axis():
    params = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((3, 4, 4))}},
                         "input_layernorm": {"scale": jnp.ones((3, 4))}},
              "norm": {"scale": jnp.ones((4,))}}
    anchor = effopd().init(params).anchor
    assert anchor["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 4, 4)
    assert isinstance(anchor["layers"]["input_layernorm"]["scale"], optax.MaskedNode)
    assert isinstance(anchor["norm"]["scale"], optax.MaskedNode)


def test_anchor_is_a_copy_so_params_can_be_donated():
    params = make_params(0)
    anchor = effopd().init(params).anchor
    for k in FILTERED:
        assert flatten(anchor)[k].unsafe_buffer_pointer() != flatten(params)[k].unsafe_buffer_pointer()
    donate = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)
    donate(params)
    np.testing.assert_array_equal(flatten(anchor)[FILTERED[0]], np.asarray(flatten(make_params(0))[FILTERED[0]]))


def test_bfloat16_anchor():
    params, updates = make_params(0), make_params(1, scale=0.5)
    tx = effopd(anchor_dtype=jnp.bfloat16)
    state = tx.init(params)
    for k in FILTERED:
        assert flatten(state.anchor)[k].dtype == jnp.bfloat16
    new_updates, state = jax.jit(
        lambda u, s, p: tx.update(u, s, p, score_fn=masked_peaked(s.anchor, jax.tree.map(
            lambda a, x, y: a if isinstance(a, optax.MaskedNode) else (x + y) - a.astype(jnp.float32),
            s.anchor, p, u, is_leaf=lambda z: isinstance(z, optax.MaskedNode)), 6.2))
    )(updates, state, params)
    assert float(state.last_search.accepted_multiplier) == 7.0
    returned = flatten(optax.apply_updates(params, new_updates))
    for k in FILTERED:
        np.testing.assert_array_equal(flatten(state.anchor)[k], returned[k].astype(jnp.bfloat16))


# ------------------------------------------------------------------------------------------------
# Composition with optax.


def quadratic_problem(seed=0):
    """loss(p) = ½ Σ ‖A_k p_k − b_k‖² per leaf; score = −loss."""
    rng = np.random.default_rng(seed)
    params = make_params(seed, scale=0.1)
    flat = flatten(params)
    mats = {k: jnp.asarray(rng.standard_normal(v.shape) * 0.5 + 1.0, jnp.float32) for k, v in flat.items()}

    def loss(p):
        return sum(0.5 * jnp.sum((mats[k] * x - 1.0) ** 2) for k, x in flatten(p).items())

    return params, loss


def test_chain_with_adamw_leaves_inner_state_untouched_and_jaxpr_has_no_host_sync():
    params, loss = quadratic_problem()
    score = lambda p: -loss(p)
    tx = optax.chain(optax.adamw(0.05, weight_decay=0.01), effopd())
    reference = optax.adamw(0.05, weight_decay=0.01)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, score_fn=score)
        return optax.apply_updates(params, updates), state, grads

    jaxpr = str(jax.make_jaxpr(lambda p, s: tx.update(jax.grad(loss)(p), s, p, score_fn=score))(params, state))
    assert "while" in jaxpr and "cond" in jaxpr and "callback" not in jaxpr

    extrapolated = 0
    for _ in range(8):
        adam_before = state[0]
        new_params, state, grads = step(params, state)
        adam_updates, adam_expected = reference.update(grads, adam_before, params)
        for got, want in zip(jax.tree.leaves(state[0]), jax.tree.leaves(adam_expected)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        extrapolated += float(state[1].last_search.accepted_multiplier) > 1
        params = new_params
    assert extrapolated >= 1  # the search did move params on this problem
    assert int(state[1].count) == 8


def test_under_multisteps_trigger_counts_real_updates():
    params, loss = quadratic_problem(1)
    score = lambda p: -loss(p)
    k = 3
    multi = optax.MultiSteps(optax.chain(optax.adam(0.05), effopd()), every_k_schedule=k)
    plain = optax.chain(optax.adam(0.05), effopd())
    m_state, p_state = multi.init(params), plain.init(params)
    m_params, p_params = params, params
    rng = np.random.default_rng(0)
    m_step = jax.jit(lambda g, s, p: multi.update(g, s, p, score_fn=score))
    p_step = jax.jit(lambda g, s, p: plain.update(g, s, p, score_fn=score))
    for real in range(1, 6):
        micro_grads = []
        for _ in range(k):
            noise = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32), params)
            grads = jax.tree.map(jnp.add, jax.grad(loss)(m_params), noise)
            micro_grads.append(grads)
            updates, m_state = m_step(grads, m_state, m_params)
            m_params = optax.apply_updates(m_params, updates)
        eff = find_effopd_state(m_state)
        assert int(eff.count) == real  # real updates, not micro-steps
        mean_grads = jax.tree.map(lambda *g: sum(g) / k, *micro_grads)
        updates, p_state = p_step(mean_grads, p_state, p_params)
        p_params = optax.apply_updates(p_params, updates)
        assert int(eff.last_search.step) == int(p_state[1].last_search.step)
        assert float(eff.last_search.accepted_multiplier) == float(p_state[1].last_search.accepted_multiplier)
        for a, b in zip(jax.tree.leaves(m_params), jax.tree.leaves(p_params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(find_effopd_state(m_state).last_search.step) == 4


def test_with_inject_hyperparams_adamw():
    """Changing the injected learning rate mid-run equals adamw with the same schedule."""
    params, loss = quadratic_problem(2)
    score = lambda q: -loss(q)
    injected = optax.chain(optax.inject_hyperparams(optax.adamw)(learning_rate=0.05), effopd())
    scheduled = optax.chain(
        optax.adamw(optax.piecewise_constant_schedule(0.05, {2: 0.2})), effopd()
    )
    s_inj, s_sch = injected.init(params), scheduled.init(params)
    p_inj = p_sch = params
    step_inj = jax.jit(lambda p, s: injected.update(jax.grad(loss)(p), s, p, score_fn=score))
    step_sch = jax.jit(lambda p, s: scheduled.update(jax.grad(loss)(p), s, p, score_fn=score))
    for t in range(1, 6):
        if t == 3:
            s_inj[0].hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
        u, s_inj = step_inj(p_inj, s_inj)
        p_inj = optax.apply_updates(p_inj, u)
        u, s_sch = step_sch(p_sch, s_sch)
        p_sch = optax.apply_updates(p_sch, u)
        assert float(s_inj[1].last_search.accepted_multiplier) == float(s_sch[1].last_search.accepted_multiplier)
        for a, b in zip(jax.tree.leaves(p_inj), jax.tree.leaves(p_sch)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(s_inj[1].count) == 5 and int(s_inj[1].last_search.step) == 4


def test_metrics_inside_jit():
    params, updates = make_params(0), make_params(1, scale=0.1)
    tx = effopd()
    anchor = tx.init(params).anchor
    score = peaked_score(anchor, updates, 6.2)

    @jax.jit
    def step(u, s, p):
        new_u, s = tx.update(u, s, p, score_fn=score)
        return new_u, s, effopd_metrics(s)

    _, state, metrics = step(updates, tx.init(params), params)
    assert bool(metrics["effopd/searched"]) and float(metrics["effopd/accepted_multiplier"]) == 7.0
    assert int(metrics["effopd/num_evals"]) == 5
    assert float(metrics["effopd/best_score"]) == float(np.asarray(metrics["effopd/scores"])[3])
    _, state, metrics = step(updates, state, params)  # t = 2: a trigger
    assert bool(metrics["effopd/searched"])
    _, state, metrics = step(updates, state, params)  # t = 3: not a trigger
    assert not bool(metrics["effopd/searched"]) and int(state.count) == 3


# ------------------------------------------------------------------------------------------------
# Host driver.


@pytest.mark.parametrize("learning_rate", [0.01, 0.2])
def test_host_driver_is_bit_identical_to_jit_driver(learning_rate):
    """Same traceable score, same decisions, bit-identical params and anchor.

    The score *values* may differ in the last bit: XLA compiles ``score_fn`` fused with the
    candidate inside the while_loop, and standalone on the host, and may order the reduction
    differently. The driver logic itself is shared.
    """
    params, loss = quadratic_problem(3)
    jit_tx = optax.chain(optax.adam(learning_rate), effopd())
    host_tx = optax.chain(optax.adam(learning_rate), effopd(search="host"))
    jit_state, host_state = jit_tx.init(params), host_tx.init(params)
    jit_params = host_params = params
    score_jit = jax.jit(lambda p: -loss(p))

    jit_step = jax.jit(lambda p, s: jit_tx.update(jax.grad(loss)(p), s, p, score_fn=score_jit))
    host_step = jax.jit(lambda p, s: host_tx.update(jax.grad(loss)(p), s, p))
    accepted = []
    for t in range(1, 10):
        updates, jit_state = jit_step(jit_params, jit_state)
        jit_params = optax.apply_updates(jit_params, updates)
        updates, host_state = host_step(host_params, host_state)
        assert effopd_search_due(host_state) == (t in (1, 2, 4, 8))
        if effopd_search_due(host_state):
            host_params, host_state, report = effopd_host_search(
                host_params, host_state, score_fn=lambda p: float(score_jit(p)), updates=updates
            )
            jit_report = E.EffOPDSearchReport.from_state(jit_state)
            assert (report.step, report.multipliers, report.accepted_index, report.num_evals) == (
                jit_report.step, jit_report.multipliers, jit_report.accepted_index, jit_report.num_evals)
            np.testing.assert_allclose(report.scores, jit_report.scores, rtol=1e-6)
            accepted.append(report.accepted_multiplier)
        else:
            host_params = optax.apply_updates(host_params, updates)
        for a, b in zip(jax.tree.leaves(jit_params), jax.tree.leaves(host_params)):
            np.testing.assert_array_equal(a, b)
        jit_eff, host_eff = find_effopd_state(jit_state), find_effopd_state(host_state)
        for a, b in zip(jax.tree.leaves((jit_state[0], jit_eff.anchor, jit_eff.count)),
                        jax.tree.leaves((host_state[0], host_eff.anchor, host_eff.count))):
            np.testing.assert_array_equal(a, b)
    assert len(accepted) == 4 and not effopd_search_due(host_state)
    assert any(m > 1 for m in accepted), accepted
    if learning_rate == 0.2:  # this run also rolls back (1) and stops mid-ladder (5, 3)
        assert accepted == [5.0, 1.0, 3.0, 1.0]


def test_host_driver_on_applied_params_matches_numpy_reference():
    """``updates=None``: params already hold θ; scorer is plain Python on numpy copies."""
    params, updates = make_params(0), make_params(1, scale=0.1)
    tx = effopd(search="host")
    state = tx.init(params)
    _, state = tx.update(updates, state, params)
    theta = optax.apply_updates(params, updates)
    target = {k: np.asarray(flatten(params)[k], np.float64) + 6.2 * np.asarray(flatten(updates)[k], np.float64)
              for k in FILTERED}
    calls = []

    def host_score(p):  # python, not traceable: converts to numpy
        flat = {k: np.asarray(v, np.float64) for k, v in flatten(p).items()}
        calls.append(1)
        return -sum(float(np.sum((flat[k] - target[k]) ** 2)) for k in FILTERED)

    new_params, state, report = effopd_host_search(theta, state, score_fn=host_score)
    ref_point, ref_scores, ref_m = numpy_search(
        {k: np.asarray(v) for k, v in flatten(theta).items()},
        {k: np.asarray(v) for k, v in flatten(params).items()},
        lambda p: -sum(float(np.sum((p[k] - target[k]) ** 2)) for k in FILTERED),
        (3, 5, 7, 9, 11),
    )
    assert ref_m == 7.0 and report.accepted_multiplier == 7.0 and report.accepted_index == 3
    assert report.multipliers == (1.0, 3.0, 5.0, 7.0, 9.0) and report.num_evals == 5 == len(calls)
    np.testing.assert_allclose(report.scores, ref_scores, rtol=1e-5)
    for k, v in flatten(new_params).items():
        np.testing.assert_allclose(v, ref_point[k], rtol=1e-6, atol=1e-6)
    for k in FILTERED:  # anchor = returned point exactly
        np.testing.assert_array_equal(flatten(state.anchor)[k], flatten(new_params)[k])
    for k in UNFILTERED:
        np.testing.assert_array_equal(flatten(new_params)[k], flatten(theta)[k])
    assert report == E.EffOPDSearchReport.from_state(state)
    assert not bool(state.search_due) and int(state.last_search.step) == 1
    with pytest.raises(ValueError, match="no search is due"):
        effopd_host_search(new_params, state, score_fn=host_score)


# ------------------------------------------------------------------------------------------------
# Checkpointing and sharding.


def test_state_round_trips_through_orbax_with_params_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("fsdp",))
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = {"layers_0": {"mlp": {"up_proj": {"kernel": jax.device_put(jnp.arange(32.0).reshape(8, 4), row)}},
                           "input_layernorm": {"scale": jax.device_put(jnp.ones(4), rep)}}}
    tx = optax.chain(optax.adamw(0.1), effopd())
    state = tx.init(params)
    anchor_leaf = state[1].anchor["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert anchor_leaf.sharding.is_equivalent_to(row, 2)
    grads = jax.tree.map(jnp.ones_like, params)
    score = lambda p: -jnp.sum((p["layers_0"]["mlp"]["up_proj"]["kernel"] - 3.0) ** 2)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, score_fn=score))
    _, state = step(grads, state, params)

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp_path, "state"), state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpointer.restore(os.path.join(tmp_path, "state"), abstract)
    assert isinstance(restored[1], EffOPDState)
    assert isinstance(restored[1].anchor["layers_0"]["input_layernorm"]["scale"], optax.MaskedNode)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    # The restored state continues exactly like the original.
    u1, s1 = step(grads, state, params)
    u2, s2 = step(grads, restored, params)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_candidates": 0}, "max_candidates"),
        ({"max_candidates": 2, "multipliers": (3.0, 5.0, 7.0)}, "max_candidates"),
        ({"multipliers": (3.0, 1.0)}, "multipliers"),
        ({"multipliers": ()}, "multipliers"),
        ({"trigger": 0}, "trigger"),
        ({"trigger": "every"}, "trigger"),
        ({"anchor_dtype": jnp.int32}, "anchor_dtype"),
        ({"search": "device"}, "search"),
        ({"param_filter": "("}, "param_filter"),
        ({"param_filter": 3}, "param_filter"),
    ],
)
def test_bad_options_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        effopd(**kwargs)


def test_bad_calls_raise():
    params, updates = make_params(0), make_params(1)
    with pytest.raises(ValueError, match="param_filter selected no parameter"):
        effopd(param_filter="nothing_matches").init(params)
    tx = effopd()
    state = tx.init(params)
    with pytest.raises(ValueError, match="score_fn"):
        tx.update(updates, state, params)
    with pytest.raises(ValueError, match="params"):
        tx.update(updates, state, None, score_fn=lambda p: 0.0)
    with pytest.raises(ValueError, match="scalar"):
        tx.update(updates, state, params, score_fn=lambda p: jnp.zeros(2))
    host = effopd(search="host")
    with pytest.raises(ValueError, match="score_fn"):
        host.update(updates, host.init(params), params, score_fn=lambda p: 0.0)


# ------------------------------------------------------------------------------------------------
# The documentation example runs.


def test_readme_example_runs():
    """The README section "Use EffOPD in your own trainer" runs as written."""
    readme = os.path.join(REPO_ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    section = text[text.index("## Use EffOPD in your own trainer"):]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    # plain optax (jit, host), nnx.Optimizer (jit), TrainState (host)
    assert len(blocks) >= 4, "the README's EffOPD section lost its python examples"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "__docs__"})
