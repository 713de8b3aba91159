"""The loss seam: OPD objectives by name, and the response forward passes they share.

An OPD objective turns the student's final hidden states at the response positions (and its
output head) plus the step's :class:`OPDBatch` into :class:`ObjectiveTerms`: a loss per response
token and the per-token statistics its metrics reduce. The step aggregates: each token carries a
weight that depends on its own row, and the step divides once by a normaliser of the whole
step's mask (``losses.aggregation_weights``: tokens for ``token-mean``, non-empty sequences for
the ``seq-mean-*`` aggregations), so a micro-batch (or a packed row) reports the sum
``sum(weight * token_loss)`` of its own tokens and the step's loss is
``sum over micro-batches / normaliser``, exactly the unsplit value. The metrics are the
registered ``metrics`` of the whole step's per-token statistics. Each objective is registered
under the name ``config.loss.name`` selects, together with what it needs from the teacher:

  name               teacher provides       math (effopd_jax/losses.py)
  sampled_token      token log-probs        sampled_token_opd_loss (the authors' loss)
  full_reverse_kl    hidden states + head   chunked_reverse_kl (exact, full vocabulary)
  topk_reverse_kl    hidden states + head   chunked_reverse_kl(topk=k) (top-k + tail buckets)

An objective must be per-token (a token's loss and statistics read only its own position of
the batch and of the hidden states): that is what lets the step split rows into micro-batches and
pack several sequences into one row without changing a number.

Everything here is pure and jit-able; the trainer closes over the static settings. How to add
a loss: docs/architecture.md#how-to-add.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from effopd_jax import losses, models
from effopd_jax.models import ModelConfig

PyTree = Any
TeacherOutput = Literal["token_logprobs", "hidden_states"]


class OPDBatch(NamedTuple):
    """One step's training data, all ``[rows, ...]`` with ``rows = prompts * samples_per_prompt``
    (global arrays, batch-sharded).

    Attributes:
      prompt_ids: ``[rows, prompt_len]`` int32, left-padded.
      prompt_mask: ``[rows, prompt_len]`` bool.
      response_ids: ``[rows, max_new_tokens]`` int32 sampled tokens.
      response_mask: ``[rows, max_new_tokens]`` bool, generated tokens up to and including EOS.
      behaviour_logprobs: ``[rows, max_new_tokens]`` float32, log-probs under the sampler.
      teacher_logprobs: ``[rows, max_new_tokens]`` float32 (token-log-prob objectives), or None.
      teacher_hidden: ``[rows, max_new_tokens, teacher_hidden]`` (hidden-state objectives), or None.
      teacher_head: ``[teacher_hidden, vocab]`` the teacher's output projection (hidden-state
        objectives), or None.
      base_logprobs: ``[rows, max_new_tokens]`` float32 of G-OPD's reference model pi_B, or None.
      teacher_rows: ``[rows, teachers]`` bool, which routed teacher scored each row (several
        teachers routed by tag, :class:`effopd_jax.teachers.TeacherSet`), or None. Only read for
        the per-teacher reverse-KL metrics; the loss reads ``teacher_logprobs`` alone.
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    behaviour_logprobs: jax.Array
    teacher_logprobs: jax.Array | None = None
    teacher_hidden: jax.Array | None = None
    teacher_head: jax.Array | None = None
    base_logprobs: jax.Array | None = None
    teacher_rows: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The static settings of an objective (hashable: closed over by the jitted update).

    Attributes:
      aggregation: how token losses become one number (``losses.AGGREGATIONS``).
      chunk_size: response positions per chunk of the vocabulary projection.
      temperature: the sampling temperature (> 0); logits are divided by it, as the sampler did.
      reward_scale: G-OPD's lambda (sampled_token only).
      is_threshold: upper bound of the truncated importance weight, or None (sampled_token only).
      topk: k of the top-k reverse KL (topk_reverse_kl only).
    """

    aggregation: str = "seq-mean-token-mean"
    chunk_size: int = 512
    temperature: float = 1.0
    reward_scale: float = 1.0
    is_threshold: float | None = 5.0
    topk: int = 64


class ObjectiveTerms(NamedTuple):
    """What an objective reports for the response tokens of a batch (``[rows, T]`` each).

    Attributes:
      token_losses: float32 loss per token, 0 where ``response_mask`` is False; differentiable
        in the student's hidden states and head.
      token_stats: float32 per-token values without gradient (0 where the mask is False) that
        the loss's ``metrics`` reduce over the whole step.
    """

    token_losses: jax.Array
    token_stats: dict[str, jax.Array]


Objective = Callable[[jax.Array, jax.Array, OPDBatch, LossSettings], ObjectiveTerms]
Metrics = Callable[[dict[str, jax.Array], jax.Array], dict[str, jax.Array]]


def token_means(token_stats: dict[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
    """The default metrics: every per-token statistic's mean over the valid tokens, and
    ``num_tokens``."""
    valid = mask.astype(bool)
    num_tokens = jnp.sum(valid.astype(jnp.float32))
    means = {name: jnp.sum(jnp.where(valid, value, 0.0)) / jnp.maximum(num_tokens, 1.0)
             for name, value in token_stats.items()}
    return means | {"num_tokens": num_tokens}


@dataclasses.dataclass(frozen=True)
class OPDLoss:
    """A registered objective.

    Attributes:
      name: the ``config.loss.name`` that selects it.
      teacher_output: what the teacher must put into the batch: ``"token_logprobs"``
        (``teacher_logprobs``) or ``"hidden_states"`` (``teacher_hidden`` and ``teacher_head``).
      objective: ``(student_hidden [rows, T, H], student_head [H, V], batch, settings) ->
        ObjectiveTerms``; per-token (see the module docstring).
      metrics: ``(token_stats, response_mask) -> {name: float32 scalar}`` over the whole step
        (default: :func:`token_means`).
    """

    name: str
    teacher_output: TeacherOutput
    objective: Objective
    metrics: Metrics = token_means


# ---------------------------------------------------------------------------------------------
# Forward passes over prompt + response
# ---------------------------------------------------------------------------------------------


def response_hidden_states(config: ModelConfig, params: PyTree, prompt_ids: jax.Array,
                           prompt_mask: jax.Array, response_ids: jax.Array,
                           response_mask: jax.Array) -> jax.Array:
    """Final hidden states that predict each response token: ``[rows, max_new_tokens, hidden]``.

    The model runs once over ``prompt + response`` (``[rows, prompt_len + max_new_tokens]``);
    the state at position ``prompt_len - 1 + t`` predicts response token ``t``. Padding is masked
    and positions count real tokens only, as in the sampler.
    """
    prompt_len = prompt_ids.shape[1]
    new_tokens = response_ids.shape[1]
    input_ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    attention_mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    hidden = models.forward(config, params, input_ids, attention_mask=attention_mask,
                            return_hidden_states=True)
    return jax.lax.dynamic_slice_in_dim(hidden, prompt_len - 1, new_tokens, axis=1)


def response_hidden_states_with_aux(config: ModelConfig, params: PyTree, prompt_ids: jax.Array,
                                    prompt_mask: jax.Array, response_ids: jax.Array,
                                    response_mask: jax.Array) -> tuple[jax.Array, models.AuxOutput]:
    """:func:`response_hidden_states` and the model's own training losses
    (``models.forward_with_aux``: a mixture of experts' router losses over every real prompt and
    response token; zero for a dense model), from the same single forward."""
    prompt_len = prompt_ids.shape[1]
    new_tokens = response_ids.shape[1]
    input_ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    attention_mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    hidden, aux = models.forward_with_aux(config, params, input_ids, attention_mask=attention_mask,
                                          return_hidden_states=True)
    return jax.lax.dynamic_slice_in_dim(hidden, prompt_len - 1, new_tokens, axis=1), aux


def packed_hidden_states(config: ModelConfig, params: PyTree, input_ids: jax.Array,
                         positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Final hidden states of packed rows (``effopd_jax.batching``): ``[rows, length, hidden]``,
    the state at each position predicting the next token of its segment. Segment 0 is padding."""
    return models.forward(config, params, input_ids, positions=positions, segment_ids=segment_ids,
                          attention_mask=segment_ids != 0, return_hidden_states=True)


