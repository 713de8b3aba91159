"""EffOPD inside other trainers, as they are: ``flax.nnx.Optimizer`` and ``flax.training.TrainState``.

``nnx.Optimizer`` keeps the optax state as a tree of nnx Variables (``OptArray`` / ``OptVariable``)
and hands ``tx.update`` the Variables' values. Each nnx run here is compared with the plain optax
chain on the same model, data and scores; the comparisons are **bit-identical**
(``assert_array_equal``), because both sides run the same operations on the same arrays:
``nnx.Optimizer.update`` is ``tx.update`` on ``nnx.as_pure`` values followed by
``optax.apply_updates``, exactly the plain step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

from effopd_jax.effopd import (
    EffOPDState,
    effopd,
    effopd_host_search,
    effopd_metrics,
    effopd_search_due,
    find_effopd_state,
    replace_effopd_state,
)

NUM_STEPS = 8  # triggers at 1, 2, 4, 8


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up_proj = nnx.Linear(4, 16, rngs=rngs)
        self.down_proj = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jnp.tanh(self.up_proj(x)))


class Model(nnx.Module):
    """``mlp/...`` is selected by the default filter; ``head/...`` is not."""

    def __init__(self, rngs: nnx.Rngs):
        self.mlp = Block(rngs)
        self.head = nnx.Linear(1, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(self.mlp(x))


def make_data():
    x = jax.random.normal(jax.random.key(1), (96, 4))
    y = jnp.sin(x @ jnp.array([[1.0], [-2.0], [0.5], [1.5]]))
    return (x[:64], y[:64]), (x[64:], y[64:])


(X_TRAIN, Y_TRAIN), (X_VAL, Y_VAL) = make_data()


def loss(model: Model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def make_scorer(graphdef, rest):
    """score(values) = −validation loss of the model with those parameter values (traceable)."""

    def score(values):
        return -loss(nnx.merge(graphdef, values, rest), X_VAL, Y_VAL)

    return score


def chain(search: str = "jit", **effopd_kwargs) -> optax.GradientTransformation:
    return optax.chain(optax.adam(1e-2), effopd(search=search, **effopd_kwargs))


def plain_start():
    """The same model as ``Model(nnx.Rngs(0))`` as (graphdef, parameter values, rest)."""
    graphdef, params, rest = nnx.split(Model(nnx.Rngs(0)), nnx.Param, ...)
    return graphdef, nnx.as_pure(params), rest


def stored_effopd_state(opt_state) -> EffOPDState:
    """The EffOPDState node of a chain's state as stored (for nnx: its leaves are Variables)."""
    (state,) = [x for x in opt_state if isinstance(x, EffOPDState)]
    return state


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ------------------------------------------------------------------------------------------------
# How nnx holds the state.


def test_nnx_optimizer_wraps_every_leaf_in_a_variable_and_metrics_read_it():
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, chain(), wrt=nnx.Param)
    stored = stored_effopd_state(optimizer.opt_state)
    assert isinstance(stored.count, nnx.training.optimizer.OptArray)
    assert isinstance(stored.anchor["mlp"]["up_proj"]["kernel"], nnx.training.optimizer.OptVariable)

    state = find_effopd_state(optimizer.opt_state)
    # A view of the Variables' own arrays: nothing copied.
    assert state.count is stored.count.get_raw_value()
    assert state.anchor["mlp"]["up_proj"]["kernel"] is stored.anchor["mlp"]["up_proj"]["kernel"].get_raw_value()
    assert isinstance(state.anchor["head"]["kernel"], optax.MaskedNode)  # outside the default filter

    metrics = effopd_metrics(optimizer.opt_state)
    assert not bool(metrics["effopd/searched"]) and float(metrics["effopd/accepted_multiplier"]) == 1.0
    assert effopd_search_due(optimizer.opt_state) is False


def test_plain_optax_state_is_returned_as_is():
    params = plain_start()[1]
    opt_state = chain().init(params)
    assert find_effopd_state(opt_state) is opt_state[1]
    new_state = opt_state[1]._replace(count=jnp.ones((), jnp.int32))
    assert replace_effopd_state(opt_state, new_state)[1] is new_state


