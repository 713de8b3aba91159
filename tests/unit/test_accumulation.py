"""Gradient accumulation over micro-batches and packed rows (trainer/step.py) equals the whole batch.

The optimizer here is `params - grad` (optax.scale(-1)), so the update's parameter change *is* the
accumulated gradient. Reference: `jax.grad` of the authors' loss written directly —
`losses.sampled_token_opd_loss` (its `aggregate_token_losses`) on the student's unchunked-forward
log-probs — for every aggregation; the reverse-KL objective against its unsplit update.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effopd_jax import batching, losses, models, objectives
from effopd_jax import sharding as sharding_lib
from effopd_jax.objectives import LossSettings, OPDBatch
from effopd_jax.teachers import Teacher
from effopd_jax.trainer import FullFineTuning, new_train_state, update_step
from tests.helpers_opd import NEW, PROMPT, STUDENT, TEACHER, hand_rollout

SETTINGS = dict(chunk_size=5, temperature=0.7, is_threshold=2.0)


@pytest.fixture(scope="module")
def student_params():
    return models.init_params(STUDENT, jax.random.key(1))


@pytest.fixture(scope="module")
def scored():
    """The hand rollout scored by a teacher (token log-probs and hidden states)."""
    out = hand_rollout()
    params = models.init_params(TEACHER, jax.random.key(2))
    batch = Teacher("t", TEACHER, params, "token_logprobs", 0.7, 5).score(out, OPDBatch(*out))
    return Teacher("t", TEACHER, params, "hidden_states", 0.7, 5).score(out, batch)


def _plan(batch, micro_batch_size, shards=1):
    p, r, _ = batching.sequence_lengths(batch.prompt_mask, batch.response_mask)
    return batching.plan_packing(np.asarray(p), np.asarray(r), prompt_length=PROMPT, max_new_tokens=NEW,
                                 micro_batch_size=micro_batch_size, shards=shards)


def _gradient_step(params, batch, *, loss="sampled_token", aggregation, micro_batch_size=0, plan=None,
                   mesh=None, hlo=False):
    """(gradient, metrics[, compiled HLO text]) of one update_step with params' = params - grad."""
    optimizer = optax.scale(-1.0)
    mesh = mesh or sharding_lib.make_mesh(devices=jax.devices()[:1])
    with sharding_lib.sharding_context(mesh):
        state = new_train_state(params, optimizer, seed=0, mesh=mesh)
        step = jax.jit(functools.partial(
            update_step, optimizer=optimizer, model_config=STUDENT, parameterization=FullFineTuning(),
            loss=objectives.get_loss(loss), settings=LossSettings(aggregation=aggregation, **SETTINGS),
            micro_batch_size=micro_batch_size)).lower(state, batch, {}, plan).compile()
        new_state, metrics = step(state, batch, {}, plan)
    grads = jax.tree.map(lambda old, new: np.asarray(old) - np.asarray(new), params, new_state.trainable_params)
    return (grads, jax.device_get(metrics)) + ((step.as_text(),) if hlo else ())


def _reference(params, batch, aggregation):
    """The authors' loss on unchunked full-vocabulary log-probs, differentiated by jax.grad."""

    def loss(p):
        ids = jnp.concatenate([batch.prompt_ids, batch.response_ids], axis=1)
        mask = jnp.concatenate([batch.prompt_mask, batch.response_mask], axis=1)
        logits = models.forward(dataclasses.replace(STUDENT, attention_impl="direct"), p, ids, attention_mask=mask)
        student = losses.token_logprobs(logits[:, PROMPT - 1:-1], batch.response_ids, temperature=0.7)
        return losses.sampled_token_opd_loss(
            student, batch.teacher_logprobs, batch.response_mask, behaviour_logprobs=batch.behaviour_logprobs,
            is_threshold=2.0, aggregation=aggregation)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return jax.tree.map(np.asarray, grads), float(value), jax.device_get(metrics)