def response_logprobs(config: ModelConfig, params: PyTree, prompt_ids: jax.Array,
                      prompt_mask: jax.Array, response_ids: jax.Array, response_mask: jax.Array,
                      *, temperature: float, chunk_size: int) -> jax.Array:
    """``log pi(response_t | prompt, response_<t)`` at ``temperature``: ``[rows, max_new_tokens]``
    float32, the vocabulary projection chunked over the response."""
    hidden = response_hidden_states(config, params, prompt_ids, prompt_mask, response_ids, response_mask)
    return losses.chunked_token_logprobs(hidden, models.lm_head_weight(config, params), response_ids,
                                         chunk_size=chunk_size, temperature=temperature)


# ---------------------------------------------------------------------------------------------
# The registered objectives
# ---------------------------------------------------------------------------------------------


# Metrics of the sampled-token objective when the batch says which routed teacher scored each row
# (``batch.teacher_rows``): per teacher, sums (not means) over the whole step's tokens.
TEACHER_REVERSE_KL_SUM = "teacher_reverse_kl_sum"
TEACHER_NUM_TOKENS = "teacher_num_tokens"


def per_teacher_reverse_kl_sums(token_reverse_kl: jax.Array, mask: jax.Array,
                                teacher_rows: jax.Array) -> dict[str, jax.Array]:
    """Per routed teacher j: the sum over its rows' valid tokens of the per-token reverse KL
    ``sg(s) - T`` and their count, two ``[teachers]`` float32 (``reverse_kl/<name>`` is their
    ratio). ``teacher_rows`` ``[rows, teachers]`` bool; the other arrays ``[rows, T]``."""
    kl = jnp.sum(jnp.where(mask, token_reverse_kl, 0.0), axis=1)
    tokens = jnp.sum(mask, axis=1).astype(jnp.float32)
    rows = teacher_rows.astype(jnp.float32)
    return {TEACHER_REVERSE_KL_SUM: jnp.sum(kl[:, None] * rows, axis=0),
            TEACHER_NUM_TOKENS: jnp.sum(tokens[:, None] * rows, axis=0)}