def test_param_filter_sees_the_nnx_parameter_path_without_the_variable_key():
    # nnx.Optimizer initialises with Param Variables, whose pytree key `value` is no part of the name.
    optimizer = nnx.Optimizer(Model(nnx.Rngs(0)), chain(param_filter=r"^mlp/up_proj/kernel$"), wrt=nnx.Param)
    anchor = find_effopd_state(optimizer.opt_state).anchor
    selected = [
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, leaf in jax.tree_util.tree_flatten_with_path(anchor)[0]
    ]
    assert selected == ["mlp/up_proj/kernel"]


# ------------------------------------------------------------------------------------------------
# Jit search inside nnx.Optimizer.


def test_nnx_optimizer_jit_search_equals_plain_optax_chain_bit_for_bit():
    graphdef, params, rest = plain_start()
    score = make_scorer(graphdef, rest)
    tx = chain()
    opt_state = tx.init(params)

    @jax.jit
    def plain_step(params, opt_state):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), X_TRAIN, Y_TRAIN))(params)
        updates, opt_state = tx.update(grads, opt_state, params, score_fn=score)
        return optax.apply_updates(params, updates), opt_state, effopd_metrics(opt_state)

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, chain(), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        grads = nnx.grad(loss)(model, X_TRAIN, Y_TRAIN)
        optimizer.update(model, grads, score_fn=score)  # forwarded to effopd's update
        return effopd_metrics(optimizer.opt_state)

    accepted = []
    for step in range(1, NUM_STEPS + 1):
        params, opt_state, plain_metrics = plain_step(params, opt_state)
        nnx_metrics = nnx_step(model, optimizer)
        assert_trees_equal(nnx_metrics, plain_metrics)
        assert_trees_equal(nnx.as_pure(nnx.state(model, nnx.Param)), params)
        assert bool(nnx_metrics["effopd/searched"]) == (step in (1, 2, 4, 8))
        if bool(nnx_metrics["effopd/searched"]):
            accepted.append(float(nnx_metrics["effopd/accepted_multiplier"]))
    assert_trees_equal(find_effopd_state(optimizer.opt_state), opt_state[1])
    assert len(accepted) == 4 and max(accepted) > 1.0, accepted  # the search moved the params


# ------------------------------------------------------------------------------------------------
# Host search with an nnx state.


def test_host_search_on_nnx_state_writes_in_place_and_equals_plain_optax():
    graphdef, params, rest = plain_start()
    score = jax.jit(make_scorer(graphdef, rest))
    tx = chain("host")
    opt_state = tx.init(params)

    @jax.jit
    def plain_step(params, opt_state):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), X_TRAIN, Y_TRAIN))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, chain("host"), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model, X_TRAIN, Y_TRAIN))

    def score_by_loading_into_model(candidate) -> float:
        # A Python scorer that overwrites the live model: the search must not depend on it. (It
        # scores with the plain side's jitted function: an eager loss differs in the last ulp.)
        nnx.update(model, candidate)
        return float(score(nnx.as_pure(nnx.state(model, nnx.Param))))

    stored = stored_effopd_state(optimizer.opt_state)
    reports = []
    for step in range(1, NUM_STEPS + 1):
        params, opt_state = plain_step(params, opt_state)
        nnx_step(model, optimizer)
        assert effopd_search_due(optimizer.opt_state) == effopd_search_due(opt_state) == (step in (1, 2, 4, 8))
        if not effopd_search_due(opt_state):
            continue
        params, opt_state, plain_report = effopd_host_search(params, opt_state, score_fn=lambda p: float(score(p)))
        model_params = nnx.state(model, nnx.Param)
        new_params, new_opt_state, report = effopd_host_search(
            model_params, optimizer.opt_state, score_fn=score_by_loading_into_model
        )
        # Same kind as given: the given Variables, now holding the results.
        assert new_params["mlp"]["up_proj"]["kernel"] is model.mlp.up_proj.kernel
        assert stored_effopd_state(new_opt_state).count is stored.count
        assert stored_effopd_state(new_opt_state).anchor["mlp"]["up_proj"]["kernel"] is (
            stored.anchor["mlp"]["up_proj"]["kernel"]
        )
        assert report == plain_report
        reports.append(report)
        assert not effopd_search_due(optimizer.opt_state)
        assert_trees_equal(nnx.as_pure(nnx.state(model, nnx.Param)), params)
        assert_trees_equal(find_effopd_state(optimizer.opt_state), find_effopd_state(opt_state))
    assert [r.step for r in reports] == [1, 2, 4, 8]
    assert max(r.accepted_multiplier for r in reports) > 1.0
    # The anchor holds the accepted point's filtered leaves.
    anchor = find_effopd_state(optimizer.opt_state).anchor
    np.testing.assert_array_equal(anchor["mlp"]["down_proj"]["kernel"], model.mlp.down_proj.kernel[...])


