"""EffOPD beyond the paper's default: itemwise (early-stopped) scoring and the authors' later rule.

* Early-stopped scoring (``ItemwiseScore``) against scoring every item, on recorded per-item
  correctness: the same decisions, points, states and exact scores, for both rules, both batch
  compositions and many random correctness patterns.
* The later rule (``rule="followup"``) against a literal float64 re-implementation of the authors'
  loop (``numpy_followup``: iterative θ ← θ + a·(θ − θ_0), a ← a/(1 + a), ties, rollback).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effopd_jax import effopd as E
from effopd_jax.effopd import ItemwiseScore, effopd, effopd_host_search, find_effopd_state

FILTERED_PATH = ("layers_0", "mlp", "up_proj", "kernel")


def point(value: float, other: float = 0.5) -> dict:
    """A two-leaf tree: one extrapolated leaf holding ``value``, one that never is."""
    return {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.full((1,), value, jnp.float32)}},
                         "input_layernorm": {"scale": jnp.full((1,), other, jnp.float32)}}}


def value_of(params) -> float:
    return float(params["layers_0"]["mlp"]["up_proj"]["kernel"][0])


class RecordedCorrectness:
    """Per-item 0/1 correctness of every point, a fixed function of (case, point value).

    The probability an item is right peaks at multiplier ``peak``, so searches accept some
    candidates and reject others; items differ in difficulty, so the incumbent's failures predict
    a candidate's, as on a real validation set.
    """

    def __init__(self, case: int, num_items: int, peak: float):
        rng = np.random.default_rng(case)
        self.case, self.peak = case, peak
        self.difficulty = rng.uniform(-0.3, 0.3, num_items)
        self.calls: list[np.ndarray] = []

    def values(self, value: float) -> np.ndarray:
        rng = np.random.default_rng([self.case, int(round(value * 1e5))])
        p = np.clip(0.85 * np.exp(-0.5 * ((value - self.peak) / 3.0) ** 2) - self.difficulty, 0, 1)
        return (rng.random(len(p)) < p).astype(np.float64)

    def score_items(self, params, items: np.ndarray) -> np.ndarray:
        self.calls.append(np.asarray(items))
        return self.values(value_of(params))[items]


def run_searches(rule: str, recorded: RecordedCorrectness, *, batch_size: int, independent: bool,
                 early_stop: bool, steps: int, num_candidates: int):
    """``steps`` host searches of a bare effopd transform; θ moves by +1 per update from 0."""
    kwargs = dict(rule="followup", total_steps=steps) if rule == "followup" else {}
    tx = effopd(search="host", max_candidates=num_candidates, **kwargs)
    params = point(0.0)
    state = tx.init(params)
    scorer = ItemwiseScore(recorded.score_items, num_items=len(recorded.difficulty), batch_size=batch_size,
                           independent_items=independent, early_stop=early_stop)
    reports, points = [], []
    for _ in range(steps):
        updates = point(1.0, other=0.25)
        upd, state = tx.update(updates, state, params)
        params = optax.apply_updates(params, upd)
        if E.effopd_search_due(state):
            params, state, report = effopd_host_search(params, state, score_fn=scorer)
            reports.append(report)
        points.append(jax.device_get(params))
    return reports, points, jax.device_get(state)


CASES = [(case, rule) for case in range(24) for rule in ("paper", "followup")]


@pytest.mark.parametrize("case,rule", CASES)
def test_early_stopped_scoring_makes_the_decisions_of_scoring_every_item(case, rule):
    rng = np.random.default_rng(1000 + case)
    num_items = int(rng.integers(1, 40))
    batch_size = int(rng.integers(1, num_items + 1))
    independent = bool(case % 2)
    steps = 4 if rule == "paper" else 3
    settings = dict(batch_size=batch_size, independent=independent, steps=steps,
                    num_candidates=int(rng.integers(1, 6)))
    peak = float(rng.uniform(1.0, 12.0))
    full_rec = RecordedCorrectness(case, num_items, peak)
    early_rec = RecordedCorrectness(case, num_items, peak)
    full, full_points, full_state = run_searches(rule, full_rec, early_stop=False, **settings)
    early, early_points, early_state = run_searches(rule, early_rec, early_stop=True, **settings)

    assert len(full) == len(early) > 0
    for f, e in zip(full, early):
        assert (e.accepted_index, e.accepted_multiplier, e.num_evals) == (f.accepted_index, f.accepted_multiplier,
                                                                           f.num_evals)
        assert e.multipliers == f.multipliers
        assert all(f.exact) and e.exact[0] and len(e.exact) == e.num_evals
        for i, (fs, es, exact) in enumerate(zip(f.scores, e.scores, e.exact)):
            if exact:
                assert es == fs
            else:  # stopped early: a bound that still loses, and the full score lost too
                assert es >= fs and i != e.accepted_index
        assert sum(e.items_scored) <= sum(f.items_scored) == f.num_items * f.num_evals
    for fp, ep in zip(full_points, early_points):  # every point the run held, bit for bit
        jax.tree.map(np.testing.assert_array_equal, fp, ep)
    # Anchor, r and diagnostics; a rejected candidate's recorded score is its bound when stopped early.
    full_state, early_state = E.find_effopd_state(full_state), E.find_effopd_state(early_state)
    stopped = np.zeros(len(early[-1].scores), bool) if early[-1].exact == () else ~np.asarray(early[-1].exact)
    full_scores = np.asarray(full_state.last_search.scores)[: len(stopped)]
    early_scores = np.asarray(early_state.last_search.scores)[: len(stopped)]
    np.testing.assert_array_equal(full_scores[~stopped], early_scores[~stopped])
    assert np.all(early_scores[stopped] >= full_scores[stopped])
    no_scores = lambda st: st._replace(last_search=st.last_search._replace(scores=None))  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, no_scores(full_state), no_scores(early_state))
    # θ is always scored on every item, in the fixed batches.
    assert all(e.items_scored[0] == num_items for e in early)


def test_a_candidate_that_fixes_none_of_the_incumbents_failures_stops_after_them():
    """Strict rule, one item per batch: it is rejected as soon as every item θ failed is decoded."""
    theta_values = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], np.float64)  # 6 of 10 right

    def score_items(params, items):
        if value_of(params) == 1.0:
            return theta_values[items]
        return np.where(theta_values == 1, 1.0, 0.0)[items]  # as good as θ, no better

    tx = effopd(search="host", max_candidates=3)
    params = point(0.0)
    state = tx.init(params)
    upd, state = tx.update(point(1.0), state, params)
    params = optax.apply_updates(params, upd)
    scorer = ItemwiseScore(score_items, num_items=10, batch_size=1, independent_items=True)
    _, _, report = effopd_host_search(params, state, score_fn=scorer)
    assert report.accepted_index == 0 and report.num_evals == 2
    assert report.items_scored == (10, 4)  # the 4 items θ failed, then the bound (6 + 0)/10 <= 0.6
    assert report.exact == (True, False) and report.items_skipped == 6
    assert report.scores == (pytest.approx(0.6), pytest.approx(0.6))


def test_plan_orders_by_the_incumbents_failures():
    scorer = ItemwiseScore(lambda p, i: np.zeros(len(i)), num_items=7, batch_size=3)
    assert [b.tolist() for b in scorer.plan(None)] == [[0, 1, 2], [3, 4, 5], [6]]
    incumbent = np.array([1, 1, 1, 0, 1, 0, 1], np.float64)
    # Fixed batches, most incumbent failures first (ties: index order).
    assert [b.tolist() for b in scorer.plan(incumbent)] == [[3, 4, 5], [0, 1, 2], [6]]
    free = ItemwiseScore(lambda p, i: np.zeros(len(i)), num_items=7, batch_size=3, independent_items=True)
    assert [b.tolist() for b in free.plan(incumbent)] == [[3, 5, 0], [1, 2, 4], [6]]


def test_itemwise_score_checks_what_it_is_given():
    with pytest.raises(ValueError, match="ItemwiseScore.batch_size"):
        ItemwiseScore(lambda p, i: i, num_items=4, batch_size=0)
    bad = ItemwiseScore(lambda p, i: np.full(len(i), 2.0), num_items=4, batch_size=2)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        bad.items_values(None, np.arange(2))
    short = ItemwiseScore(lambda p, i: np.zeros(1), num_items=4, batch_size=2)
    with pytest.raises(ValueError, match="shape"):
        short.items_values(None, np.arange(2))


# ------------------------------------------------------------------------------------------------
# The authors' later rule.

TARGET = np.array([1.0, -2.0, 0.5, 3.0])


def quantized_score(x: np.ndarray) -> float:
    """An accuracy-like score in {0, 1/8, ..., 1}: many ties, as a small validation set has."""
    return float(np.floor(8.0 * np.exp(-np.sum((x - TARGET) ** 2) / 8.0)) / 8.0)


def followup_tree(x, other):
    return {"layers_0": {"self_attn": {"q_proj": {"kernel": jnp.asarray(x, jnp.float32)}},
                         "input_layernorm": {"scale": jnp.asarray(other, jnp.float32)}}}


def filtered_of(params) -> np.ndarray:
    return np.asarray(params["layers_0"]["self_attn"]["q_proj"]["kernel"], np.float64)


def gradient_step(x: np.ndarray) -> np.ndarray:
    return 0.03 * (TARGET - x) + 0.01


def numpy_followup(x0: np.ndarray, steps: int, num_candidates: int):
    """The authors' ``_iterative_test_and_modify`` at every step, literally, in float64."""
    theta_0 = x0.copy()
    x = x0.copy()
    acc_rate = 1.0
    held, rates, evals = [], [], []
    for g in range(1, steps + 1):
        x = x + gradient_step(x)  # the optimizer step
        best = quantized_score(x)
        backup = x.copy()
        progress = min(max((g - 1) / max(1, steps - 1), 0.0), 1.0)
        a = 2.0 * (1.0 - progress) * acc_rate
        n = 1
        for _ in range(num_candidates):
            current = a
            x = x + current * (x - theta_0)
            s = quantized_score(x)
            n += 1
            if s > best:
                best, acc_rate, backup = s, 1.0 - s, x.copy()
                a = current / (1.0 + current)
            elif s == best:
                a = current / (1.0 + current)
            else:
                x = backup
                break
        held.append(x.copy())
        rates.append(acc_rate)
        evals.append(n)
    return held, rates, evals


