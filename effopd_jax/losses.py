"""On-policy distillation (OPD) losses.

Three families, all over a student policy pi_s and a frozen teacher pi_t:

* ``sampled_token_opd_loss``: the loss the EffOPD / G-OPD authors optimise (docs/opd_loss.md). It
  only needs the log-probabilities of the *sampled* rollout tokens under each model, and is a
  REINFORCE surrogate whose per-token reward is the negative single-sample reverse KL
  ``log pi_t(y_t) - log pi_s(y_t)`` (or the G-OPD reward with a reference model and a reward
  scale).
* ``token_reverse_kl`` / ``full_vocab_reverse_kl_loss``: the exact per-position reverse KL
  ``KL(pi_s(.|y_<t) || pi_t(.|y_<t))`` summed over the whole vocabulary, differentiable.
* ``token_topk_reverse_kl`` / ``topk_reverse_kl_loss``: the reverse KL between coarse-grained
  distributions over the student's top-k tokens plus one "tail" bucket holding the rest of the
  probability mass. By the data-processing inequality it lies in ``[0, exact KL]``.

The memory-bounded path (``chunked_token_logprobs``, ``chunked_reverse_kl``) takes final hidden
states ``[batch, seq, hidden]`` and an ``lm_head`` weight ``[hidden, vocab]`` and computes the
same quantities one sequence chunk at a time (``lax.map`` forward, ``lax.scan`` backward, tied
together by a ``jax.custom_vjp`` that recomputes each chunk's logits during backprop), so the
float32 logits ``[batch, seq, vocab]`` never exist at once, in the forward or the backward pass,
and the lm_head gradient is accumulated in place without a second lm_head-sized buffer.

Conventions used throughout:

* ``mask`` is ``[batch, seq]``; a non-zero / True entry is a response token that counts. Prompt
  and padding tokens are False. Values at masked positions are never read (they may be garbage,
  even NaN) and receive exactly zero gradient.
* Token-level inputs are aligned by the caller: ``tokens[b, t]`` is scored by the logits (or
  hidden state) at position ``t``. For a causal LM that means ``hidden[:, :-1]`` with
  ``input_ids[:, 1:]``.
* All arithmetic is float32 whatever the input dtype.
* Teacher (and reference-model) quantities never receive gradients.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# The authors clamp every log-ratio to +-20 before exponentiating (verl `core_algos` and
# `rollout_corr_helper`), so a single badly-mismatched token cannot produce inf.
_LOG_RATIO_CLAMP = 20.0


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_rank(name: str, x: jax.Array, rank: int, what: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"`{name}` must be {what} (rank {rank}); got shape {tuple(x.shape)}.")


def _check_same_shape(name: str, x: jax.Array, ref_name: str, ref: jax.Array) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(
            f"`{name}` has shape {tuple(x.shape)} but `{ref_name}` has shape {tuple(ref.shape)};"
            " they must match."
        )


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}; got {aggregation!r}.")


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}.")


def _check_chunk_size(chunk_size: int) -> None:
    _check_positive_int("chunk_size", chunk_size)


def _check_topk(k: int | None, vocab: int, name: str = "k") -> None:
    if k is None:
        return
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"`{name}` must be an int in [1, vocab={vocab}]; got {k!r}.")


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over True entries of ``mask`` (0 when there are none)."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def aggregate_token_losses(
    token_losses: jax.Array, mask: jax.Array, aggregation: Aggregation = "seq-mean-token-mean"
) -> jax.Array:
    """Reduces per-token losses ``[batch, seq]`` to a scalar, counting only ``mask`` tokens.

    With ``m`` the mask, ``n_i = sum_t m_it`` and ``N = #{i : n_i > 0}``:

    * ``token-mean``:          ``sum_it m_it l_it / sum_it m_it``
    * ``seq-mean-token-mean``: ``(1/N) sum_{i: n_i>0} (1/n_i) sum_t m_it l_it``  (the authors'
      effective aggregation: one sequence per micro-batch, averaged over micro-batches)
    * ``seq-mean-token-sum``:  ``(1/N) sum_{i: n_i>0} sum_t m_it l_it``

    Rows with no valid token are left out of the sequence mean (so padding a batch with empty
    rows changes nothing); an all-masked batch gives 0, never NaN.

    Args:
      token_losses: ``[batch, seq]`` per-token values; entries where ``mask`` is False are ignored
        (they may be NaN/inf).
      mask: ``[batch, seq]`` bool or 0/1; True marks a token that counts.
      aggregation: one of ``AGGREGATIONS``.

    Returns:
      A float32 scalar.
    """
    _check_aggregation(aggregation)
    _check_rank("token_losses", token_losses, 2, "[batch, seq]")
    _check_same_shape("mask", mask, "token_losses", token_losses)
    valid = mask.astype(bool)
    masked = jnp.where(valid, token_losses.astype(jnp.float32), 0.0)
    if aggregation == "token-mean":
        return jnp.sum(masked) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    tokens_per_seq = jnp.sum(valid.astype(jnp.float32), axis=-1)
    num_seqs = jnp.maximum(jnp.sum((tokens_per_seq > 0).astype(jnp.float32)), 1.0)
    seq_sums = jnp.sum(masked, axis=-1)
    if aggregation == "seq-mean-token-mean":
        # An empty row has seq_sum == 0, so dividing by max(n_i, 1) makes it contribute 0.
        return jnp.sum(seq_sums / jnp.maximum(tokens_per_seq, 1.0)) / num_seqs
    return jnp.sum(seq_sums) / num_seqs


def aggregation_weights(
    mask: jax.Array, aggregation: Aggregation = "seq-mean-token-mean"
) -> tuple[jax.Array, jax.Array]:
    """Per-token weights and one normaliser with ``aggregate_token_losses(l, mask, aggregation)
    == sum(weights * l) / normaliser`` (up to float reassociation).

    With ``n_i`` the valid tokens of row ``i`` and ``N`` the rows with ``n_i > 0``:

    * ``token-mean``:          ``weights = m``,           ``normaliser = max(sum m, 1)``
    * ``seq-mean-token-mean``: ``weights = m / max(n_i, 1)``, ``normaliser = max(N, 1)``
    * ``seq-mean-token-sum``:  ``weights = m``,           ``normaliser = max(N, 1)``

    A token's weight depends on its own row only and the normaliser on the whole mask, so a loss
    split into micro-batches (or packed rows) is exact: each part contributes
    ``sum(weights * l)`` of its own tokens, and the step divides once by the step's normaliser.

    Args:
      mask: ``[batch, seq]`` bool or 0/1 of the whole step.
      aggregation: one of ``AGGREGATIONS``.

    Returns:
      ``(weights [batch, seq] float32, normaliser)`` (a float32 scalar), both without gradient.
    """
    _check_aggregation(aggregation)
    _check_rank("mask", mask, 2, "[batch, seq]")
    valid = mask.astype(bool).astype(jnp.float32)
    if aggregation == "token-mean":
        return valid, jnp.maximum(jnp.sum(valid), 1.0)
    tokens_per_seq = jnp.sum(valid, axis=-1, keepdims=True)
    normaliser = jnp.maximum(jnp.sum((tokens_per_seq > 0).astype(jnp.float32)), 1.0)
    if aggregation == "seq-mean-token-mean":
        return valid / jnp.maximum(tokens_per_seq, 1.0), normaliser
    return valid, normaliser


# ---------------------------------------------------------------------------------------------
# The authors' sampled-token OPD loss
# ---------------------------------------------------------------------------------------------


def _discounted_returns(rewards: jax.Array, mask: jax.Array, discount: float) -> jax.Array:
    """``R_t = r_t + discount * R_{t'}`` over valid tokens, ``t'`` the next valid token.

    Masked positions contribute no reward and pass the return through unchanged (so the discount
    is applied per *response token*, not per array position). ``[batch, seq] -> [batch, seq]``.
    """

    def step(next_return, reward_and_valid):
        reward, valid = reward_and_valid
        ret = jnp.where(valid, reward + discount * next_return, next_return)
        return ret, ret

    _, returns = lax.scan(
        step, jnp.zeros(rewards.shape[0], jnp.float32), (rewards.T, mask.T), reverse=True
    )
    return returns.T


def sampled_token_opd_loss(
    student_logprobs: jax.Array,
    teacher_logprobs: jax.Array,
    mask: jax.Array,
    *,
    base_logprobs: jax.Array | None = None,
    reward_scale: float = 1.0,
    behaviour_logprobs: jax.Array | None = None,
    is_threshold: float | None = 5.0,
    old_logprobs: jax.Array | None = None,
    clip_eps: float | None = None,
    dual_clip_ratio: float | None = None,
    discount: float = 0.0,
    aggregation: Aggregation = "seq-mean-token-mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The authors' OPD / G-OPD loss on the sampled rollout tokens (docs/opd_loss.md#advantage to #aggregation).

    Notation per token (all ``[batch, seq]``): ``s = log pi_student(y_t)`` (differentiable),
    ``T = log pi_teacher(y_t)``, ``B = log pi_base(y_t)`` (G-OPD reference model), ``sg`` = stop
    gradient, and ``s_prox`` = the student log-prob that defines the advantage: ``sg(s)`` on-policy,
    or ``old_logprobs`` when a rollout is reused for several updates.

    Per-token reward (no gradient)::

        r = T - s_prox                                  (standard OPD; base_logprobs is None)
        r = reward_scale * (T - B) - (s_prox - B)       (G-OPD; reward_scale > 1 is ExOPD)

    For ``reward_scale == 1`` the G-OPD reward equals the standard one. The advantage is
    ``A_t = sum_{u >= t} discount^(u-t) r_u`` over valid tokens; ``discount = 0`` (default) is the
    authors' immediate per-token advantage ``A = r``.

    Per-token loss::

        l = -w * A * exp(s - s_prox)                     (on-policy: value -w*A, grad -w*A*grad s)
        l = w * max(-A * rho, -A * clip(rho, 1 - clip_eps, 1 + clip_eps)),  rho = exp(s - s_prox)
                                                         (clip_eps given; PPO clipping)

    and with ``dual_clip_ratio = c`` the clipped loss of a negative-advantage token is further
    bounded by ``-A * c``. The truncated importance weight corrects for a sampler whose log-probs
    differ from the trainer's (e.g. a separate inference engine)::

        w = sg(min(exp(s_prox - behaviour_logprobs), is_threshold))   (behaviour_logprobs given)
        w = 1                                                          (otherwise)

    Log-ratios are clamped to +-20 before ``exp``, as in the authors' code.

    Which ``discount`` to use: with ``discount = 0`` the expected gradient is that of
    ``sum_t E_{y_<t ~ sg(pi_s)}[KL(pi_s(.|y_<t) || pi_t(.|y_<t))]`` -- per-position reverse KLs with
    the prefix distribution held fixed -- which is what the authors optimise. It is *not* the
    gradient of the sequence-level reverse KL ``KL(pi_s(y) || pi_t(y))``, because it drops the
    credit a token gets for the KL of the tokens after it. ``discount = 1`` (reward-to-go) gives an
    unbiased estimate of the sequence-level gradient (with ``aggregation='seq-mean-token-sum'``
    and unit importance weights).

    The loss is ``aggregate_token_losses`` of the per-token losses of
    :func:`sampled_token_opd_token_terms`, and the metrics are
    :func:`sampled_token_opd_metrics` of its per-token statistics (the split the trainer uses to
    accumulate micro-batches exactly).

    Args:
      student_logprobs: ``[batch, seq]`` log pi_student of the sampled tokens; the only input that
        is differentiated.
      teacher_logprobs: ``[batch, seq]`` log pi_teacher of the same tokens.
      mask: ``[batch, seq]`` bool or 0/1; True for response tokens that count.
      base_logprobs: optional ``[batch, seq]`` log pi_base (the G-OPD reference model).
      reward_scale: lambda of G-OPD; anything other than 1.0 requires ``base_logprobs``.
      behaviour_logprobs: optional ``[batch, seq]`` log-probs reported by the sampler that
        produced the rollout, for the truncated importance weight.
      is_threshold: upper bound on the importance weight (``None``: no truncation). Only used
        with ``behaviour_logprobs``.
      old_logprobs: optional ``[batch, seq]`` log-probs of the student *as it was when the
        rollout was scored* (recomputed by the trainer before the first update on this rollout).
        Needed when one rollout feeds several optimizer updates: it fixes the advantage and is
        the denominator of the PPO ratio. On-policy (one update per rollout) leave it ``None``;
        it would equal ``sg(student_logprobs)``.
      clip_eps: PPO clip range for the ratio ``rho``; requires ``old_logprobs`` (on-policy
        ``rho == 1`` and clipping would be inert).
      dual_clip_ratio: optional dual-clip bound ``c > 1`` for negative advantages; requires
        ``clip_eps``.
      discount: in ``[0, 1]``; 0 is the authors' immediate advantage, 1 is reward-to-go.
      aggregation: one of ``AGGREGATIONS``; the authors' effective one is the default.

    Returns:
      ``(loss, metrics)``: the scalar loss and a dict of float32 scalars (none differentiable):
      ``sampled_reverse_kl`` (mean of ``sg(s) - T`` over valid tokens, a single-sample estimate
      of the per-token reverse KL), ``advantage_mean``, ``advantage_std``, ``is_weight_mean``,
      ``is_weight_max``, ``num_tokens``; plus ``clip_fraction`` when ``clip_eps`` is set.
    """
    _check_aggregation(aggregation)
    token_losses, token_stats = sampled_token_opd_token_terms(
        student_logprobs, teacher_logprobs, mask, base_logprobs=base_logprobs,
        reward_scale=reward_scale, behaviour_logprobs=behaviour_logprobs,
        is_threshold=is_threshold, old_logprobs=old_logprobs, clip_eps=clip_eps,
        dual_clip_ratio=dual_clip_ratio, discount=discount)
    loss = aggregate_token_losses(token_losses, mask, aggregation)
    return loss, sampled_token_opd_metrics(token_stats, mask)


def sampled_token_opd_token_terms(
    student_logprobs: jax.Array,
    teacher_logprobs: jax.Array,
    mask: jax.Array,
    *,
    base_logprobs: jax.Array | None = None,
    reward_scale: float = 1.0,
    behaviour_logprobs: jax.Array | None = None,
    is_threshold: float | None = 5.0,
    old_logprobs: jax.Array | None = None,
    clip_eps: float | None = None,
    dual_clip_ratio: float | None = None,
    discount: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`sampled_token_opd_loss` before aggregation: per-token losses and statistics.

    Same arguments as :func:`sampled_token_opd_loss` but no aggregation. Every value is a
    function of its own token's inputs (with ``discount = 0``; reward-to-go reads the tokens
    after it in the row), so the terms of rows split over micro-batches or packed rows are the
    terms of the whole batch.

    Returns:
      ``(token_losses, token_stats)``: ``[batch, seq]`` float32 per-token losses (0 where the
      mask is False; differentiable in ``student_logprobs``) and a dict of ``[batch, seq]``
      float32 per-token values without gradient that :func:`sampled_token_opd_metrics` reduces:
      ``sampled_reverse_kl`` (``sg(s) - T``), ``advantage``, ``is_weight`` and, with
      ``clip_eps``, ``clipped`` (0/1).
    """
    _check_rank("student_logprobs", student_logprobs, 2, "[batch, seq]")
    _check_same_shape("teacher_logprobs", teacher_logprobs, "student_logprobs", student_logprobs)
    _check_same_shape("mask", mask, "student_logprobs", student_logprobs)
    optional = {
        "base_logprobs": base_logprobs,
        "behaviour_logprobs": behaviour_logprobs,
        "old_logprobs": old_logprobs,
    }
    for name, value in optional.items():
        if value is not None:
            _check_same_shape(name, value, "student_logprobs", student_logprobs)
    if base_logprobs is None and not (
        isinstance(reward_scale, (int, float)) and float(reward_scale) == 1.0
    ):
        raise ValueError(
            f"`reward_scale`={reward_scale!r} needs `base_logprobs` (the G-OPD reward is "
            "reward_scale * (T - B) - (s - B)); without a base model only reward_scale=1.0 is "
            "defined."
        )
    if is_threshold is not None and not is_threshold > 0:
        raise ValueError(f"`is_threshold` must be > 0 or None; got {is_threshold!r}.")
    if clip_eps is not None:
        if old_logprobs is None:
            raise ValueError(
                "`clip_eps` needs `old_logprobs` (the student's log-probs when the rollout was "
                "scored). On-policy the ratio is exactly 1 and clipping is inert: pass "
                "clip_eps=None."
            )
        if not 0 < clip_eps < 1:
            raise ValueError(f"`clip_eps` must be in (0, 1); got {clip_eps!r}.")
    if dual_clip_ratio is not None:
        if clip_eps is None:
            raise ValueError("`dual_clip_ratio` needs `clip_eps`.")
        if not dual_clip_ratio > 1:
            raise ValueError(f"`dual_clip_ratio` must be > 1; got {dual_clip_ratio!r}.")
    if not isinstance(discount, (int, float)) or not 0.0 <= discount <= 1.0:
        raise ValueError(f"`discount` must be a float in [0, 1]; got {discount!r}.")

    valid = mask.astype(bool)

    # Replace whatever sits at masked positions by 0 *before* any arithmetic, so garbage there
    # (NaN, inf, huge) cannot leak into the value or, through 0 * NaN, into the gradient.
    def clean(x: jax.Array) -> jax.Array:
        return jnp.where(valid, x.astype(jnp.float32), 0.0)

    student = clean(student_logprobs)
    teacher = lax.stop_gradient(clean(teacher_logprobs))
    proximal = lax.stop_gradient(student if old_logprobs is None else clean(old_logprobs))

    if base_logprobs is None:
        rewards = teacher - proximal
    else:
        base = lax.stop_gradient(clean(base_logprobs))
        rewards = reward_scale * (teacher - base) - (proximal - base)
    rewards = jnp.where(valid, rewards, 0.0)
    if discount == 0.0:
        advantages = rewards
    else:
        advantages = _discounted_returns(rewards, valid, float(discount))
    advantages = lax.stop_gradient(advantages)

    if behaviour_logprobs is None:
        is_weights = jnp.ones_like(student)
    else:
        behaviour = clean(behaviour_logprobs)
        log_w = jnp.clip(proximal - behaviour, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        is_weights = jnp.exp(log_w)
        if is_threshold is not None:
            is_weights = jnp.minimum(is_weights, is_threshold)
        is_weights = lax.stop_gradient(jnp.where(valid, is_weights, 0.0))

    # rho == 1 in value; its gradient is grad s (the REINFORCE score function).
    ratio = jnp.exp(jnp.clip(student - proximal, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    token_stats: dict[str, jax.Array] = {}
    if clip_eps is None:
        surrogate = unclipped
    else:
        clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        surrogate = jnp.maximum(unclipped, clipped)
        is_clipped = clipped > unclipped
        if dual_clip_ratio is not None:
            dual_bound = -advantages * dual_clip_ratio
            surrogate = jnp.where(
                advantages < 0, jnp.minimum(surrogate, dual_bound), surrogate
            )
            is_clipped = is_clipped | ((advantages < 0) & (surrogate == dual_bound))
        token_stats["clipped"] = is_clipped.astype(jnp.float32)
    token_losses = jnp.where(valid, is_weights * surrogate, 0.0)
    token_stats.update(
        sampled_reverse_kl=lax.stop_gradient(student) - teacher,
        advantage=advantages,
        is_weight=is_weights,
    )
    return token_losses, {k: lax.stop_gradient(jnp.where(valid, v, 0.0)) for k, v in token_stats.items()}


def sampled_token_opd_metrics(token_stats: dict[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
    """The metrics of :func:`sampled_token_opd_loss` from the per-token statistics of
    :func:`sampled_token_opd_token_terms` over ``mask`` (``[batch, seq]`` each): float32 scalars
    ``sampled_reverse_kl``, ``advantage_mean``, ``advantage_std`` (two-pass), ``is_weight_mean``,
    ``is_weight_max``, ``num_tokens`` and, when present, ``clip_fraction``."""
    valid = mask.astype(bool)
    advantages, is_weights = token_stats["advantage"], token_stats["is_weight"]
    adv_mean = _masked_mean(advantages, valid)
    adv_var = _masked_mean(jnp.square(advantages - adv_mean), valid)
    metrics = dict(
        sampled_reverse_kl=_masked_mean(token_stats["sampled_reverse_kl"], valid),
        advantage_mean=adv_mean,
        advantage_std=jnp.sqrt(adv_var),
        is_weight_mean=_masked_mean(is_weights, valid),
        is_weight_max=jnp.max(jnp.where(valid, is_weights, -jnp.inf), initial=0.0),
        num_tokens=jnp.sum(valid.astype(jnp.float32)),
    )
    if "clipped" in token_stats:
        metrics["clip_fraction"] = _masked_mean(token_stats["clipped"], valid)
    return {k: lax.stop_gradient(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Exact and top-k reverse KL from logits
# ---------------------------------------------------------------------------------------------


def token_logprobs(
    logits: jax.Array, tokens: jax.Array, *, temperature: float = 1.0
) -> jax.Array:
    """``log_softmax(logits / temperature)[tokens]`` in float32.

    ``[batch, seq, vocab], [batch, seq] -> [batch, seq]``. The unchunked reference for
    ``chunked_token_logprobs``.
    """
    _check_rank("logits", logits, 3, "[batch, seq, vocab]")
    _check_same_shape("tokens", tokens, "logits[..., 0]", logits[..., 0])
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0; got {temperature!r}.")
    return _token_logprobs_from_logits(logits.astype(jnp.float32) / temperature, tokens)


def _token_logprobs_from_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    # Gather the token's logit and subtract the log-partition: never builds log_softmax.
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _exact_reverse_kl(student_logp: jax.Array, teacher_logp: jax.Array) -> jax.Array:
    """``sum_v p_s(v) (log p_s(v) - log p_t(v))`` over the last axis; inputs are log-probs."""
    return jnp.sum(jnp.exp(student_logp) * (student_logp - teacher_logp), axis=-1)


def _topk_reverse_kl_parts(
    student_logp: jax.Array, teacher_logp: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Top-k + tail reverse KL, plus what its gradient needs.

    ``[..., vocab] log-probs -> (kl [...], top_ids [..., k] int32, tail_log_ratio [...] or None)``
    where ``tail_log_ratio = log P_tail - log Q_tail`` (``None`` when ``k == vocab``: no tail).

    The tail's log-mass is a logsumexp over the complement of the top-k set, not
    ``log(1 - sum exp(top-k))``: the latter cancels catastrophically in float32 once the top-k mass
    is within ~1e-7 of 1 (giving log(0) and NaN), the former is accurate to float32 precision
    however small the tail is. Requires finite log-probs (finite logits).
    """
    vocab = student_logp.shape[-1]
    # The bucket choice is a discrete selection: no gradient flows through it.
    _, top_ids = lax.top_k(lax.stop_gradient(student_logp), k)
    student_top = jnp.take_along_axis(student_logp, top_ids, axis=-1)
    teacher_top = jnp.take_along_axis(teacher_logp, top_ids, axis=-1)
    kl = jnp.sum(jnp.exp(student_top) * (student_top - teacher_top), axis=-1)
    if k == vocab:  # static: the tail bucket is empty
        return kl, top_ids, None
    in_tail = jnp.logical_not(_membership(top_ids, vocab))
    # k < vocab, so every row has at least one tail entry and both logsumexps are finite.
    student_tail = jax.nn.logsumexp(student_logp, axis=-1, where=in_tail)
    teacher_tail = jax.nn.logsumexp(teacher_logp, axis=-1, where=in_tail)
    tail_log_ratio = student_tail - teacher_tail
    return kl + jnp.exp(student_tail) * tail_log_ratio, top_ids, tail_log_ratio


def _membership(ids: jax.Array, vocab: int) -> jax.Array:
    """``[..., k]`` ids -> ``[..., vocab]`` bool, True at the given ids."""
    return jnp.put_along_axis(
        jnp.zeros(ids.shape[:-1] + (vocab,), bool), ids, True, axis=-1, inplace=False
    )


def _topk_reverse_kl(student_logp: jax.Array, teacher_logp: jax.Array, k: int) -> jax.Array:
    """Reverse KL between the coarse-grained distributions {student top-k tokens, tail}."""
    return _topk_reverse_kl_parts(student_logp, teacher_logp, k)[0]


def token_reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Exact per-position reverse KL ``KL(pi_s || pi_t)`` over the full vocabulary.

    ``KL_bt = sum_v p_s(v) (log p_s(v) - log p_t(v))`` with ``log p = log_softmax(logits)`` in
    float32, which is stable for any finite logits (no ``exp`` of a raw logit).

    Args:
      student_logits: ``[batch, seq, vocab]``.
      teacher_logits: ``[batch, seq, vocab]``.

    Returns:
      ``[batch, seq]`` float32, >= 0 up to rounding. Differentiable in both arguments (the
      losses below stop the teacher's gradient).
    """
    _check_rank("student_logits", student_logits, 3, "[batch, seq, vocab]")
    _check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    return _exact_reverse_kl(
        jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1),
        jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1),
    )


def token_topk_reverse_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, k: int
) -> jax.Array:
    """Per-position reverse KL between coarse-grained distributions over ``k + 1`` buckets.

    Buckets: each of the student's ``k`` most likely tokens (per position), and one tail bucket
    with all remaining tokens. With ``P``/``Q`` the student/teacher bucket probabilities,
    ``KL(P || Q) = sum_{v in top-k} p_s(v) log(p_s(v)/p_t(v)) + P_tail log(P_tail / Q_tail)``.
    It is a proper KL (>= 0), equals the exact KL for ``k = vocab``, and never exceeds it
    (data-processing inequality: bucketing is a deterministic map of the token).

    Args:
      student_logits: ``[batch, seq, vocab]``, finite.
      teacher_logits: ``[batch, seq, vocab]``, finite.
      k: number of explicit tokens, ``1 <= k <= vocab`` (static).

    Returns:
      ``[batch, seq]`` float32.
    """
    _check_rank("student_logits", student_logits, 3, "[batch, seq, vocab]")
    _check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
    _check_topk(k, student_logits.shape[-1])
    return _topk_reverse_kl(
        jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1),
        jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1),
        k,
    )


def _kl_loss(
    per_token_kl: jax.Array, mask: jax.Array, aggregation: Aggregation
) -> tuple[jax.Array, dict[str, jax.Array]]:
    valid = mask.astype(bool)
    loss = aggregate_token_losses(per_token_kl, valid, aggregation)
    metrics = {
        "reverse_kl": lax.stop_gradient(_masked_mean(per_token_kl, valid)),
        "num_tokens": jnp.sum(valid.astype(jnp.float32)),
    }
    return loss, metrics


def full_vocab_reverse_kl_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    aggregation: Aggregation = "seq-mean-token-mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Exact reverse-KL distillation loss: ``aggregate(token_reverse_kl(s, sg(t)), mask)``.

    Its gradient w.r.t. the student logits at a position is ``p_s * (log p_s - log p_t - KL)``
    (the analytic expectation of the sampled-token estimator's gradient at that position).

    Args:
      student_logits: ``[batch, seq, vocab]``.
      teacher_logits: ``[batch, seq, vocab]``; no gradient.
      mask: ``[batch, seq]``; True for response tokens.
      aggregation: one of ``AGGREGATIONS``.

    Returns:
      ``(loss, {"reverse_kl": mean per-token KL over valid tokens, "num_tokens": ...})``.
    """
    _check_same_shape("mask", mask, "student_logits[..., 0]", student_logits[..., 0])
    per_token = token_reverse_kl(student_logits, lax.stop_gradient(teacher_logits))
    return _kl_loss(per_token, mask, aggregation)


def topk_reverse_kl_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    k: int,
    *,
    aggregation: Aggregation = "seq-mean-token-mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Top-k + tail reverse-KL loss: ``aggregate(token_topk_reverse_kl(s, sg(t), k), mask)``.

    Args:
      student_logits: ``[batch, seq, vocab]``.
      teacher_logits: ``[batch, seq, vocab]``; no gradient.
      mask: ``[batch, seq]``; True for response tokens.
      k: number of the student's top tokens kept explicitly (static).
      aggregation: one of ``AGGREGATIONS``.

    Returns:
      ``(loss, {"reverse_kl": mean per-token coarse KL over valid tokens, "num_tokens": ...})``.
    """
    _check_same_shape("mask", mask, "student_logits[..., 0]", student_logits[..., 0])
    per_token = token_topk_reverse_kl(student_logits, lax.stop_gradient(teacher_logits), k)
    return _kl_loss(per_token, mask, aggregation)


# ---------------------------------------------------------------------------------------------
# Memory-bounded (sequence-chunked) path from hidden states + lm_head
# ---------------------------------------------------------------------------------------------
#
# Both chunked functions are `jax.custom_vjp`s with the same structure:
#   forward:  lax.map over sequence chunks; each chunk builds its [batch, chunk, vocab] float32
#             logits, reduces them to per-token values, and keeps only per-token statistics
#             ([batch, seq] log-partition, KL, ...) as residuals;
#   backward: lax.scan over the same chunks; each chunk recomputes its logits, forms the
#             logits cotangent G [batch, chunk, vocab] in closed form, returns G @ W^T for the
#             hidden states and adds hidden^T @ G into the lm_head gradient one vocab block at a
#             time with an in-place dynamic_update_slice.
# Plain autodiff of a checkpointed scan would also keep the logits out of memory, but XLA then
# materialises each chunk's full [hidden, vocab] product hidden^T @ G before adding it to the
# carry, i.e. a second lm_head-sized buffer (0.6 GB for Qwen3-0.6B in float32); the blocked
# accumulation bounds that temporary to [hidden, vocab_block_size].


def _to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[batch, seq, ...] -> [num_chunks, batch, chunk_size, ...]``, zero-padding ``seq``.

    The batch axis stays intact inside every chunk, so a batch-sharded input stays sharded the
    same way chunk by chunk.
    """
    batch, seq = x.shape[:2]
    num_chunks = -(-seq // chunk_size)
    pad = num_chunks * chunk_size - seq
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((batch, num_chunks, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _balanced_chunk_size(seq: int, chunk_size: int) -> int:
    """The smallest chunk length that covers ``seq`` in as many chunks as ``chunk_size`` needs.

    Padding ``seq`` up to a multiple of ``chunk_size`` would waste up to ``chunk_size - 1``
    positions of lm_head work (a 512 chunk on a 32-token response does 16x the work); spreading
    ``seq`` evenly over the same number of chunks keeps the padding below the number of chunks.
    """
    num_chunks = max(1, -(-seq // chunk_size))
    return max(1, -(-seq // num_chunks))


def _from_chunks(x: jax.Array, seq: int) -> jax.Array:
    """``[num_chunks, batch, chunk_size, ...] -> [batch, seq, ...]`` (drops the padding)."""
    num_chunks, batch, chunk_size = x.shape[:3]
    x = jnp.moveaxis(x, 0, 1).reshape((batch, num_chunks * chunk_size) + x.shape[3:])
    return x[:, :seq]


def _logits(hidden: jax.Array, lm_head_weight: jax.Array) -> jax.Array:
    """``[batch, chunk, hidden] @ [hidden, vocab] -> [batch, chunk, vocab]`` in float32."""
    return jnp.einsum(
        "bch,hv->bcv", hidden, lm_head_weight, preferred_element_type=jnp.float32
    ).astype(jnp.float32)


def _hidden_grad(logits_grad: jax.Array, lm_head_weight: jax.Array) -> jax.Array:
    """``G [batch, chunk, vocab] @ W^T -> [batch, chunk, hidden]`` in float32."""
    return jnp.einsum(
        "bcv,hv->bch", logits_grad, lm_head_weight, preferred_element_type=jnp.float32
    )


def _accumulate_lm_head_grad(
    lm_head_grad: jax.Array, hidden: jax.Array, logits_grad: jax.Array, vocab_block_size: int
) -> jax.Array:
    """``lm_head_grad + hidden^T @ logits_grad``, one ``[hidden, block]`` slab at a time.

    ``[hidden, vocab] + [batch, chunk, hidden]^T [batch, chunk, vocab]``. When ``vocab`` is not a
    multiple of the block, the last block is shifted left to end at ``vocab`` and only its
    columns not covered by the previous block are added.
    """
    vocab = lm_head_grad.shape[1]
    block = min(vocab_block_size, vocab)
    num_blocks = -(-vocab // block)
    hidden = hidden.astype(jnp.float32)

    def add_block(i, acc):
        nominal_start = i * block
        start = jnp.minimum(nominal_start, vocab - block)
        grad_block = lax.dynamic_slice_in_dim(logits_grad, start, block, axis=-1)
        contribution = jnp.einsum(
            "bch,bcv->hv", hidden, grad_block, preferred_element_type=jnp.float32
        )
        is_new_column = (start + jnp.arange(block)) >= nominal_start
        current = lax.dynamic_slice_in_dim(acc, start, block, axis=1)
        updated = current + jnp.where(is_new_column, contribution, 0.0)
        return lax.dynamic_update_slice_in_dim(acc, updated, start, axis=1)

    return lax.fori_loop(0, num_blocks, add_block, lm_head_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_logprobs(hidden, lm_head_weight, tokens, chunk_size, vocab_block_size, temperature):
    return _chunked_logprobs_fwd(
        hidden, lm_head_weight, tokens, chunk_size, vocab_block_size, temperature
    )[0]


def _chunked_logprobs_fwd(
    hidden, lm_head_weight, tokens, chunk_size, vocab_block_size, temperature
):
    del vocab_block_size  # backward only

    def chunk_logprobs(hidden_and_tokens):
        hidden_chunk, token_chunk = hidden_and_tokens
        logits = _logits(hidden_chunk, lm_head_weight) / temperature
        log_partition = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, token_chunk[..., None], axis=-1)[..., 0]
        return picked - log_partition, log_partition

    logprobs, log_partition = lax.map(
        chunk_logprobs,
        (_to_chunks(hidden, chunk_size), _to_chunks(tokens.astype(jnp.int32), chunk_size)),
    )
    residuals = (hidden, lm_head_weight, tokens, log_partition)
    return _from_chunks(logprobs, hidden.shape[1]), residuals


def _chunked_logprobs_bwd(chunk_size, vocab_block_size, temperature, residuals, cotangent):
    hidden, lm_head_weight, tokens, log_partition = residuals

    def chunk_grads(lm_head_grad, inputs):
        hidden_chunk, token_chunk, log_partition_chunk, cotangent_chunk = inputs
        logits = _logits(hidden_chunk, lm_head_weight) / temperature
        probs = jnp.exp(logits - log_partition_chunk[..., None])
        is_token = token_chunk[..., None] == lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        # d logp(token) / d raw_logits = (onehot(token) - softmax) / temperature.
        logits_grad = cotangent_chunk[..., None] * (is_token - probs) / temperature
        lm_head_grad = _accumulate_lm_head_grad(
            lm_head_grad, hidden_chunk, logits_grad, vocab_block_size
        )
        return lm_head_grad, _hidden_grad(logits_grad, lm_head_weight)

    lm_head_grad, hidden_grads = lax.scan(
        chunk_grads,
        jnp.zeros(lm_head_weight.shape, jnp.float32),
        (
            _to_chunks(hidden, chunk_size),
            _to_chunks(tokens.astype(jnp.int32), chunk_size),
            log_partition,
            _to_chunks(cotangent.astype(jnp.float32), chunk_size),
        ),
    )
    hidden_grad = _from_chunks(hidden_grads, hidden.shape[1]).astype(hidden.dtype)
    return hidden_grad, lm_head_grad.astype(lm_head_weight.dtype), None


_chunked_logprobs.defvjp(_chunked_logprobs_fwd, _chunked_logprobs_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_kl(
    student_hidden, student_head, teacher_hidden, teacher_head, chunk_size, vocab_block_size, topk
):
    return _chunked_kl_fwd(
        student_hidden, student_head, teacher_hidden, teacher_head, chunk_size,
        vocab_block_size, topk,
    )[0]


def _chunked_kl_fwd(
    student_hidden, student_head, teacher_hidden, teacher_head, chunk_size, vocab_block_size, topk
):
    del vocab_block_size  # backward only
    vocab = student_head.shape[1]
    has_tail = topk is not None and topk < vocab

    def chunk_kl(hiddens):
        student_chunk, teacher_chunk = hiddens
        student_logits = _logits(student_chunk, student_head)
        teacher_logits = _logits(teacher_chunk, teacher_head)
        student_log_partition = jax.nn.logsumexp(student_logits, axis=-1)
        teacher_log_partition = jax.nn.logsumexp(teacher_logits, axis=-1)
        student_logp = student_logits - student_log_partition[..., None]
        teacher_logp = teacher_logits - teacher_log_partition[..., None]
        if topk is None:
            kl = _exact_reverse_kl(student_logp, teacher_logp)
            return kl, (student_log_partition, teacher_log_partition, kl)
        kl, top_ids, tail_log_ratio = _topk_reverse_kl_parts(student_logp, teacher_logp, topk)
        saved = (student_log_partition, teacher_log_partition, kl)
        if has_tail:
            saved += (top_ids, tail_log_ratio)
        return kl, saved

    kl, saved = lax.map(
        chunk_kl, (_to_chunks(student_hidden, chunk_size), _to_chunks(teacher_hidden, chunk_size))
    )
    residuals = (student_hidden, student_head, teacher_hidden, teacher_head, saved)
    return _from_chunks(kl, student_hidden.shape[1]), residuals


def _chunked_kl_bwd(chunk_size, vocab_block_size, topk, residuals, cotangent):
    student_hidden, student_head, teacher_hidden, teacher_head, saved = residuals
    vocab = student_head.shape[1]
    has_tail = topk is not None and topk < vocab

    def chunk_grads(head_grad, inputs):
        student_chunk, teacher_chunk, cotangent_chunk, saved_chunk = inputs
        student_log_partition, teacher_log_partition, kl = saved_chunk[:3]
        student_logp = _logits(student_chunk, student_head) - student_log_partition[..., None]
        teacher_logp = _logits(teacher_chunk, teacher_head) - teacher_log_partition[..., None]
        # For KL(P || Q) between bucketed distributions P_b = sum_{v in b} p_s(v):
        #   d KL / d z_v = p_s(v) * (log P_b(v) - log Q_b(v) - KL).
        # Exact KL: every token is its own bucket. Top-k: tail tokens share the tail's ratio.
        log_ratio = student_logp - teacher_logp
        if has_tail:
            top_ids, tail_log_ratio = saved_chunk[3:]
            log_ratio = jnp.where(
                _membership(top_ids, vocab), log_ratio, tail_log_ratio[..., None]
            )
        logits_grad = (
            cotangent_chunk[..., None] * jnp.exp(student_logp) * (log_ratio - kl[..., None])
        )
        head_grad = _accumulate_lm_head_grad(
            head_grad, student_chunk, logits_grad, vocab_block_size
        )
        return head_grad, _hidden_grad(logits_grad, student_head)

    head_grad, hidden_grads = lax.scan(
        chunk_grads,
        jnp.zeros(student_head.shape, jnp.float32),
        (
            _to_chunks(student_hidden, chunk_size),
            _to_chunks(teacher_hidden, chunk_size),
            _to_chunks(cotangent.astype(jnp.float32), chunk_size),
            saved,
        ),
    )
    hidden_grad = _from_chunks(hidden_grads, student_hidden.shape[1]).astype(student_hidden.dtype)
    # The teacher is frozen: the public wrapper stops its gradient, so None (zero) is exact.
    return hidden_grad, head_grad.astype(student_head.dtype), None, None


_chunked_kl.defvjp(_chunked_kl_fwd, _chunked_kl_bwd)


def chunked_token_logprobs(
    hidden: jax.Array,
    lm_head_weight: jax.Array,
    tokens: jax.Array,
    *,
    chunk_size: int = 32,
    vocab_block_size: int = 8192,
    temperature: float = 1.0,
) -> jax.Array:
    """Log-probs of given tokens from final hidden states, one sequence chunk at a time.

    Equals ``token_logprobs(hidden @ lm_head_weight, tokens, temperature=temperature)`` (values
    and reverse-mode gradients w.r.t. ``hidden`` and ``lm_head_weight``) but float32 logits exist
    for one ``[batch, chunk_size, vocab]`` chunk at a time, forward and backward: the backward
    pass recomputes each chunk's logits from the saved per-token log-partition ``[batch, seq]``
    and forms the logits gradient ``g * (onehot - softmax) / temperature`` in closed form.
    Scratch memory is a few ``batch * chunk_size * vocab * 4`` bytes plus one
    ``[hidden, vocab_block_size]`` slab; the ``[hidden, vocab]`` float32 gradient of
    ``lm_head_weight`` itself is the only lm_head-sized buffer.

    Reverse mode only (``jax.custom_vjp``): ``jax.jvp``/``jax.hessian`` through it are
    unsupported.

    Args:
      hidden: ``[batch, seq, hidden]`` final (normed) hidden states, any float dtype.
      lm_head_weight: ``[hidden, vocab]`` (e.g. ``models.qwen.lm_head_weight(config, params)``).
      tokens: ``[batch, seq]`` int token ids; ``tokens[b, t]`` is scored by ``hidden[b, t]``.
      chunk_size: at most this many sequence positions per chunk (static); ``seq`` is split
        evenly over ``ceil(seq / chunk_size)`` chunks, so it need not be a multiple of it.
      vocab_block_size: columns of the lm_head gradient accumulated per step (static).
      temperature: logits are divided by it (the sampler's temperature).

    Returns:
      ``[batch, seq]`` float32 log-probs.
    """
    _check_rank("hidden", hidden, 3, "[batch, seq, hidden]")
    _check_rank("lm_head_weight", lm_head_weight, 2, "[hidden, vocab]")
    _check_same_shape("tokens", tokens, "hidden[..., 0]", hidden[..., 0])
    if lm_head_weight.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"`lm_head_weight` is {tuple(lm_head_weight.shape)} but `hidden` has hidden size "
            f"{hidden.shape[-1]}; expected [hidden, vocab]."
        )
    _check_chunk_size(chunk_size)
    _check_positive_int("vocab_block_size", vocab_block_size)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"`temperature` must be a positive float; got {temperature!r}.")
    chunk_size = _balanced_chunk_size(hidden.shape[1], chunk_size)
    return _chunked_logprobs(
        hidden, lm_head_weight, tokens, chunk_size, vocab_block_size, float(temperature)
    )


def chunked_reverse_kl(
    student_hidden: jax.Array,
    student_lm_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_lm_head: jax.Array,
    *,
    chunk_size: int = 32,
    vocab_block_size: int = 8192,
    topk: int | None = None,
) -> jax.Array:
    """Per-position reverse KL from each model's own hidden states and lm_head, chunked.

    Equals ``token_reverse_kl(student_hidden @ student_lm_head, teacher_hidden @ teacher_lm_head)``
    (or ``token_topk_reverse_kl(..., topk)``), with the teacher under ``stop_gradient``, but
    both models' float32 logits exist for one ``[batch, chunk_size, vocab]`` chunk at a time,
    forward and backward (see ``chunked_token_logprobs``). The backward pass recomputes the
    chunk logits from saved per-token statistics and uses the closed-form gradient
    ``d KL / d z_v = p_s(v) (log P_b(v) - log Q_b(v) - KL)`` (``b(v)`` = the bucket of token v:
    the token itself, or the tail for top-k). No gradient reaches the teacher inputs.

    Args:
      student_hidden: ``[batch, seq, student_hidden]``.
      student_lm_head: ``[student_hidden, vocab]``.
      teacher_hidden: ``[batch, seq, teacher_hidden]`` (the teacher's width may differ).
      teacher_lm_head: ``[teacher_hidden, vocab]``; same ``vocab`` as the student.
      chunk_size: at most this many sequence positions per chunk (static); see
        ``chunked_token_logprobs``.
      vocab_block_size: columns of the lm_head gradient accumulated per step (static).
      topk: ``None`` for the exact full-vocabulary KL, or ``k`` for the top-k + tail KL (static).

    Returns:
      ``[batch, seq]`` float32; aggregate with ``aggregate_token_losses``.
    """
    _check_rank("student_hidden", student_hidden, 3, "[batch, seq, hidden]")
    _check_rank("teacher_hidden", teacher_hidden, 3, "[batch, seq, hidden]")
    _check_rank("student_lm_head", student_lm_head, 2, "[hidden, vocab]")
    _check_rank("teacher_lm_head", teacher_lm_head, 2, "[hidden, vocab]")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise ValueError(
            f"`teacher_hidden` is {tuple(teacher_hidden.shape)} but `student_hidden` is "
            f"{tuple(student_hidden.shape)}; [batch, seq] must match."
        )
    for name, head, hid in (
        ("student_lm_head", student_lm_head, student_hidden),
        ("teacher_lm_head", teacher_lm_head, teacher_hidden),
    ):
        if head.shape[0] != hid.shape[-1]:
            raise ValueError(
                f"`{name}` is {tuple(head.shape)} but its hidden states have size "
                f"{hid.shape[-1]}; expected [hidden, vocab]."
            )
    if student_lm_head.shape[1] != teacher_lm_head.shape[1]:
        raise ValueError(
            f"`student_lm_head` has vocab {student_lm_head.shape[1]} but `teacher_lm_head` has "
            f"{teacher_lm_head.shape[1]}; the KL needs a shared vocabulary."
        )
    _check_chunk_size(chunk_size)
    _check_positive_int("vocab_block_size", vocab_block_size)
    _check_topk(topk, student_lm_head.shape[1], name="topk")
    chunk_size = _balanced_chunk_size(student_hidden.shape[1], chunk_size)
    return _chunked_kl(
        student_hidden,
        student_lm_head,
        lax.stop_gradient(teacher_hidden),
        lax.stop_gradient(teacher_lm_head),
        chunk_size,
        vocab_block_size,
        topk,
    )


__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "aggregate_token_losses",
    "aggregation_weights",
    "sampled_token_opd_loss",
    "sampled_token_opd_token_terms",
    "sampled_token_opd_metrics",
    "token_logprobs",
    "token_reverse_kl",
    "token_topk_reverse_kl",
    "full_vocab_reverse_kl_loss",
    "topk_reverse_kl_loss",
    "chunked_token_logprobs",
    "chunked_reverse_kl",
]