def _assert_same(grads, expected, rtol=2e-4, atol=1e-6):
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_accumulated_gradient_equals_the_whole_batch_gradient(student_params, scored, aggregation):
    expected, value, expected_metrics = _reference(student_params, scored, aggregation)
    variants = {"micro-batches of 2": {"micro_batch_size": 2},
                "packed, 2 rows per micro-batch": {"micro_batch_size": 2, "plan": _plan(scored, 2)}}
    for name, kwargs in variants.items():
        grads, metrics = _gradient_step(student_params, scored, aggregation=aggregation, **kwargs)
        _assert_same(grads, expected)
        assert float(metrics["loss"]) == pytest.approx(value, rel=1e-5, abs=1e-7), name
        for key, reference in expected_metrics.items():
            assert float(metrics[key]) == pytest.approx(float(reference), rel=1e-5, abs=1e-6), (name, key)
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(expected)), rtol=1e-5)


def test_reverse_kl_with_teacher_hidden_states_accumulates_exactly(student_params, scored):
    whole, whole_metrics = _gradient_step(student_params, scored, loss="full_reverse_kl",
                                          aggregation="seq-mean-token-sum")
    for kwargs in ({"micro_batch_size": 4}, {"micro_batch_size": 1, "plan": _plan(scored, 1)}):
        grads, metrics = _gradient_step(student_params, scored, loss="full_reverse_kl",
                                        aggregation="seq-mean-token-sum", **kwargs)
        _assert_same(grads, whole)
        for key in ("loss", "reverse_kl", "num_tokens"):
            assert float(metrics[key]) == pytest.approx(float(whole_metrics[key]), rel=1e-5), key


def test_sharded_micro_batches_and_packing_equal_one_device(student_params, scored):
    """On a (data=2, fsdp=2, tensor=2) mesh each micro-batch keeps every row on its device: the
    re-layout adds no all-to-all, and the gradient is the single-device one."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    expected, _, _ = _reference(student_params, scored, "token-mean")
    params = jax.device_put(student_params, sharding_lib.param_shardings(STUDENT, mesh))
    batch = jax.tree.map(lambda x: jax.device_put(x, sharding_lib.batch_sharding(mesh, x.ndim)),
                         scored._replace(teacher_hidden=None, teacher_head=None))
    plan = _plan(scored, 4, shards=4)
    plan = plan._replace(**{name: jax.device_put(getattr(plan, name), sharding_lib.batch_sharding(mesh, 4))
                            for name in plan._fields[:5]})
    for kwargs in ({"micro_batch_size": 4}, {"micro_batch_size": 4, "plan": plan}):
        grads, _, hlo = _gradient_step(params, batch, aggregation="token-mean", mesh=mesh, hlo=True, **kwargs)
        _assert_same(grads, expected)
        assert "all-to-all" not in hlo


def test_per_teacher_sums_of_routed_rows_are_the_whole_steps(student_params, scored):
    """Several routed teachers (``batch.teacher_rows``): the per-teacher reverse-KL sums and token
    counts of a micro-batched or packed update are those of the whole step, counted with numpy
    from the unchunked forward's log-probs."""
    rows = scored.response_mask.shape[0]
    teacher_rows = np.zeros((rows, 2), bool)
    teacher_rows[::2, 0] = teacher_rows[1::2, 1] = True
    batch = scored._replace(teacher_rows=jnp.asarray(teacher_rows))
    ids = jnp.concatenate([batch.prompt_ids, batch.response_ids], axis=1)
    mask = jnp.concatenate([batch.prompt_mask, batch.response_mask], axis=1)
    logits = models.forward(dataclasses.replace(STUDENT, attention_impl="direct"), student_params, ids,
                            attention_mask=mask)
    student = np.asarray(losses.token_logprobs(logits[:, PROMPT - 1:-1], batch.response_ids, temperature=0.7))
    valid = np.asarray(batch.response_mask)
    kl_per_row = np.where(valid, student - np.asarray(batch.teacher_logprobs), 0.0).sum(axis=1)
    expected_kl = np.asarray([kl_per_row[teacher_rows[:, j]].sum() for j in range(2)])
    expected_tokens = np.asarray([valid[teacher_rows[:, j]].sum() for j in range(2)], np.float32)
    for kwargs in ({}, {"micro_batch_size": 2}, {"micro_batch_size": 2, "plan": _plan(scored, 2)}):
        _, metrics = _gradient_step(student_params, batch, aggregation="seq-mean-token-mean", **kwargs)
        np.testing.assert_array_equal(metrics[objectives.TEACHER_NUM_TOKENS], expected_tokens)
        np.testing.assert_allclose(metrics[objectives.TEACHER_REVERSE_KL_SUM], expected_kl, rtol=1e-4, atol=1e-5)
