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

``config.teachers`` names the teachers; today the trainer uses exactly one. How to add a teacher
(routing, several teachers, the student as its own teacher): docs/architecture.md#how-to-add.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from effopd_jax import models, objectives
from effopd_jax.models import ModelConfig
from effopd_jax.objectives import OPDBatch, TeacherOutput
from effopd_jax.rollout import Rollout

PyTree = Any


def score_token_logprobs(config: ModelConfig, params: PyTree, rollout: Rollout, *,
                         temperature: float, chunk_size: int) -> jax.Array:
    """A frozen model's log-probs of the sampled tokens: ``[rows, max_new_tokens]`` float32."""
    params = jax.lax.stop_gradient(params)
    return objectives.response_logprobs(
        config, params, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
        rollout.response_mask, temperature=temperature, chunk_size=chunk_size)


def score_hidden_states(config: ModelConfig, params: PyTree, rollout: Rollout) -> jax.Array:
    """A frozen model's final hidden states at the response positions:
    ``[rows, max_new_tokens, hidden]`` (compute dtype)."""
    params = jax.lax.stop_gradient(params)
    return objectives.response_hidden_states(
        config, params, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
        rollout.response_mask)


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
    """

    name: str
    config: ModelConfig
    params: PyTree
    output: TeacherOutput
    temperature: float
    chunk_size: int

    def __post_init__(self):
        if self.output not in ("token_logprobs", "hidden_states"):
            raise ValueError(f"Teacher.output must be 'token_logprobs' or 'hidden_states', got {self.output!r}")
        # Compiled once per teacher; params are arguments, so nothing recompiles between steps.
        self._token_logprobs = jax.jit(functools.partial(
            score_token_logprobs, self.config, temperature=self.temperature, chunk_size=self.chunk_size))
        self._hidden_states = jax.jit(functools.partial(score_hidden_states, self.config))
        # The output projection [hidden, vocab], taken once (a transpose when tied).
        self.head = models.lm_head_weight(self.config, self.params) if self.output == "hidden_states" else None

    def score(self, rollout: Rollout, batch: OPDBatch) -> OPDBatch:
        """``batch`` with this teacher's view of ``rollout`` filled in (see the module docstring)."""
        if self.output == "token_logprobs":
            return batch._replace(teacher_logprobs=self._token_logprobs(self.params, rollout))
        return batch._replace(teacher_hidden=self._hidden_states(self.params, rollout), teacher_head=self.head)

    def score_reference(self, rollout: Rollout, batch: OPDBatch) -> OPDBatch:
        """``batch`` with ``base_logprobs`` filled in: this model as G-OPD's reference pi_B."""
        return batch._replace(base_logprobs=self._token_logprobs(self.params, rollout))
