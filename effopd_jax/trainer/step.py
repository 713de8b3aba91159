"""The jitted update and the optimizer it applies.

``update_step`` is one optimizer update of the student on a scored rollout batch: the
registered objective's loss and gradient with respect to the trainable params, global-norm
clipping, AdamW, and (last in the chain) EffOPD's step counter. A non-finite loss or gradient
leaves the params and the optimizer state untouched and is counted.

The gradient is accumulated over micro-batches when asked (``micro_batch_size``, or a packing
plan): with ``w, N = losses.aggregation_weights(response_mask)`` of the whole step, micro-batch
``k`` contributes ``L_k = sum(w_k * token_losses_k) / N`` and its gradient, so
``loss = sum_k L_k`` and ``grad = sum_k grad L_k`` are the unsplit batch's for every aggregation
(float reassociation aside). Gradients accumulate in float32 (``lax.scan`` over the micro-batches,
or a ``while`` loop over the packed micro-batches in use); the metrics are the loss's ``metrics``
of the whole step's per-token statistics, so they equal the unsplit ones too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from effopd_jax import batching, losses, models, objectives
from effopd_jax.batching import PackingPlan
from effopd_jax.effopd import effopd
from effopd_jax.models import ModelConfig
from effopd_jax.objectives import LossSettings, OPDBatch, OPDLoss
from effopd_jax.trainer.state import Parameterization, TrainState

PyTree = Any
# The per-response-token fields of an OPDBatch (``[rows, T, ...]``), besides ids and mask.
_TOKEN_FIELDS = ("behaviour_logprobs", "teacher_logprobs", "teacher_hidden", "base_logprobs")


def update_step(
    state: TrainState,
    batch: OPDBatch,
    frozen_params: PyTree,
    packing: PackingPlan | None = None,
    *,
    optimizer: optax.GradientTransformation,
    model_config: ModelConfig,
    parameterization: Parameterization,
    loss: OPDLoss,
    settings: LossSettings,
    micro_batch_size: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; skipped (and counted) when the loss or gradient is not finite.

    Args:
      state: the train state (donate it when jitting).
      batch: the scored rollouts (:class:`effopd_jax.objectives.OPDBatch`), ``[R, ...]``.
      frozen_params: the frozen part of the student (``{}`` for full fine-tuning).
      packing: the step's packing plan (``batching.plan_packing``), or None: the student's
        forward then runs on packed rows, one packed micro-batch of ``micro_batch_size`` rows at
        a time.
      optimizer, model_config, parameterization, loss, settings: static; close over them.
      micro_batch_size: static; rows per micro-batch across the devices (0: the whole step at
        once). It must divide ``R`` and be a multiple of the batch shards.

    Returns:
      ``(new_state, metrics)``: the objective's metrics plus ``loss``, ``grad_norm`` and
      ``update_skipped``.
    """
    weights, normaliser = losses.aggregation_weights(batch.response_mask, settings.aggregation)
    rows = batch.response_mask.shape[0]

    def rows_loss(trainable, rows_batch: OPDBatch, rows_weights):
        params = parameterization.merge(trainable, frozen_params)
        terms, aux = objectives.objective_terms_and_aux(params, rows_batch, config=model_config, loss=loss,
                                                        settings=settings)
        value = jnp.sum(rows_weights * terms.token_losses) / normaliser
        if not aux.metrics:  # static: a dense model has no losses of its own
            return value, (terms.token_stats, {})
        # A mixture of experts' router losses are means over one forward's tokens: a micro-batch's
        # counts with its share of the step's rows, so the accumulated value is their mean.
        share = rows_weights.shape[0] / rows
        return value + share * aux.loss, (terms.token_stats, {**aux.metrics, "aux_loss": aux.loss})

    aux_metrics = {}
    if packing is not None:
        loss_value, grads, token_stats = _packed_gradients(
            state.trainable_params, batch, weights, normaliser, packing, frozen_params,
            model_config=model_config, parameterization=parameterization, loss=loss, settings=settings)
    elif batching.check_micro_batch_size(rows, micro_batch_size, batching.batch_shards()) > 1:
        loss_value, grads, (token_stats, aux_metrics) = _accumulated_gradients(
            rows_loss, state.trainable_params, batch, weights, micro_batch_size)
    else:
        (loss_value, (token_stats, aux_metrics)), grads = jax.value_and_grad(rows_loss, has_aux=True)(
            state.trainable_params, batch, weights)
    loss_metrics = {**objectives.step_metrics(loss, token_stats, batch), **aux_metrics}

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
    # Zero non-finite gradients before the optimizer sees them, then discard its result: a
    # NaN must not reach Adam's moments even inside the branch that is thrown away.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, state.trainable_params)
    new_params = optax.apply_updates(state.trainable_params, updates)

    def keep_if_finite(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = TrainState(
        step=state.step + 1,
        trainable_params=keep_if_finite(new_params, state.trainable_params),
        opt_state=keep_if_finite(new_opt_state, state.opt_state),
        rng=state.rng,
        skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32),
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )
    metrics = dict(loss_metrics)
    metrics.update(loss=loss_value, grad_norm=grad_norm, update_skipped=~finite)
    return new_state, metrics


def _float32_zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def _add(total: PyTree, part: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), total, part)