def step_metrics(loss: "OPDLoss", token_stats: dict[str, jax.Array], batch: OPDBatch) -> dict[str, jax.Array]:
    """The metrics of a whole step from its per-token statistics ``[rows, T]``: the loss's
    ``metrics``, plus the per-teacher reverse-KL sums when the rows were routed to several
    teachers (``batch.teacher_rows``) and the objective reports ``sampled_reverse_kl``."""
    metrics = loss.metrics(token_stats, batch.response_mask)
    if batch.teacher_rows is not None and "sampled_reverse_kl" in token_stats:
        metrics = {**metrics, **per_teacher_reverse_kl_sums(token_stats["sampled_reverse_kl"],
                                                            batch.response_mask.astype(bool), batch.teacher_rows)}
    return metrics


def _sampled_token(student_hidden, student_head, batch: OPDBatch, settings: LossSettings) -> ObjectiveTerms:
    student_logprobs = losses.chunked_token_logprobs(
        student_hidden, student_head, batch.response_ids, chunk_size=settings.chunk_size,
        temperature=settings.temperature)
    return ObjectiveTerms(*losses.sampled_token_opd_token_terms(
        student_logprobs, batch.teacher_logprobs, batch.response_mask,
        base_logprobs=batch.base_logprobs, reward_scale=settings.reward_scale,
        behaviour_logprobs=batch.behaviour_logprobs, is_threshold=settings.is_threshold))


