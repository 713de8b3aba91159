"""The teacher seam: frozen models, or the student itself, that score the student's rollouts.

    teacher = Teacher(name="math", config=config, params=params, output="token_logprobs",
                      temperature=1.0, chunk_size=512)
    batch = teacher.score(rollout, batch)      # fills batch.teacher_logprobs

A :class:`Teacher` runs one no-gradient forward over prompt + response and puts what the chosen
objective needs into the batch: the log-probability of every sampled token at the sampling
temperature (``output="token_logprobs"``, the authors' loss), or its final hidden states at the
response positions and its output head (``output="hidden_states"``, the full-vocabulary
losses). The same class scores G-OPD's reference model pi_B (``score_reference``), which only
ever provides token log-probs and always sees the student's prompt ids (as in the authors' code).

A run's teachers (``config.teachers``) form a :class:`TeacherSet`, which is what the trainer
calls (the same ``score(rollout, batch, ...) -> batch``). It decides which teacher scores which
row and what prompt each teacher sees:

* **Routing** (README#several-teachers). ``"data_source"``: a row goes to the teacher whose
  ``data_sources`` hold its routing tag (its ``data_source`` by default), rows with a tag no
  teacher lists go to the configured default teacher or are refused before training (never a
  silent fallback). ``"mixture"``: every teacher scores every row and the teacher log-prob is
  ``log sum_j w_j pi_j(y_t)`` per token (weights normalised), a mixture of the teachers'
  next-token distributions evaluated at the sampled token. A single teacher scores every row.
* **Capacity.** A teacher that scores only some of the step's rows gathers them into
  sub-batches of a static ``rows_per_forward`` rows (padded with copies of one of its rows,
  whose results are dropped), so each teacher compiles one program and forwards at most
  ``rows_per_forward - 1`` padding rows per step; a teacher that scores every row forwards the
  rollout as it is. Routed results are scattered back into one ``[rows, T]`` array, so the
  objective reads ``batch.teacher_logprobs`` whatever the teacher of each row.
* **Its own prompt** (README#teachers-with-their-own-chat-template). A teacher with a
  :class:`TeacherPrompts` renders each row's raw chat messages with its own tokenizer, chat
  template and template variables (and, for self-distillation, a privileged context holding the
  row's reference solution), left-pads them to its own static prompt length and joins them to
  the *same* response ids. Prompts are rendered once per training example
  (:meth:`TeacherSet.prepare`), so every problem (missing solution, prompt too long) is reported
  before anything compiles.
* **The student as teacher** (README#self-distillation-with-privileged-context). ``live=True``:
  the teacher's params are the student's current params, handed over for each step's scoring
  (:meth:`TeacherSet.score`'s ``student_params``) and released afterwards, so it holds no
  parameter memory of its own.

How to add a teacher: docs/architecture.md#how-to-add.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import data, models, objectives
from effopd_jax.config import DEFAULT_CONTEXT_TEMPLATE  # noqa: F401  (re-exported: teachers.DEFAULT_CONTEXT_TEMPLATE)
from effopd_jax import sharding as sharding_lib
from effopd_jax.models import ModelConfig
from effopd_jax.objectives import OPDBatch, TeacherOutput
from effopd_jax.rollout import Rollout

PyTree = Any
Routing = Literal["single", "data_source", "mixture"]
MissingSolution = Literal["skip", "raise"]

_PLACEHOLDER = re.compile(r"\{(problem|solution)\}")


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


# ---------------------------------------------------------------------------------------------
# A teacher's own prompts (host side)
# ---------------------------------------------------------------------------------------------


def fill_context(template: str, *, problem: str, solution: str | None) -> str:
    """``template`` with ``{problem}`` and ``{solution}`` replaced in one pass (so a solution that
    contains the text ``{problem}`` stays as it is); every other brace is literal."""
    values = {"problem": problem, "solution": solution}

    def value(match: re.Match) -> str:
        text = values[match.group(1)]
        if text is None:
            raise ValueError(f"the template has {{{match.group(1)}}} but the row has none")
        return text

    return _PLACEHOLDER.sub(value, template)


def privileged_messages(messages: data.Messages, template: str, solution: str | None) -> data.Messages:
    """The chat turns a privileged-context teacher sees: the last user turn's content becomes
    ``template`` filled with ``{problem}`` = that content and ``{solution}`` = ``solution``;
    every other turn is kept as it is. (The authors' data has a single user turn; they build a
    new single-turn conversation from the first user turn.)"""
    last_user = max(i for i, message in enumerate(messages) if message["role"] == "user")
    out = [dict(message) for message in messages]
    out[last_user]["content"] = fill_context(template, problem=messages[last_user]["content"], solution=solution)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherPrompts:
    """How a teacher renders its own prompt for a row, from the row's raw chat messages.

    Attributes:
      tokenizer: the teacher's tokenizer (the same token ids as the student's; checked by the
        set-up).
      chat_template_kwargs: variables of its chat template (e.g. ``{"enable_thinking": True}``).
      max_length: its static prompt length; a longer prompt is refused.
      pad_token_id: the id written in padding slots (never attended to).
      chat_template: a Jinja template used instead of the tokenizer's own, or None.
      context_template: ``""`` (the prompt as it is) or a privileged context with ``{problem}``
        and optionally ``{solution}`` (see :func:`privileged_messages`).
      missing_solution: a row without a reference solution when the context needs one: ``"skip"``
        (the row gets no teacher and no loss; counted) or ``"raise"`` (refused in :meth:`encode`).
    """

    tokenizer: Any
    chat_template_kwargs: Mapping[str, Any]
    max_length: int
    pad_token_id: int
    chat_template: str | None = None
    context_template: str = ""
    missing_solution: MissingSolution = "skip"

    def __post_init__(self):
        if self.context_template and "{problem}" not in self.context_template:
            raise ValueError(f"context_template must contain {{problem}}, got {self.context_template!r}")
        if self.missing_solution not in ("skip", "raise"):
            raise ValueError(f"missing_solution must be 'skip' or 'raise', got {self.missing_solution!r}")

    @property
    def needs_solution(self) -> bool:
        """Whether a row needs a reference solution (the context has ``{solution}``)."""
        return "{solution}" in self.context_template

    def messages(self, messages: data.Messages, solution: str | None) -> data.Messages:
        """The chat turns this teacher sees for a row."""
        if not self.context_template:
            return messages
        return privileged_messages(messages, self.context_template, solution)

    def render(self, messages: data.Messages, solution: str | None) -> str:
        """The teacher's prompt text for a row (its chat template, generation prompt appended)."""
        return data.render_prompt(self.tokenizer, self.messages(messages, solution),
                                  chat_template_kwargs=self.chat_template_kwargs, chat_template=self.chat_template)

    def encode(self, examples: Sequence[data.PromptExample]) -> list[np.ndarray | None]:
        """Token ids of the teacher's prompt for each example; None for a row skipped for want of a
        reference solution.

        Raises:
          ValueError: a row without a solution (``missing_solution="raise"``), a prompt the chat
            template refuses, or one longer than ``max_length`` (naming the count and the first).
        """
        missing = [e for e in examples if self.needs_solution and e.solution is None]
        if missing and self.missing_solution == "raise":
            raise ValueError(
                f"{len(missing)} of {len(examples)} rows have no reference solution (first: {missing[0].origin}); "
                "the context template needs one (missing_solution='raise'; 'skip' leaves such rows out of the loss)")
        kept = [e for e in examples if not (self.needs_solution and e.solution is None)]
        texts = []
        for example in kept:
            try:
                texts.append(self.render(example.messages, example.solution))
            except ValueError as e:
                raise ValueError(f"{example.origin}: the chat template refused the teacher's prompt: {e}") from None
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        too_long = [(e, len(i)) for e, i in zip(kept, ids) if len(i) > self.max_length]
        if too_long:
            raise ValueError(
                f"{len(too_long)} of {len(kept)} prompts are longer than its max_prompt_length={self.max_length} "
                f"tokens (longest {max(n for _, n in too_long)}, first: {too_long[0][0].origin}); raise the "
                "teacher's max_prompt_length")
        encoded = iter(np.asarray(i, dtype=np.int32) for i in ids)
        return [None if self.needs_solution and e.solution is None else next(encoded) for e in examples]


