"""The teacher seam: frozen models that score the student's rollouts.

    teacher = Teacher(name="math", config=config, params=params, output="token_logprobs",
                      temperature=1.0, chunk_size=512)
    batch = teacher.score(rollout, batch)      # fills batch.teacher_logprobs

A :class:`Teacher` runs one no-gradient forward over prompt + response and puts what the chosen
objective needs into the batch: the log-probability of every sampled token at the sampling
temperature (``output="token_logprobs"``, the authors' loss), or its final hidden states at the
response positions and its output head (``output="hidden_states"``, the full-vocabulary
losses). The same class scores G-OPD's reference model pi_B (``score_reference``), which only
ever provides token log-probs.

Scoring runs one micro-batch of rows at a time when ``micro_batch_size`` is set (``lax.map``
inside the one jitted program, so memory holds one micro-batch's forward), and on packed rows
when the step has a packing plan (``score(rollout, batch, plan)``; see ``effopd_jax.batching``):
a ``while`` loop over the packed micro-batches in use, each output scattered back to the response
token it scores, so the result is laid out ``[rows, max_new_tokens]`` either way.

The scoring functions are pure: ``jax.jit(functools.partial(score_token_logprobs, config, ...))``
lowers with ``jax.ShapeDtypeStruct`` params and rollouts (and a ``batching.abstract_packing_plan``
for the packed form), which is how ahead-of-time plans compile them.

``config.teachers`` names the teachers; today the trainer uses exactly one. How to add a teacher
(routing, several teachers, the student as its own teacher): docs/architecture.md#how-to-add.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from effopd_jax import batching, losses, models, objectives
from effopd_jax.batching import PackingPlan
from effopd_jax.models import ModelConfig
from effopd_jax.objectives import OPDBatch, TeacherOutput
from effopd_jax.rollout import Rollout

PyTree = Any


def score_token_logprobs(config: ModelConfig, params: PyTree, rollout: Rollout, *,
                         temperature: float, chunk_size: int, micro_batch_size: int = 0) -> jax.Array:
    """A frozen model's log-probs of the sampled tokens: ``[rows, max_new_tokens]`` float32,
    ``micro_batch_size`` rows at a time (0: all at once)."""
    params = jax.lax.stop_gradient(params)

    def score(rows: Rollout) -> jax.Array:
        return objectives.response_logprobs(
            config, params, rows.prompt_ids, rows.prompt_mask, rows.response_ids, rows.response_mask,
            temperature=temperature, chunk_size=chunk_size)

    return batching.map_micro_batches(score, rollout, micro_batch_size)


def score_hidden_states(config: ModelConfig, params: PyTree, rollout: Rollout, *,
                        micro_batch_size: int = 0) -> jax.Array:
    """A frozen model's final hidden states at the response positions:
    ``[rows, max_new_tokens, hidden]`` (compute dtype), ``micro_batch_size`` rows at a time."""
    params = jax.lax.stop_gradient(params)

    def score(rows: Rollout) -> jax.Array:
        return objectives.response_hidden_states(
            config, params, rows.prompt_ids, rows.prompt_mask, rows.response_ids, rows.response_mask)

    return batching.map_micro_batches(score, rollout, micro_batch_size)


def score_packed(config: ModelConfig, params: PyTree, rollout: Rollout, plan: PackingPlan, *,
                 output: TeacherOutput, temperature: float = 1.0, chunk_size: int = 512) -> jax.Array:
    """:func:`score_token_logprobs` (``output="token_logprobs"``) or :func:`score_hidden_states`
    (``"hidden_states"``) on the packed rows of ``plan``; the same ``[rows, max_new_tokens(,
    hidden)]`` layout, 0 where ``response_mask`` is False."""
    params = jax.lax.stop_gradient(params)
    rows, new_tokens = rollout.response_ids.shape
    if output == "token_logprobs":
        init = jnp.zeros((rows, new_tokens), jnp.float32)
    else:
        init = jnp.zeros((rows, new_tokens, config.hidden_size), config.dtype)

    def one(index, scores):
        packed = batching.packed_rows(rollout.prompt_ids, rollout.response_ids, plan, index, {})
        hidden = objectives.packed_hidden_states(config, params, packed.input_ids, packed.positions,
                                                 packed.segment_ids)
        if output == "token_logprobs":
            hidden = losses.chunked_token_logprobs(hidden, models.lm_head_weight(config, params),
                                                   packed.target_ids, chunk_size=chunk_size,
                                                   temperature=temperature)
        return batching.scatter_targets(scores, hidden, plan, index)

    return batching.loop_packed(plan, one, init)


@dataclasses.dataclass
class Teacher:
    """A named frozen model and how it scores rollouts.

    Attributes:
      name: the teacher's name in ``config.teachers``.
      config: its model config.
      params: its params (placed on the mesh).
      output: ``"token_logprobs"`` or ``"hidden_states"`` (what the objective needs).
      temperature: logits are divided by it before the log-softmax (the student's sampling
        temperature, so teacher and student score the same distribution family).
      chunk_size: response positions per chunk of the vocabulary projection.
      micro_batch_size: rows per scoring micro-batch (0: all rows at once); with a packing
        plan, packed rows per micro-batch (the plan's).
    """

    name: str
    config: ModelConfig
    params: PyTree
    output: TeacherOutput
    temperature: float
    chunk_size: int
    micro_batch_size: int = 0

    def __post_init__(self):
        if self.output not in ("token_logprobs", "hidden_states"):
            raise ValueError(f"Teacher.output must be 'token_logprobs' or 'hidden_states', got {self.output!r}")
        # Compiled once per teacher; params are arguments, so nothing recompiles between steps.
        self._token_logprobs = jax.jit(functools.partial(
            score_token_logprobs, self.config, temperature=self.temperature, chunk_size=self.chunk_size,
            micro_batch_size=self.micro_batch_size))
        self._hidden_states = jax.jit(functools.partial(
            score_hidden_states, self.config, micro_batch_size=self.micro_batch_size))
        self._packed = {
            output: jax.jit(functools.partial(score_packed, self.config, output=output,
                                              temperature=self.temperature, chunk_size=self.chunk_size))
            for output in ("token_logprobs", "hidden_states")}
        # The output projection [hidden, vocab], taken once (a transpose when tied).
        self.head = models.lm_head_weight(self.config, self.params) if self.output == "hidden_states" else None

    def score(self, rollout: Rollout, batch: OPDBatch, plan: PackingPlan | None = None) -> OPDBatch:
        """``batch`` with this teacher's view of ``rollout`` filled in (see the module docstring);
        on the packed rows of ``plan`` when given."""
        if self.output == "token_logprobs":
            return batch._replace(teacher_logprobs=self._scores("token_logprobs", rollout, plan))
        return batch._replace(teacher_hidden=self._scores("hidden_states", rollout, plan), teacher_head=self.head)

    def score_reference(self, rollout: Rollout, batch: OPDBatch, plan: PackingPlan | None = None) -> OPDBatch:
        """``batch`` with ``base_logprobs`` filled in: this model as G-OPD's reference pi_B."""
        return batch._replace(base_logprobs=self._scores("token_logprobs", rollout, plan))

    def _scores(self, output: TeacherOutput, rollout: Rollout, plan: PackingPlan | None) -> jax.Array:
        if plan is not None:
            return self._packed[output](self.params, rollout, plan)
        if output == "token_logprobs":
            return self._token_logprobs(self.params, rollout)
        return self._hidden_states(self.params, rollout)