def test_replace_effopd_state_refuses_a_mismatched_state_before_writing():
    optimizer = nnx.Optimizer(Model(nnx.Rngs(0)), chain(), wrt=nnx.Param)
    before = find_effopd_state(optimizer.opt_state)
    other = effopd(param_filter="kernel").init({"mlp": {"kernel": jnp.ones(3)}})
    with pytest.raises(ValueError, match="do not match the given tree"):
        replace_effopd_state(optimizer.opt_state, other)
    assert_trees_equal(find_effopd_state(optimizer.opt_state), before)


# ------------------------------------------------------------------------------------------------
# TrainState.


def test_train_state_host_search_equals_plain_optax_loop():
    graphdef, params, rest = plain_start()
    score = jax.jit(make_scorer(graphdef, rest))

    def grads_of(p):
        return jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), X_TRAIN, Y_TRAIN))(p)

    state = train_state.TrainState.create(apply_fn=None, params=params, tx=chain("host"))
    apply_gradients = jax.jit(lambda s: s.apply_gradients(grads=grads_of(s.params)))
    tx = chain("host")
    plain_params, plain_opt_state = params, tx.init(params)

    @jax.jit
    def plain_step(params, opt_state):
        updates, opt_state = tx.update(grads_of(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    accepted = []
    for step in range(1, NUM_STEPS + 1):
        state = apply_gradients(state)
        plain_params, plain_opt_state = plain_step(plain_params, plain_opt_state)
        if effopd_search_due(state.opt_state):
            new_params, new_opt_state, report = effopd_host_search(
                state.params, state.opt_state, score_fn=lambda p: float(score(p))
            )
            state = state.replace(params=new_params, opt_state=new_opt_state)
            plain_params, plain_opt_state, plain_report = effopd_host_search(
                plain_params, plain_opt_state, score_fn=lambda p: float(score(p))
            )
            assert report == plain_report
            accepted.append(report.accepted_multiplier)
        assert_trees_equal(state.params, plain_params)
        assert_trees_equal(state.opt_state, plain_opt_state)
    assert int(state.step) == NUM_STEPS and len(accepted) == 4 and max(accepted) > 1.0


# ------------------------------------------------------------------------------------------------
# No or two EffOPD states: a clear error, for nnx and plain states alike.


@pytest.mark.parametrize(
    "tx, found",
    [(optax.adam(1e-2), 0), (optax.chain(optax.adam(1e-2), effopd(), effopd()), 2)],
    ids=["none", "two"],
)
@pytest.mark.parametrize("kind", ["nnx", "plain"])
def test_no_or_two_effopd_states_raise(tx, found, kind):
    model = Model(nnx.Rngs(0))
    if kind == "nnx":
        opt_state, params = nnx.Optimizer(model, tx, wrt=nnx.Param).opt_state, nnx.state(model, nnx.Param)
    else:
        params = plain_start()[1]
        opt_state = tx.init(params)
    message = f"exactly one EffOPDState; found {found}"
    for call in (
        lambda: find_effopd_state(opt_state),
        lambda: effopd_metrics(opt_state),
        lambda: effopd_search_due(opt_state),
        lambda: replace_effopd_state(opt_state, chain().init(plain_start()[1])[1]),
        lambda: effopd_host_search(params, opt_state, score_fn=lambda p: 0.0),
    ):
        with pytest.raises(ValueError, match=message):
            call()