def _reverse_kl(topk: bool) -> Objective:
    def objective(student_hidden, student_head, batch: OPDBatch, settings: LossSettings) -> ObjectiveTerms:
        mask = batch.response_mask.astype(bool)
        per_token_kl = losses.chunked_reverse_kl(
            student_hidden, student_head, batch.teacher_hidden, batch.teacher_head,
            chunk_size=settings.chunk_size, topk=settings.topk if topk else None)
        per_token_kl = jnp.where(mask, per_token_kl, 0.0)
        return ObjectiveTerms(per_token_kl, {"reverse_kl": jax.lax.stop_gradient(per_token_kl)})

    return objective




_LOSSES: dict[str, OPDLoss] = {}


def register_loss(loss: OPDLoss) -> OPDLoss:
    """Makes ``config.loss.name = loss.name`` select ``loss``."""
    if loss.teacher_output not in ("token_logprobs", "hidden_states"):
        raise ValueError(f"OPDLoss.teacher_output must be 'token_logprobs' or 'hidden_states', "
                         f"got {loss.teacher_output!r}")
    if loss.name in _LOSSES and _LOSSES[loss.name] is not loss:
        raise ValueError(f"a loss named {loss.name!r} is already registered")
    _LOSSES[loss.name] = loss
    return loss


def registered_losses() -> tuple[str, ...]:
    return tuple(sorted(_LOSSES))


def get_loss(name: str) -> OPDLoss:
    """The objective registered as ``name``; ValueError listing the registered ones otherwise."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {registered_losses()}")
    return _LOSSES[name]


register_loss(OPDLoss("sampled_token", "token_logprobs", _sampled_token, losses.sampled_token_opd_metrics))
register_loss(OPDLoss("full_reverse_kl", "hidden_states", _reverse_kl(topk=False)))
register_loss(OPDLoss("topk_reverse_kl", "hidden_states", _reverse_kl(topk=True)))


def objective_terms_and_aux(params: PyTree, batch: OPDBatch, *, config: ModelConfig, loss: OPDLoss,
                            settings: LossSettings) -> tuple[ObjectiveTerms, models.AuxOutput]:
    """The per-token terms of ``loss`` for the student ``params`` (the full model params) on the
    rows of ``batch`` (one forward over prompt + response), and the model's own training losses
    from the same forward (``models.forward_with_aux``: a mixture of experts' router losses; zero
    and no metrics for a dense model)."""
    hidden, aux = response_hidden_states_with_aux(config, params, batch.prompt_ids, batch.prompt_mask,
                                                  batch.response_ids, batch.response_mask)
    return loss.objective(hidden, models.lm_head_weight(config, params), batch, settings), aux


def opd_loss(params: PyTree, batch: OPDBatch, *, config: ModelConfig, loss: OPDLoss,
             settings: LossSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The objective ``loss`` of the student ``params`` on one whole batch: ``(loss, metrics)``,
    the per-token losses aggregated by ``settings.aggregation`` (the unsplit reference of the
    trainer's micro-batched update).

    A model with training losses of its own (a mixture of experts' router load-balancing and
    z-losses) adds them, already weighted, to the objective and reports them: ``aux_loss`` (what
    was added) and the unweighted terms (e.g. ``moe/load_balancing_loss``).
    """
    terms, aux = objective_terms_and_aux(params, batch, config=config, loss=loss, settings=settings)
    weights, normaliser = losses.aggregation_weights(batch.response_mask, settings.aggregation)
    value = jnp.sum(weights * terms.token_losses) / normaliser
    metrics = step_metrics(loss, terms.token_stats, batch)
    if aux.metrics:  # static: the family reports router losses
        value = value + aux.loss
        metrics = {**metrics, **aux.metrics, "aux_loss": aux.loss}
    return value, metrics
