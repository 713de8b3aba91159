"""The exact held-out reverse KL: a progress signal without sampling noise.

    prefixes = sample_prefixes(engine, initial_params, prompts, key, rows_multiple=...)  # once, at start
    kl = heldout_reverse_kl(student_config, student_params, teacher_config, teacher_params, prefixes)

The per-step reverse KL the loss reports is estimated on the tokens the student just sampled: a
fresh, small sample every step, too noisy to show whether the student is moving towards the
teacher. This one is exact and held out:

* **Fixed prefixes.** The initial student answers the first ``eval.kl_prompts`` evaluation
  prompts once (the rollout engine, the run's seed); those prompts and responses are the
  prefixes at every later evaluation, so two evaluations differ only through the student.
* **Exact, full vocabulary.** At every response position t (the positions the sampled tokens
  were drawn at, the one predicting EOS included) both models run forward only, and

      KL = sum_{r,t} m[r,t] sum_v p_s(v | x_<t) (log p_s(v | x_<t) - log p_T(v | x_<t)) / sum_{r,t} m[r,t]

  with ``m`` the response mask, ``p_s`` the student and ``p_T`` the teacher at temperature 1 (the
  models' own distributions), the vocabulary projection chunked (``losses.chunked_reverse_kl``).

:func:`kl_rise_warning` turns its history into the trainer's warning: a KL that has risen over
several evaluations in a row means the student is moving away from the teacher, typically
because the learning rate is too large for AdamW's sign-like early steps (README, "Choosing the
learning rate").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effopd_jax import losses, models, objectives
from effopd_jax.models import ModelConfig
from effopd_jax.rollout import Rollout, RolloutEngine

PyTree = Any


def sample_prefixes(engine: RolloutEngine, params: PyTree, prompts: Sequence[np.ndarray], key: jax.Array, *,
                    rows_multiple: int, process_index: int = 0, process_count: int = 1) -> Rollout:
    """The fixed prefixes: one response of ``params`` (the initial student) to each prompt.

    The rows are padded to a multiple of ``rows_multiple`` with copies of the last prompt whose
    response mask is cleared, so padding never counts. Every process passes the same ``prompts``.

    Returns:
      A :class:`~effopd_jax.rollout.Rollout` of ``[rows, ...]`` arrays (padding rows masked out).
    """
    if not prompts:
        raise ValueError("sample_prefixes: no prompts (set data.eval_files, or eval.kl_prompts=0)")
    rows = -(-len(prompts) // rows_multiple) * rows_multiple
    padded = list(prompts) + [prompts[-1]] * (rows - len(prompts))
    per_process = rows // process_count
    mine = padded[process_index * per_process : (process_index + 1) * per_process]
    rollout = engine.generate(params, mine, key)
    real = jnp.arange(rows) < len(prompts)
    return rollout._replace(response_mask=jnp.logical_and(rollout.response_mask, real[:, None]))


def heldout_reverse_kl(student_config: ModelConfig, student_params: PyTree, teacher_config: ModelConfig,
                       teacher_params: PyTree, prefixes: Rollout, *, chunk_size: int = 64) -> jax.Array:
    """Token-mean exact reverse KL(student || teacher) on ``prefixes`` (module docstring).

    Forward passes only (jit it with the configs static). Returns a float32 scalar.
    """
    hidden = {}
    for name, config, params in (("student", student_config, student_params),
                                 ("teacher", teacher_config, teacher_params)):
        params = jax.lax.stop_gradient(params)
        hidden[name] = (objectives.response_hidden_states(
            config, params, prefixes.prompt_ids, prefixes.prompt_mask, prefixes.response_ids,
            prefixes.response_mask), models.lm_head_weight(config, params))
    per_token = losses.chunked_reverse_kl(*hidden["student"], *hidden["teacher"], chunk_size=chunk_size)
    mask = prefixes.response_mask
    return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def kl_rise_warning(history: Sequence[float], rises: int, learning_rate: float) -> str | None:
    """The warning when the exact held-out KL is moving away from the teacher, else None.

    It fires when, over the last ``rises`` evaluations, the KL either (a) rose at every one, or
    (b) stayed above its first evaluation's value: (b) catches a learning rate that throws the
    student away in one or two evaluations and lets it drift back slowly (the demo's 1e-3 did
    1.185 -> 1.48 -> 1.49 -> 1.44, never three rises in a row).

    ``history``: the exact held-out KL of every evaluation so far, oldest first. A non-finite value
    breaks both conditions (NaN is reported by the loss and skip counters, not here).
    """
    if rises < 1:
        raise ValueError(f"rises must be >= 1, got {rises}")
    if len(history) < rises + 1:
        return None
    first = float(history[0])
    recent = [float(v) for v in history[-(rises + 1):]]
    if not all(math.isfinite(v) for v in [first, *recent]):
        return None
    trail = " -> ".join(f"{v:.4g}" for v in recent)
    if all(later > earlier for earlier, later in zip(recent, recent[1:])):
        what = f"rose over the last {rises} evaluations ({trail})"
    elif all(v > first for v in recent[1:]):
        what = f"has stayed above its first value {first:.4g} for the last {rises} evaluations ({trail})"
    else:
        return None
    return (f"WARNING: the exact held-out reverse KL(student || teacher) {what} at "
            f"optimizer.learning_rate={learning_rate:g}: the student is moving away from the teacher. "
            "A smaller learning rate usually fixes it (README: Choosing the learning rate).")