@pytest.mark.parametrize("steps,num_candidates,start", [(6, 5, 0.0), (9, 3, -1.0), (4, 5, 2.0)])
def test_followup_rule_matches_the_authors_loop(steps, num_candidates, start):
    x0 = np.full(4, start)
    other0 = np.array([0.7])
    ref_points, ref_rates, ref_evals = numpy_followup(x0, steps, num_candidates)

    tx = effopd(search="host", rule="followup", total_steps=steps, max_candidates=num_candidates)
    params = followup_tree(x0, other0)
    state = tx.init(params)
    for g in range(steps):
        x = filtered_of(params)
        updates = followup_tree(gradient_step(x), np.array([0.1]))
        upd, state = tx.update(updates, state, params)
        params = optax.apply_updates(params, upd)
        assert E.effopd_search_due(state)  # every update
        params, state, report = effopd_host_search(
            params, state, score_fn=lambda p: quantized_score(filtered_of(p)))
        np.testing.assert_allclose(filtered_of(params), ref_points[g], rtol=2e-5, atol=2e-5)
        assert float(find_effopd_state(state).acc_rate) == pytest.approx(ref_rates[g], abs=1e-6)
        assert report.num_evals == ref_evals[g]
        # The anchor never moves: θ_0 exactly.
        np.testing.assert_array_equal(filtered_of(find_effopd_state(state).anchor), x0.astype(np.float32))
        # Leaves outside the filter follow the optimizer only.
        np.testing.assert_allclose(params["layers_0"]["input_layernorm"]["scale"], other0 + 0.1 * (g + 1), rtol=1e-6)