def _like(accumulated: PyTree, params: PyTree) -> PyTree:
    return jax.tree.map(lambda a, p: a.astype(p.dtype), accumulated, params)


def _accumulated_gradients(rows_loss: Callable, trainable: PyTree, batch: OPDBatch, weights: jax.Array,
                           micro_batch_size: int):
    """``lax.scan`` over the micro-batches of whole rows: (loss, grads, (per-token stats [R, T],
    the model's own loss metrics averaged over the micro-batches))."""
    shards = batching.batch_shards()
    split = lambda x: batching.split_micro_batches(x, micro_batch_size, shards)
    # teacher_head [H_t, V] belongs to every micro-batch; every other field is per row.
    per_row = jax.tree.map(split, batch._replace(teacher_head=None))

    def one(carry, inputs):
        grads_total, loss_total = carry
        micro, micro_weights = inputs
        micro = micro._replace(teacher_head=batch.teacher_head)
        (value, stats), grads = jax.value_and_grad(rows_loss, has_aux=True)(trainable, micro, micro_weights)
        return (_add(grads_total, grads), loss_total + value), stats

    (grads, loss_value), (stats, aux_metrics) = jax.lax.scan(
        one, (_float32_zeros(trainable), jnp.zeros((), jnp.float32)), (per_row, split(weights)))
    token_stats = jax.tree.map(lambda y: batching.merge_micro_batches(y, shards), stats)
    # Equal micro-batches: the step's value of a per-forward scalar is their mean.
    aux_metrics = jax.tree.map(lambda y: jnp.mean(y, axis=0), aux_metrics)
    return loss_value, _like(grads, trainable), (token_stats, aux_metrics)


def _packed_gradients(trainable: PyTree, batch: OPDBatch, weights: jax.Array, normaliser: jax.Array,
                      plan: PackingPlan, frozen_params: PyTree, *, model_config: ModelConfig,
                      parameterization: Parameterization, loss: OPDLoss, settings: LossSettings):
    """A ``while`` loop over the packed micro-batches in use: (loss, grads, per-token stats [R, T])."""
    fields = {name: getattr(batch, name) for name in _TOKEN_FIELDS if getattr(batch, name) is not None}
    fields["weights"] = weights

    def packed_loss(trainable, index):
        packed = batching.packed_rows(batch.prompt_ids, batch.response_ids, plan, index, fields)
        micro = OPDBatch(prompt_ids=packed.input_ids, prompt_mask=packed.segment_ids != 0,
                         response_ids=packed.target_ids, response_mask=packed.target_mask,
                         teacher_head=batch.teacher_head,
                         **{name: packed.fields.get(name) for name in _TOKEN_FIELDS})
        params = parameterization.merge(trainable, frozen_params)
        hidden = objectives.packed_hidden_states(model_config, params, packed.input_ids, packed.positions,
                                                 packed.segment_ids)
        terms = loss.objective(hidden, models.lm_head_weight(model_config, params), micro, settings)
        return jnp.sum(packed.fields["weights"] * terms.token_losses) / normaliser, terms.token_stats

    # The statistics' names and dtypes, from an abstract evaluation (nothing runs).
    _, stats_shapes = jax.eval_shape(packed_loss, trainable, 0)
    stats_init = {name: jnp.zeros(batch.response_mask.shape, jnp.float32) for name in stats_shapes}

    def one(index, carry):
        grads_total, loss_total, stats_total = carry
        (value, stats), grads = jax.value_and_grad(packed_loss, has_aux=True)(trainable, index)
        stats_total = {name: batching.scatter_targets(stats_total[name], stats[name], plan, index)
                       for name in stats_total}
        return _add(grads_total, grads), loss_total + value, stats_total

    grads, loss_value, token_stats = batching.loop_packed(
        plan, one, (_float32_zeros(trainable), jnp.zeros((), jnp.float32), stats_init))
    return loss_value, _like(grads, trainable), token_stats


def make_optimizer(
    optimizer_config: ml_collections.ConfigDict,
    *,
    total_steps: int,
    effopd_config: ml_collections.ConfigDict,
    param_filter: Callable[[str], bool],
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """clip_by_global_norm -> AdamW (-> ``effopd(search="host")`` when enabled), and the LR
    schedule. ``param_filter`` selects the leaves EffOPD extrapolates."""
    opt = optimizer_config
    decay_steps = max(total_steps - opt.warmup_steps, 1)
    if opt.schedule == "constant":
        schedule = optax.constant_schedule(opt.learning_rate)
    elif opt.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(opt.learning_rate, decay_steps)
    else:
        schedule = optax.linear_schedule(opt.learning_rate, 0.0, decay_steps)
    if opt.warmup_steps > 0:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps), schedule], [opt.warmup_steps]
        )
    parts = [
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
    ]
    if effopd_config.enabled:
        if effopd_config.rule == "followup":  # the authors' later rule: no trigger, needs the run length
            parts.append(effopd(max_candidates=effopd_config.max_candidates, param_filter=param_filter,
                                search="host", rule="followup", total_steps=total_steps))
        else:
            parts.append(effopd(max_candidates=effopd_config.max_candidates, trigger=effopd_config.trigger,
                                param_filter=param_filter, search="host"))
    return optax.chain(*parts), schedule