# ---------------------------------------------------------------------------------------------
# One teacher
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Teacher:
    """A named model and how it scores rollouts.

    Attributes:
      name: the teacher's name in ``config.teachers``.
      config: its model config.
      params: its params (placed on the mesh); None for a live student until
        :meth:`use_params` hands it the student's.
      output: ``"token_logprobs"`` or ``"hidden_states"`` (what the objective needs).
      temperature: logits are divided by it before the log-softmax (the student's sampling
        temperature, so teacher and student score the same distribution family).
      chunk_size: response positions per chunk of the vocabulary projection.
      prompts: how it renders its own prompts; None: it scores the student's prompt ids.
      live: it is the student itself at its current weights (stop-gradient).
      data_sources: the routing tags of its rows (``routing="data_source"``).
      weight: its mixture weight (``routing="mixture"``).
      rows_per_forward: rows of one forward when it scores part of a step (0: the set's default).
    """

    name: str
    config: ModelConfig
    params: PyTree
    output: TeacherOutput
    temperature: float
    chunk_size: int
    prompts: TeacherPrompts | None = None
    live: bool = False
    data_sources: tuple[str, ...] = ()
    weight: float = 1.0
    rows_per_forward: int = 0

    def __post_init__(self):
        if self.output not in ("token_logprobs", "hidden_states"):
            raise ValueError(f"Teacher.output must be 'token_logprobs' or 'hidden_states', got {self.output!r}")
        # Compiled once per teacher; params are arguments, so nothing recompiles between steps.
        self._token_logprobs = jax.jit(functools.partial(
            score_token_logprobs, self.config, temperature=self.temperature, chunk_size=self.chunk_size))
        self._hidden_states = jax.jit(functools.partial(score_hidden_states, self.config))
        self.use_params(self.params)

    def use_params(self, params: PyTree | None) -> None:
        """Scores with ``params`` from now on (a live student's, per step; None releases them).
        The output projection ``[hidden, vocab]`` is taken once per call (a transpose when tied)."""
        self.params = params
        wants_head = self.output == "hidden_states" and params is not None
        self.head = models.lm_head_weight(self.config, params) if wants_head else None

    def score(self, rollout: Rollout, batch: OPDBatch) -> OPDBatch:
        """``batch`` with this teacher's view of ``rollout`` filled in (see the module docstring)."""
        if self.output == "token_logprobs":
            return batch._replace(teacher_logprobs=self._token_logprobs(self.params, rollout))
        return batch._replace(teacher_hidden=self._hidden_states(self.params, rollout), teacher_head=self.head)

    def score_reference(self, rollout: Rollout, batch: OPDBatch) -> OPDBatch:
        """``batch`` with ``base_logprobs`` filled in: this model as G-OPD's reference pi_B."""
        return batch._replace(base_logprobs=self._token_logprobs(self.params, rollout))


