"""The jitted update and the optimizer it applies.

``update_step`` is one optimizer update of the student on a scored rollout batch: the
registered objective's loss and gradient with respect to the trainable params, global-norm
clipping, AdamW, and (last in the chain) EffOPD's step counter. A non-finite loss or gradient
leaves the params and the optimizer state untouched and is counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from effopd_jax import objectives
from effopd_jax.effopd import effopd
from effopd_jax.models import ModelConfig
from effopd_jax.objectives import LossSettings, OPDBatch, OPDLoss
from effopd_jax.trainer.state import Parameterization, TrainState

PyTree = Any


def update_step(
    state: TrainState,
    batch: OPDBatch,
    frozen_params: PyTree,
    *,
    optimizer: optax.GradientTransformation,
    model_config: ModelConfig,
    parameterization: Parameterization,
    loss: OPDLoss,
    settings: LossSettings,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; skipped (and counted) when the loss or gradient is not finite.

    Args:
      state: the train state (donate it when jitting).
      batch: the scored rollouts (:class:`effopd_jax.objectives.OPDBatch`).
      frozen_params: the frozen part of the student (``{}`` for full fine-tuning).
      optimizer, model_config, parameterization, loss, settings: static; close over them.

    Returns:
      ``(new_state, metrics)``: the objective's metrics plus ``loss``, ``grad_norm`` and
      ``update_skipped``.
    """

    def loss_fn(trainable):
        params = parameterization.merge(trainable, frozen_params)
        return objectives.opd_loss(params, batch, config=model_config, loss=loss, settings=settings)

    (loss_value, loss_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable_params)
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