def test_followup_ladder_is_the_closed_form_of_the_authors_factors():
    """1 + k·a equals the product of (1 + a_j) with a_{j+1} = a_j/(1 + a_j)."""
    for acc_rate, step, total in ((1.0, 1, 10), (0.4, 4, 10), (0.75, 9, 10), (0.3, 10, 10)):
        ladder = np.asarray(E._followup_multipliers(jnp.int32(step), jnp.float32(acc_rate), jnp.int32(total), 5))
        a = 2.0 * (1.0 - (step - 1) / (total - 1)) * acc_rate
        product, expected = 1.0, []
        for _ in range(5):
            product *= 1.0 + a
            expected.append(product)
            a = a / (1.0 + a) if a > 0 else 0.0
        np.testing.assert_allclose(ladder, expected, rtol=1e-6)


def test_followup_jit_and_host_drivers_are_bit_identical():
    steps = 5
    jit_tx = effopd(rule="followup", total_steps=steps)
    host_tx = effopd(rule="followup", total_steps=steps, search="host")
    score = lambda p: jnp.floor(8.0 * jnp.exp(-jnp.sum((p["layers_0"]["self_attn"]["q_proj"]["kernel"]
                                                         - jnp.asarray(TARGET, jnp.float32)) ** 2) / 8.0)) / 8.0
    jit_update = jax.jit(lambda u, s, p: jit_tx.update(u, s, p, score_fn=score))
    p_jit = p_host = followup_tree(np.zeros(4), np.array([0.7]))
    s_jit, s_host = jit_tx.init(p_jit), host_tx.init(p_host)
    for _ in range(steps):
        updates = followup_tree(gradient_step(filtered_of(p_jit)), np.array([0.1]))
        u, s_jit = jit_update(updates, s_jit, p_jit)
        p_jit = optax.apply_updates(p_jit, u)
        u, s_host = host_tx.update(updates, s_host, p_host)
        p_host, s_host, _ = effopd_host_search(p_host, s_host, score_fn=score, updates=u)
        jax.tree.map(np.testing.assert_array_equal, p_jit, p_host)
        jax.tree.map(np.testing.assert_array_equal, s_jit, s_host)


@pytest.mark.parametrize("kwargs,field", [
    (dict(rule="later"), "rule"),
    (dict(rule="followup"), "total_steps"),
    (dict(rule="followup", total_steps=10, trigger=4), "trigger"),
    (dict(rule="followup", total_steps=10, multipliers=(2.0,)), "multipliers"),
    (dict(total_steps=10), "total_steps"),
])
def test_followup_options_are_checked(kwargs, field):
    with pytest.raises(ValueError, match=field):
        effopd(**kwargs)