# ---------------------------------------------------------------------------------------------
# The run's teachers
# ---------------------------------------------------------------------------------------------


class TeacherStepStats(NamedTuple):
    """What scoring one step measured, per teacher (in :attr:`TeacherSet.names` order).

    Attributes:
      routed_rows: ``[teachers]`` rows each teacher scored (all of them: mixture).
      skipped_rows: ``[teachers]`` rows routed to each teacher but left out for want of a
        reference solution.
      mixture_offsets: ``[teachers]`` float32 (mixture only, else None): the token mean of
        ``T_mix - T_j`` over the step's valid tokens, so that the sampled reverse KL to teacher j
        is the one to the mixture plus this offset.
    """

    routed_rows: np.ndarray
    skipped_rows: np.ndarray
    mixture_offsets: jax.Array | None = None


def default_rows_per_forward(rows: int, teachers: int, batch_shards: int) -> int:
    """The capacity rule: ``rows / (4 * teachers)`` rounded up to a multiple of the batch shards
    (at least one per shard, at most ``rows``). A routed teacher forwards fewer than this many
    padding rows per step."""
    capacity = math.ceil(rows / (4 * teachers))
    capacity = math.ceil(capacity / batch_shards) * batch_shards
    return min(max(capacity, batch_shards), rows)


def _chunks(rows: np.ndarray, size: int, fill: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``rows`` in groups of ``size``: ``(gather, scatter)`` index arrays, the last group padded
    with its first row (gather) and with ``fill`` (scatter: out of range, dropped)."""
    out = []
    for start in range(0, len(rows), size):
        group = rows[start : start + size]
        pad = size - len(group)
        out.append((np.concatenate([group, np.full(pad, group[0])]).astype(np.int32),
                    np.concatenate([group, np.full(pad, fill)]).astype(np.int32)))
    return out


class TeacherSet:
    """The run's teachers, which of them scores which row, and with what prompt.

    Args:
      teachers: the teachers (distinct names, one ``output`` for all).
      mesh: the mesh the rollouts live on.
      routing: ``"single"`` (one teacher), ``"data_source"`` or ``"mixture"``.
      default_teacher: with ``"data_source"``: the teacher of rows whose tag no teacher lists, or
        None (such rows are refused by :meth:`prepare`).
      rows_per_step: the rows of a step (all processes), for the default capacity.
    """

    def __init__(self, teachers: Sequence[Teacher], *, mesh: Mesh, routing: Routing = "single",
                 default_teacher: str | None = None, rows_per_step: int | None = None):
        self.teachers = tuple(teachers)
        self.names = tuple(t.name for t in self.teachers)
        if not self.teachers:
            raise ValueError("TeacherSet needs at least one teacher")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"teacher names must be distinct, got {self.names}")
        if routing not in ("single", "data_source", "mixture"):
            raise ValueError(f"routing must be 'single', 'data_source' or 'mixture', got {routing!r}")
        if routing == "single" and len(self.teachers) != 1:
            raise ValueError(f"routing='single' takes one teacher, got {len(self.teachers)}")
        outputs = {t.output for t in self.teachers}
        if len(self.teachers) > 1 and outputs != {"token_logprobs"}:
            raise ValueError(f"several teachers provide token log-probs only, got outputs {sorted(outputs)}")
        if default_teacher is not None and default_teacher not in self.names:
            raise ValueError(f"default_teacher {default_teacher!r} is not one of {self.names}")
        owner: dict[str, int] = {}
        for index, teacher in enumerate(self.teachers):
            for tag in teacher.data_sources:
                if tag in owner:
                    raise ValueError(f"tag {tag!r} is listed by {self.names[owner[tag]]!r} and {teacher.name!r}")
                owner[tag] = index
        self.mesh = mesh
        self.routing = routing
        self.default_teacher = default_teacher
        self.output = self.teachers[0].output
        self._owner = owner
        self._default_index = None if default_teacher is None else self.names.index(default_teacher)
        weights = np.asarray([t.weight for t in self.teachers], np.float64)
        if routing == "mixture" and not (np.all(np.isfinite(weights)) and np.all(weights > 0)):
            raise ValueError(f"mixture weights must be finite and > 0, got {weights.tolist()}")
        self.log_weights = tuple(float(w) for w in np.log(weights / weights.sum()))
        self.batch_shards = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
        self.rows_per_step = rows_per_step
        self._capacity = {}
        for teacher in self.teachers:
            capacity = teacher.rows_per_forward
            if capacity and capacity % self.batch_shards:
                raise ValueError(f"teacher {teacher.name!r}: rows_per_forward={capacity} is not a multiple of the "
                                 f"mesh's batch shards data*fsdp = {self.batch_shards}")
            if capacity and rows_per_step and capacity > rows_per_step:
                raise ValueError(f"teacher {teacher.name!r}: rows_per_forward={capacity} is more than the "
                                 f"{rows_per_step} rows of a step")
            self._capacity[teacher.name] = capacity
        # Per training example (filled by prepare): the routed teacher, and each teacher's prompt ids.
        self._route: np.ndarray | None = None
        self._prompt_ids: dict[str, list[np.ndarray | None]] = {}
        self._jitted: dict[str, Callable] = {}

    # -- before training --------------------------------------------------------------------

    @property
    def has_live_student(self) -> bool:
        """Whether a teacher is the live student (:meth:`score` then needs ``student_params``)."""
        return any(t.live for t in self.teachers)

    @property
    def needs_rows(self) -> bool:
        """Whether :meth:`score` needs the rows' example ids (routing, own prompts or skipping)."""
        return len(self.teachers) > 1 or any(t.prompts is not None for t in self.teachers)

    def prepare(self, examples: Sequence[data.PromptExample], log: Callable[..., None] = print) -> None:
        """Routes every training example and renders every teacher's own prompts, once.

        Raises:
          ValueError: rows whose tag no teacher lists (without a default teacher), rows without
            a reference solution (``missing_solution="raise"``), a teacher prompt longer than
            its ``max_length``; each message names the teacher and the first row.
        """
        ids = np.asarray([e.example_id for e in examples])
        if not np.array_equal(ids, np.arange(len(examples))):
            raise ValueError("prepare() needs the examples of one load, in order (example_id 0, 1, ...)")
        if self.routing == "data_source":
            route = np.asarray([self._owner.get(e.route_tag, -1) for e in examples], np.int32)
            unknown = [e for e, r in zip(examples, route) if r < 0]
            if unknown and self._default_index is None:
                counts = collections.Counter(e.route_tag for e in unknown).most_common(5)
                raise ValueError(
                    f"{len(unknown)} training rows have a routing tag no teacher lists ({counts}; first: "
                    f"{unknown[0].origin}): add the tags to a teacher's data_sources or set routing.default_teacher")
            route[route < 0] = -1 if self._default_index is None else self._default_index
        else:
            route = np.zeros(len(examples), np.int32)
        self._route = route
        for index, teacher in enumerate(self.teachers):
            mine = [e for e, r in zip(examples, route) if self.routing == "mixture" or r == index]
            if teacher.prompts is None:
                log(f"teacher {teacher.name!r}: {len(mine)} of {len(examples)} training prompts, scored on "
                    "the student's prompt ids")
                continue
            try:
                encoded = teacher.prompts.encode(mine)
            except ValueError as e:
                raise ValueError(f"teacher {teacher.name!r}: {e}") from None
            table: list[np.ndarray | None] = [None] * len(examples)
            for example, prompt in zip(mine, encoded):
                table[example.example_id] = prompt
            self._prompt_ids[teacher.name] = table
            lengths = [len(p) for p in encoded if p is not None]
            skipped = sum(p is None for p in encoded)
            log(f"teacher {teacher.name!r}: {len(mine)} of {len(examples)} training prompts, rendered with its own "
                f"template{' and privileged context' if teacher.prompts.context_template else ''} (longest "
                f"{max(lengths, default=0)} of {teacher.prompts.max_length} tokens)"
                + (f"; {skipped} without a reference solution are skipped" if skipped else ""))

    # -- one step ---------------------------------------------------------------------------

    def _row_plan(self, example_ids: np.ndarray | None, local_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows: ``(route, scored)``: the routed teacher (mixture: 0) and whether the
        row is scored (it has every prompt it needs)."""
        if example_ids is None:
            if self.needs_rows:
                raise ValueError("these teachers route rows or render their own prompts: pass example_ids")
            return np.zeros(local_rows, np.int32), np.ones(local_rows, bool)
        if self._route is None:
            raise ValueError("call TeacherSet.prepare(training examples) before scoring")
        example_ids = np.asarray(example_ids)
        if len(example_ids) != local_rows:
            raise ValueError(f"{len(example_ids)} example ids for {local_rows} rows of this process")
        route = self._route[example_ids]
        scored = np.ones(local_rows, bool)
        for index, teacher in enumerate(self.teachers):
            table = self._prompt_ids.get(teacher.name)
            if table is None:
                continue
            has_prompt = np.asarray([table[e] is not None for e in example_ids])
            mine = np.ones(local_rows, bool) if self.routing == "mixture" else route == index
            scored &= ~mine | has_prompt
        return route, scored

    def _teacher_prompts(self, teacher: Teacher, example_ids: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """The teacher's own left-padded prompts of this process's rows, as global arrays
        ``[rows, max_length]`` (rows it does not score get an all-padding prompt)."""
        table = self._prompt_ids[teacher.name]
        empty = np.zeros(0, np.int32)
        prompts = [table[e] if table[e] is not None else empty for e in example_ids]
        ids, mask = data.left_pad(prompts, teacher.prompts.pad_token_id, teacher.prompts.max_length)
        return sharding_lib.global_batch(self.mesh, ids), sharding_lib.global_batch(self.mesh, mask)

    def _replicated(self, array: np.ndarray) -> jax.Array:
        sharding = NamedSharding(self.mesh, P())
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def _jit(self, name: str, fn: Callable, **kwargs) -> Callable:
        if name not in self._jitted:
            self._jitted[name] = jax.jit(fn, **kwargs)
        return self._jitted[name]

    def _score_rows(self, teacher: Teacher, source: Rollout, rows: np.ndarray, into: OPDBatch) -> OPDBatch:
        """``into`` with ``teacher``'s output for global ``rows`` of ``source`` written in (its other
        rows unchanged); every row at once when ``rows`` is all of them, else in sub-batches."""
        total = source.response_ids.shape[0]
        if len(rows) == total:
            return teacher.score(source, into)
        if len(rows) == 0:
            return into
        capacity = self._capacity[teacher.name] or default_rows_per_forward(
            self.rows_per_step or total, len(self.teachers), self.batch_shards)
        shard = lambda ndim: sharding_lib.batch_sharding(self.mesh, ndim)  # noqa: E731
        take = self._jit("take", lambda tree, idx: jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree),
                         out_shardings=Rollout(*(shard(2),) * 5))
        put = self._jit(f"put/{teacher.output}", lambda acc, values, idx: acc.at[idx].set(values, mode="drop"),
                        donate_argnums=0)
        for gather, scatter in _chunks(rows, capacity, fill=total):
            sub = take(source, self._replicated(gather))
            scored = teacher.score(sub, OPDBatch(*sub))
            if self.output == "token_logprobs":
                values, field = scored.teacher_logprobs, "teacher_logprobs"
            else:
                values, field = scored.teacher_hidden, "teacher_hidden"
                into = into._replace(teacher_head=scored.teacher_head)
            acc = getattr(into, field)
            if acc is None:
                zeros = self._jit(f"zeros/{total}/{values.ndim}/{values.dtype}",
                                  lambda v: jnp.zeros((total,) + v.shape[1:], v.dtype),
                                  out_shardings=shard(values.ndim))
                acc = zeros(values)
            into = into._replace(**{field: put(acc, values, self._replicated(scatter))})
        return into

    def score_with_stats(self, rollout: Rollout, batch: OPDBatch, *, example_ids: np.ndarray | None = None,
                         student_params: PyTree | None = None) -> tuple[OPDBatch, TeacherStepStats]:
        """``batch`` with the teachers' view of every scored row, and what the step measured.

        Args:
          rollout: the step's rollout (global arrays).
          batch: the batch to fill (its ``response_mask`` loses the skipped rows).
          example_ids: this process's rows' :attr:`~effopd_jax.data.PromptExample.example_id`
            (of the examples given to :meth:`prepare`); needed unless one teacher scores the
            student's prompt ids.
          student_params: the student's current params, for a live-student teacher.

        Returns:
          ``(batch, stats)``: ``batch.teacher_logprobs`` ``[rows, T]`` holds each row's routed
          teacher (or the mixture); with several routed teachers ``batch.teacher_rows``
          ``[rows, teachers]`` says which (the objective's per-teacher reverse KL); skipped rows
          have an all-False ``response_mask``.
        """
        local_rows = rollout.response_ids.shape[0] // jax.process_count()
        route, scored = self._row_plan(example_ids, local_rows)
        all_route = sharding_lib.to_host(sharding_lib.global_batch(self.mesh, route))
        all_scored = sharding_lib.to_host(sharding_lib.global_batch(self.mesh, scored))
        n = len(self.teachers)
        mixture_outputs = []
        for index, teacher in enumerate(self.teachers):
            mine = np.ones_like(all_scored) if self.routing == "mixture" else all_route == index
            rows = np.flatnonzero(mine & all_scored)
            source = rollout
            if teacher.prompts is not None:
                prompt_ids, prompt_mask = self._teacher_prompts(teacher, np.asarray(example_ids))
                source = rollout._replace(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
            if teacher.live:
                if student_params is None:
                    raise ValueError(f"teacher {teacher.name!r} is the live student: pass student_params")
                teacher.use_params(student_params)
            try:
                target = batch if self.routing != "mixture" else batch._replace(teacher_logprobs=None)
                target = self._score_rows(teacher, source, rows, target)
            finally:
                if teacher.live:
                    teacher.use_params(None)  # hold no reference to the student's (donated) buffers
            if self.routing == "mixture":
                mixture_outputs.append(target.teacher_logprobs)
            else:
                batch = target
        if not all_scored.all():
            keep = sharding_lib.global_batch(self.mesh, scored)
            drop_rows = self._jit("mask_rows", lambda mask, keep: mask & keep[:, None])
            batch = batch._replace(response_mask=drop_rows(batch.response_mask, keep))
        offsets = None
        if self.routing == "mixture":
            mix = self._jit("mixture", functools.partial(_mixture, log_weights=self.log_weights))
            teacher_logprobs, offsets = mix(tuple(mixture_outputs), batch.response_mask)
            batch = batch._replace(teacher_logprobs=teacher_logprobs)
        elif n > 1:
            one_hot = (route[:, None] == np.arange(n)[None, :]) & scored[:, None]
            batch = batch._replace(teacher_rows=sharding_lib.global_batch(self.mesh, one_hot))
        routed = np.asarray([np.sum(all_scored & ((all_route == i) | (self.routing == "mixture")))
                             for i in range(n)], np.int64)
        skipped = np.asarray([np.sum(~all_scored & ((all_route == i) | (self.routing == "mixture")))
                              for i in range(n)], np.int64)
        return batch, TeacherStepStats(routed, skipped, offsets)

    def score(self, rollout: Rollout, batch: OPDBatch, *, example_ids: np.ndarray | None = None,
              student_params: PyTree | None = None) -> OPDBatch:
        """The teacher seam: :meth:`score_with_stats` without the stats."""
        return self.score_with_stats(rollout, batch, example_ids=example_ids, student_params=student_params)[0]

    def step_metrics(self, stats: TeacherStepStats, update_metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Per-teacher figures of a step: ``reverse_kl/<name>`` (the sampled reverse KL of the
        student to that teacher over the tokens of its rows; NaN when it had none) and
        ``routed_rows/<name>``, plus ``skipped_rows/<name>`` for teachers that need a reference
        solution. ``update_metrics``: the update's (host values)."""
        out: dict[str, Any] = {}
        for index, teacher in enumerate(self.teachers):
            if len(self.teachers) == 1:
                kl = update_metrics.get("reverse_kl", update_metrics.get("sampled_reverse_kl"))
            elif self.routing == "mixture":
                kl = float(update_metrics["sampled_reverse_kl"]) + float(stats.mixture_offsets[index])
            else:
                tokens = float(update_metrics[objectives.TEACHER_NUM_TOKENS][index])
                kl_sum = float(update_metrics[objectives.TEACHER_REVERSE_KL_SUM][index])
                kl = kl_sum / tokens if tokens else float("nan")
            out[f"reverse_kl/{teacher.name}"] = float(kl)
            out[f"routed_rows/{teacher.name}"] = int(stats.routed_rows[index])
            if teacher.prompts is not None and teacher.prompts.needs_solution:
                out[f"skipped_rows/{teacher.name}"] = int(stats.skipped_rows[index])
        return out


def _mixture(outputs: tuple[jax.Array, ...], mask: jax.Array, *, log_weights: tuple[float, ...]):
    """``log sum_j w_j exp(T_j)`` per token ``[rows, T]``, and per teacher the token mean of
    ``T_mix - T_j`` over ``mask`` ``[teachers]``."""
    stacked = jnp.stack(outputs)  # [teachers, rows, T]
    mixed = jax.nn.logsumexp(stacked + jnp.asarray(log_weights, stacked.dtype)[:, None, None], axis=0)
    tokens = jnp.maximum(mask.sum(), 1)
    offsets = jnp.sum(jnp.where(mask[None], mixed[None] - stacked, 0.0), axis=(1, 2)) / tokens
    return mixed, offsets
