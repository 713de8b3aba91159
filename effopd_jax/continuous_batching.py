"""The ``continuous`` rollout engine: a fixed set of decode slots over a paged KV cache.

    engine = make_rollout_engine("continuous", model_config=config, settings=settings, mesh=mesh,
                                 prompt_length=256, options={"slots": 64})
    rollout = engine.generate(params, prompts, key)    # the same Rollout as the static engine's

The static engine decodes every row of a step at once in a dense cache of
``[rows, prompt_length + max_new_tokens]`` positions, and every decode step costs the whole
batch until the longest response ends. Here ``slots`` sequences decode together; when a row
stops (EOS or ``max_new_tokens``) its slot is refilled with the next prompt of the step, and the
step ends when every prompt has its response. KV memory is the page pool (``slots`` rows of
the longest length by default), whatever the number of rows.

How one step runs (the host schedules, the device computes; programs compiled once per shape):

1. **prefill** (``_admit``): the next ``prefill_rows`` waiting prompts of each batch shard go
   through the model in one call that writes their keys/values into freshly allocated pages
   (``models.forward_paged`` with a ``paged.PagedPrefill`` index) and samples their first
   token; their slots start decoding.
2. **decode** (``_decode``): a ``lax.while_loop`` of decode steps over all slots (one token per
   slot, written at the slot's own position, attention over its pages), for at most
   ``decode_steps`` steps, returning early as soon as enough slots are free for the next
   prefill (``prefill_rows`` per shard, or fewer when fewer prompts wait).
3. The host reads which slots stopped (one small transfer), frees their pages and slots, hands
   pages to the rows that will grow in the next call, and goes back to 1.

So the host<->device round trips are one per refill (not one per token), and the device is
only idle while the host does this bookkeeping: :attr:`ContinuousEngine.last_stats` reports the
calls, decode steps, slot occupancy, and the time the host spent waiting for the device vs
scheduling. ``benchmarks/rollout_long_tail.py`` measures it.

**Pages.** Each batch shard has its own pool of ``kv_pages / shards`` pages of ``page_size``
positions (plus the null page, ``models.paged``). A row gets pages as it grows (before each
decode call, enough for the call's steps) and gives them back when it stops. With a pool smaller
than ``slots`` longest rows (``kv_pages``), a call that cannot give every running row the pages
it needs runs fewer steps; if not even one step fits, the most recently admitted row of that
shard is preempted: its pages are freed and it starts again later from its prompt. Its tokens
come out the same, since a row's random draws depend only on (the step's key, the row, the
position) (``sampling.token_keys``).

**Mesh.** Rows, slots and pages are split over the mesh's batch shards (``data`` x ``fsdp``):
shard ``s`` decodes the rows the static engine's rollout holds there, in its own slots and
pages, so every gather and scatter stays on its device (``vmap`` over the shard axis). KV heads
are split over ``tensor``. Each process runs the same schedule from the same device outputs.

Every row samples exactly the tokens the static engine samples for it (same keys; the paged
attention equals the dense one up to float rounding): ``tests/unit/test_rollout_continuous.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax import data, models
from effopd_jax import sharding as sharding_lib
from effopd_jax.models import ModelConfig
from effopd_jax.models.paged import NULL_PAGE, PagedDecode, PagedPrefill
from effopd_jax.rollout import EngineProgram, Rollout
from effopd_jax.sampling import SamplingSettings, batch_shards, sample_next_token, token_keys

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ContinuousSettings:
    """The continuous engine's own settings (``config.rollout.*`` with engine == continuous).

    Attributes:
      slots: sequences decoded at once, over all batch shards (a multiple of their count).
      page_size: positions per KV page.
      kv_pages: pages in the pool, over all shards (each shard also has one null page);
        0: enough for every slot to reach ``prompt_length + max_new_tokens`` (never preempts).
      decode_steps: at most this many decode steps per host call.
      prefill_rows: prompts prefilled together per shard (a decode call returns once this many
        slots of a shard are free, or fewer when fewer prompts wait).
      attention_block_pages: pages per block of the paged attention's online softmax.
    """

    slots: int = 64
    page_size: int = 16
    kv_pages: int = 0
    decode_steps: int = 32
    prefill_rows: int = 1
    attention_block_pages: int = 8

    def __post_init__(self):
        for name in ("slots", "page_size", "decode_steps", "prefill_rows", "attention_block_pages"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"rollout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.kv_pages, (int, np.integer)) or self.kv_pages < 0:
            raise ValueError(f"rollout.kv_pages must be an int >= 0 (0: enough for every slot), got {self.kv_pages!r}")


@dataclasses.dataclass(frozen=True)
class _Shape:
    """The static shapes of one engine and row count (hashable: keys the compiled programs)."""

    shards: int
    slots_per_shard: int
    rows_per_shard: int
    prompt_length: int
    max_new_tokens: int
    page_size: int
    pages_per_row: int  # table entries per slot: the longest row's pages
    pages_per_shard: int  # including the null page
    prefill_rows: int
    block_pages: int


class SlotState(NamedTuple):
    """The device state of one step's decoding (per-slot arrays are ``[shards, slots_per_shard]``).

    Attributes:
      cache: the model family's paged cache.
      row: the slot's row, as an index into its shard's rows; -1 when it never held one.
      step: response tokens the slot's row has sampled.
      prompt_length: real tokens of the slot's prompt (its first response position).
      last_token: the token the next decode step feeds.
      active: the slot's row is still decoding.
      tokens, logprobs: ``[shards, rows_per_shard, max_new_tokens]`` the responses by row.
      lengths: ``[shards, rows_per_shard]`` tokens sampled per row.
      decode_steps, slot_steps: int32 counters: decode steps run, and active slots summed over them.
    """

    cache: PyTree
    row: jax.Array
    step: jax.Array
    prompt_length: jax.Array
    last_token: jax.Array
    active: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    decode_steps: jax.Array
    slot_steps: jax.Array


# ----------------------------------------------------------------------------------------------
# Device programs
# ----------------------------------------------------------------------------------------------


def _is_eos(tokens: jax.Array, settings: SamplingSettings) -> jax.Array:
    hit = jnp.zeros(tokens.shape, bool)
    for eos in settings.eos_token_ids:
        hit = hit | (tokens == eos)
    return hit


def _scatter_rows(x: jax.Array, rows: jax.Array, values: jax.Array, column: jax.Array | None = None) -> jax.Array:
    """Per shard: ``x[s, rows[s, i](, column[s, i])] = values[s, i]``; rows out of range are dropped."""
    if column is None:
        return jax.vmap(lambda x_s, r_s, v_s: x_s.at[r_s].set(v_s, mode="drop"))(x, rows, values)
    return jax.vmap(lambda x_s, r_s, c_s, v_s: x_s.at[r_s, c_s].set(v_s, mode="drop"))(x, rows, column, values)


def _init_state(*, config: ModelConfig, shape: _Shape, settings: SamplingSettings, dtype: Any) -> SlotState:
    n, ss, rs = shape.shards, shape.slots_per_shard, shape.rows_per_shard
    cache = models.init_paged_cache(config, shards=n, pages_per_shard=shape.pages_per_shard,
                                    page_size=shape.page_size, dtype=dtype)
    per_slot = lambda value, dtype: jnp.full((n, ss), value, dtype)  # noqa: E731
    return SlotState(
        cache=cache, row=per_slot(-1, jnp.int32), step=per_slot(0, jnp.int32),
        prompt_length=per_slot(0, jnp.int32), last_token=per_slot(settings.pad_token_id, jnp.int32),
        active=per_slot(False, bool),
        tokens=jnp.full((n, rs, shape.max_new_tokens), settings.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((n, rs, shape.max_new_tokens), jnp.float32),
        lengths=jnp.zeros((n, rs), jnp.int32),
        decode_steps=jnp.zeros((), jnp.int32), slot_steps=jnp.zeros((), jnp.int32))


def _admit(params: PyTree, state: SlotState, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array,
           rows: jax.Array, slots: jax.Array, page_table: jax.Array, *, config: ModelConfig,
           settings: SamplingSettings, shape: _Shape) -> SlotState:
    """Prefills ``rows [shards, prefill_rows]`` (indices into the shard's rows; -1: none) into
    ``slots`` (same shape) and samples their first token.

    ``prompt_ids``/``prompt_mask`` are the step's ``[rows, prompt_length]`` left-padded prompts;
    ``page_table`` ``[shards, slots_per_shard, pages_per_row]`` holds the slots' pages.
    """
    n, a = rows.shape
    rs, length = shape.rows_per_shard, shape.prompt_length
    take = jax.vmap(lambda x_s, r_s: x_s[jnp.maximum(r_s, 0)])
    ids = take(prompt_ids.reshape(n, rs, length), rows).reshape(n * a, length)
    valid = (take(prompt_mask.reshape(n, rs, length), rows) & (rows >= 0)[..., None]).reshape(n * a, length)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
    tables = take(page_table, slots)
    tables = jnp.where((slots >= 0)[..., None], tables, NULL_PAGE).reshape(n * a, -1)
    hidden, cache = models.forward_paged(config, params, ids, index=PagedPrefill(tables, positions, valid),
                                         cache=state.cache, return_hidden_states=True)
    last = length - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # the last real prompt token
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    logits = jnp.einsum("bh,hv->bv", last_hidden, models.lm_head_weight(config, params).astype(config.dtype),
                        preferred_element_type=jnp.float32)
    global_rows = (jnp.arange(n, dtype=jnp.int32)[:, None] * rs + rows).reshape(-1)
    token, logprob = sample_next_token(logits, token_keys(key, global_rows, 0), temperature=settings.temperature,
                                       top_k=settings.top_k, top_p=settings.top_p)
    token, logprob = token.reshape(n, a), logprob.reshape(n, a)
    admitted = rows >= 0
    running = admitted & ~_is_eos(token, settings) & (settings.max_new_tokens > 1)
    slot_index = jnp.where(admitted, slots, shape.slots_per_shard)  # out of range: dropped
    row_index = jnp.where(admitted, rows, rs)
    zeros = jnp.zeros_like(rows)
    return state._replace(
        cache=cache,
        row=_scatter_rows(state.row, slot_index, rows),
        step=_scatter_rows(state.step, slot_index, zeros + 1),
        prompt_length=_scatter_rows(state.prompt_length, slot_index, valid.sum(axis=1, dtype=jnp.int32).reshape(n, a)),
        last_token=_scatter_rows(state.last_token, slot_index, token),
        active=_scatter_rows(state.active, slot_index, running),
        tokens=_scatter_rows(state.tokens, row_index, token, zeros),
        logprobs=_scatter_rows(state.logprobs, row_index, logprob, zeros),
        lengths=_scatter_rows(state.lengths, row_index, zeros + 1),
    )


def _decode(params: PyTree, state: SlotState, key: jax.Array, page_table: jax.Array, max_steps: jax.Array,
            exit_free: jax.Array, *, config: ModelConfig, settings: SamplingSettings, shape: _Shape) -> SlotState:
    """Up to ``max_steps`` decode steps of every active slot; stops early once some shard ``s``
    has ``exit_free[s]`` free slots."""
    n, ss = state.active.shape
    rs = shape.rows_per_shard
    table = page_table.reshape(n * ss, -1)
    global_rows = (jnp.arange(n, dtype=jnp.int32)[:, None] * rs + jnp.maximum(state.row, 0)).reshape(-1)
    sample = functools.partial(sample_next_token, temperature=settings.temperature, top_k=settings.top_k,
                               top_p=settings.top_p)

    def keep_going(carry):
        i, st = carry
        free = jnp.sum(~st.active, axis=1)
        return (i < max_steps) & jnp.any(st.active) & ~jnp.any(free >= exit_free)

    def step(carry):
        i, st = carry
        active = st.active.reshape(-1)
        index = PagedDecode(table, (st.prompt_length + st.step - 1).reshape(-1, 1), active[:, None],
                            block_pages=shape.block_pages)
        logits, cache = models.forward_paged(config, params, st.last_token.reshape(-1, 1), index=index,
                                             cache=st.cache)
        token, logprob = sample(logits[:, 0], token_keys(key, global_rows, st.step.reshape(-1)))
        token, logprob = token.reshape(n, ss), logprob.reshape(n, ss)
        row_index = jnp.where(st.active, st.row, rs)  # stopped slots write nothing
        new_step = st.step + st.active
        st = st._replace(
            cache=cache,
            tokens=_scatter_rows(st.tokens, row_index, token, st.step),
            logprobs=_scatter_rows(st.logprobs, row_index, logprob, st.step),
            lengths=_scatter_rows(st.lengths, row_index, new_step),
            last_token=jnp.where(st.active, token, st.last_token),
            step=new_step,
            active=st.active & ~_is_eos(token, settings) & (new_step < settings.max_new_tokens),
            decode_steps=st.decode_steps + 1,
            slot_steps=st.slot_steps + jnp.sum(st.active, dtype=jnp.int32),
        )
        return i + 1, st

    _, state = jax.lax.while_loop(keep_going, step, (jnp.zeros((), jnp.int32), state))
    return state


def _step(params: PyTree, state: SlotState, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array,
          rows: jax.Array, slots: jax.Array, page_table: jax.Array, evict: jax.Array, max_steps: jax.Array,
          exit_free: jax.Array, *, config: ModelConfig, settings: SamplingSettings, shape: _Shape) -> SlotState:
    """One host call: prefill ``rows`` into ``slots`` (:func:`_admit`; skipped when there are
    none), stop the ``evict``-ed slots (preempted rows), then decode (:func:`_decode`; none
    when ``max_steps`` is 0). One dispatch per refill keeps the host<->device round trips to one
    per refill."""
    static = dict(config=config, settings=settings, shape=shape)
    state = jax.lax.cond(jnp.any(rows >= 0),
                         lambda st: _admit(params, st, prompt_ids, prompt_mask, key, rows, slots, page_table, **static),
                         lambda st: st, state)
    state = state._replace(active=state.active & ~evict)
    return _decode(params, state, key, page_table, max_steps, exit_free, **static)


def _finish(state: SlotState, *, settings: SamplingSettings, shape: _Shape) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The responses as ``[rows, max_new_tokens]`` tokens, mask, log-probs."""
    rows = shape.shards * shape.rows_per_shard
    mask = jnp.arange(shape.max_new_tokens)[None, None, :] < state.lengths[..., None]
    tokens = jnp.where(mask, state.tokens, settings.pad_token_id).reshape(rows, -1)
    logprobs = jnp.where(mask, state.logprobs, 0.0).reshape(rows, -1)
    return tokens, mask.reshape(rows, -1), logprobs


# ----------------------------------------------------------------------------------------------
# The host scheduler
# ----------------------------------------------------------------------------------------------


class _Shard:
    """One batch shard's queue, slots and page pool (host bookkeeping)."""

    def __init__(self, prompt_lengths: np.ndarray, slots: int, pages: int):
        self.prompt_lengths = prompt_lengths  # [rows] real tokens of each of the shard's prompts
        self.pending = collections.deque(range(len(prompt_lengths)))
        self.free_slots = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first
        self.free_pages = list(range(pages - 1, NULL_PAGE, -1))
        self.slot_pages: list[list[int]] = [[] for _ in range(slots)]
        self.slot_row = [-1] * slots
        self.slot_step = [0] * slots  # tokens sampled (host view)
        self.running: list[int] = []  # slots with a row, in admission order

    def positions_after(self, slot: int, steps: int, max_new_tokens: int) -> int:
        """Cache positions the slot's row fills after ``steps`` more decode steps (a step feeds
        response token ``step - 1`` at position ``prompt_length + step - 1``; the last response
        token is never fed)."""
        fed = min(self.slot_step[slot] + steps - 1, max_new_tokens - 1)
        return int(self.prompt_lengths[self.slot_row[slot]]) + fed

    def extra_pages(self, steps: int, max_new_tokens: int, page_size: int) -> int:
        """Pages the running rows still need for ``steps`` more decode steps."""
        return sum(max(0, -(-self.positions_after(slot, steps, max_new_tokens) // page_size)
                       - len(self.slot_pages[slot])) for slot in self.running)

    def steps_that_fit(self, upper: int, max_new_tokens: int, page_size: int) -> int:
        """The most decode steps in ``[1, upper]`` whose pages the free pool covers (1 if none)."""
        low, high = 1, upper
        while low < high:
            mid = (low + high + 1) // 2
            if self.extra_pages(mid, max_new_tokens, page_size) <= len(self.free_pages):
                low = mid
            else:
                high = mid - 1
        return low

    def grow(self, slot: int, positions: int, page_size: int, page_table: np.ndarray) -> None:
        """Allocates pages until the slot's row holds ``positions`` cache positions."""
        have = self.slot_pages[slot]
        for _ in range(-(-positions // page_size) - len(have)):
            page = self.free_pages.pop()
            page_table[slot, len(have)] = page
            have.append(page)

    def release(self, slot: int, page_table: np.ndarray) -> None:
        self.free_pages.extend(self.slot_pages[slot])
        self.slot_pages[slot] = []
        page_table[slot] = NULL_PAGE
        self.slot_row[slot] = -1
        self.running.remove(slot)
        self.free_slots.append(slot)


class ContinuousEngine:
    """Continuous batching over a paged KV cache (see the module docstring).

    Args:
      model_config: the student's config (its family must implement the paged cache).
      settings: the sampling settings.
      mesh: the trainer's mesh.
      prompt_length: prompts are left-padded to this length (as the static engine's).
      options: :class:`ContinuousSettings` fields (``config.rollout``'s engine settings).

    Raises:
      ValueError: a bad setting (named), or ``slots`` not a multiple of the batch shards.
      NotImplementedError: the model family has no paged cache.
    """

    def __init__(self, *, model_config: ModelConfig, settings: SamplingSettings, mesh: Mesh, prompt_length: int,
                 options: dict | None = None):
        settings.check_vocab(model_config.vocab_size)
        family = models.family_for(model_config)
        if not family.supports_paged_cache:
            raise NotImplementedError(f"rollout.engine='continuous': the {family.name!r} model family has no "
                                      "paged cache; use rollout.engine='static'")
        self.model_config = model_config
        self.settings = settings
        self.mesh = mesh
        self.prompt_length = int(prompt_length)
        known = [field.name for field in dataclasses.fields(ContinuousSettings)]
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise ValueError(f"unknown continuous-engine options {unknown}; the options are {known}")
        self.options = ContinuousSettings(**(options or {}))
        self.shards = batch_shards(mesh)
        if self.options.slots % self.shards:
            raise ValueError(f"rollout.slots={self.options.slots} must be a multiple of the mesh's batch shards "
                             f"data*fsdp = {self.shards}")
        slots_per_shard = self.options.slots // self.shards
        page_size = self.options.page_size
        # Positions written: the prompt's, then every response token but the last (never fed).
        self.pages_per_row = -(-(self.prompt_length + settings.max_new_tokens - 1) // page_size)
        kv_pages = self.options.kv_pages or self.options.slots * self.pages_per_row
        if kv_pages % self.shards:
            raise ValueError(f"rollout.kv_pages={kv_pages} must be a multiple of the batch shards {self.shards}")
        if kv_pages // self.shards < self.pages_per_row:
            raise ValueError(
                f"rollout.kv_pages={kv_pages} gives each of the {self.shards} batch shards "
                f"{kv_pages // self.shards} pages, fewer than one longest row needs ({self.pages_per_row} "
                f"pages of {page_size} for {self.prompt_length} + {settings.max_new_tokens} positions)")
        self._slots_per_shard = slots_per_shard
        self._pages_per_shard = kv_pages // self.shards + 1  # + the null page
        self.cache_dtype = jnp.dtype(getattr(model_config, "dtype", jnp.float32))
        self._compiled: dict[int, dict[str, Any]] = {}
        self.last_stats: dict[str, float] = {}

    # -- shapes, shardings, programs ----------------------------------------------------------

    def _shape(self, rows: int) -> _Shape:
        if rows % self.shards:
            raise ValueError(f"{rows} rows do not split over the mesh's {self.shards} batch shards")
        return _Shape(shards=self.shards, slots_per_shard=self._slots_per_shard, rows_per_shard=rows // self.shards,
                      prompt_length=self.prompt_length, max_new_tokens=self.settings.max_new_tokens,
                      page_size=self.options.page_size, pages_per_row=self.pages_per_row,
                      pages_per_shard=self._pages_per_shard,
                      prefill_rows=min(self.options.prefill_rows, self._slots_per_shard),
                      block_pages=self.options.attention_block_pages)

    def _sharding(self, *logical_axes: str | None) -> NamedSharding:
        return sharding_lib.logical_sharding(logical_axes, self.mesh)

    def _state_shardings(self) -> SlotState:
        axes = models.family_for(self.model_config).paged_cache_logical_axes(self.model_config)
        cache = jax.tree.map(lambda names: self._sharding(*names), axes, is_leaf=lambda x: type(x) is tuple)
        per_slot = self._sharding("act_batch", None)
        replicated = NamedSharding(self.mesh, P())
        return SlotState(cache=cache, row=per_slot, step=per_slot, prompt_length=per_slot, last_token=per_slot,
                         active=per_slot, tokens=self._sharding("act_batch", None, None),
                         logprobs=self._sharding("act_batch", None, None), lengths=per_slot,
                         decode_steps=replicated, slot_steps=replicated)

    def _programs(self, rows: int) -> dict[str, Any]:
        """The jitted programs for ``rows`` rows (built once per row count)."""
        if rows in self._compiled:
            return self._compiled[rows]
        shape = self._shape(rows)
        static = dict(config=self.model_config, settings=self.settings, shape=shape)
        state_shardings = self._state_shardings()
        rows_sharding = sharding_lib.batch_sharding(self.mesh)
        programs = {
            "shape": shape,
            "init": jax.jit(functools.partial(_init_state, config=self.model_config, shape=shape,
                                              settings=self.settings, dtype=self.cache_dtype),
                            out_shardings=state_shardings),
            "step": jax.jit(functools.partial(_step, **static), donate_argnums=(1,), out_shardings=state_shardings),
            "finish": jax.jit(functools.partial(_finish, settings=self.settings, shape=shape),
                              out_shardings=(rows_sharding, rows_sharding, rows_sharding)),
        }
        self._compiled[rows] = programs
        return programs

    def programs(self, rows: int) -> tuple[EngineProgram, ...]:
        """The engine's jitted programs for a step of ``rows`` rows with abstract arguments
        (``jax.ShapeDtypeStruct`` with the trainer's shardings; nothing is allocated):
        ``rollout_step`` (a prefill of ``prefill_rows`` prompts per shard, then the decode loop:
        the one program a host call runs) and ``rollout_finish``. ``program.lower().compile().memory_analysis()``
        gives their memory (what ``effopd_jax.plan`` reads)."""
        compiled = self._programs(rows)
        shape = compiled["shape"]
        params = _abstract_params(self.model_config, self.mesh)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(compiled["init"]), self._state_shardings())
        per_shard = self._sharding("act_batch", None)
        replicated = NamedSharding(self.mesh, P())
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
        prompts = jax.ShapeDtypeStruct((rows, self.prompt_length), jnp.int32,
                                       sharding=sharding_lib.batch_sharding(self.mesh))
        mask = jax.ShapeDtypeStruct((rows, self.prompt_length), jnp.bool_, sharding=prompts.sharding)
        admit = jax.ShapeDtypeStruct((shape.shards, shape.prefill_rows), jnp.int32, sharding=per_shard)
        table = jax.ShapeDtypeStruct((shape.shards, shape.slots_per_shard, shape.pages_per_row), jnp.int32,
                                     sharding=self._sharding("act_batch", None, None))
        evict = jax.ShapeDtypeStruct((shape.shards, shape.slots_per_shard), jnp.bool_, sharding=per_shard)
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        exit_free = jax.ShapeDtypeStruct((shape.shards,), jnp.int32, sharding=self._sharding("act_batch"))
        return (
            EngineProgram("rollout_step", compiled["step"],
                          (params, state, prompts, mask, key, admit, admit, table, evict, scalar, exit_free), {},
                          self.mesh),
            EngineProgram("rollout_finish", compiled["finish"], (state,), {}, self.mesh),
        )

    @staticmethod
    def _place(arrays: Sequence[np.ndarray], shardings: Sequence[NamedSharding]) -> tuple[jax.Array, ...]:
        """Host arrays every process holds in full, as global arrays of ``shardings`` (one batched
        transfer on one process; several processes cut their own shards, with no collective)."""
        if jax.process_count() == 1:
            return tuple(jax.device_put(tuple(arrays), tuple(shardings)))
        return tuple(jax.make_array_from_callback(a.shape, s, lambda index, a=a: a[index])
                     for a, s in zip(arrays, shardings))

    @staticmethod
    def _admit_batch(shards: list[_Shard], page_table: np.ndarray, per_shard: int,
                     page_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Takes up to ``per_shard`` waiting rows per shard into free slots (while the pool has
        pages for their prompts): ``(rows, slots)`` ``[shards, per_shard]``, -1 where none."""
        rows = np.full((len(shards), per_shard), -1, np.int32)
        slots = np.full((len(shards), per_shard), -1, np.int32)
        for s, shard in enumerate(shards):
            for j in range(per_shard):
                if not shard.pending or not shard.free_slots:
                    break
                row = shard.pending[0]
                if -(-int(shard.prompt_lengths[row]) // page_size) > len(shard.free_pages):
                    break
                shard.pending.popleft()
                slot = shard.free_slots.pop()
                shard.slot_row[slot], shard.slot_step[slot] = row, 1
                shard.running.append(slot)
                shard.grow(slot, int(shard.prompt_lengths[row]), page_size, page_table[s])
                rows[s, j], slots[s, j] = row, slot
        return rows, slots

    @staticmethod
    def _to_host(*arrays: jax.Array) -> tuple[np.ndarray, ...]:
        """Small global arrays as numpy on every process (one transfer on one process)."""
        if jax.process_count() == 1:
            return tuple(jax.device_get(arrays))
        return tuple(sharding_lib.to_host(x) for x in arrays)

    # -- one step -----------------------------------------------------------------------------

    def generate(self, params: PyTree, prompts: Sequence[np.ndarray], key: jax.Array) -> Rollout:
        """Samples one response per prompt (see :class:`effopd_jax.rollout.RolloutEngine`)."""
        start = time.perf_counter()
        ids, mask = data.left_pad(prompts, self.settings.pad_token_id, self.prompt_length)
        prompt_ids = sharding_lib.global_batch(self.mesh, ids)
        prompt_mask = sharding_lib.global_batch(self.mesh, mask)
        rows = prompt_ids.shape[0]
        programs = self._programs(rows)
        shape: _Shape = programs["shape"]
        n, ss, rs, a = shape.shards, shape.slots_per_shard, shape.rows_per_shard, shape.prefill_rows
        page_size, max_new = shape.page_size, shape.max_new_tokens
        if jax.process_count() == 1:
            prompt_lengths = mask.sum(axis=1).astype(np.int32).reshape(n, rs)
        else:  # every process schedules every shard: it needs every prompt's length
            prompt_lengths = sharding_lib.to_host(jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)).reshape(n, rs)
        if (prompt_lengths == 0).any():
            raise ValueError("every prompt needs at least one token")

        per_shard = self._sharding("act_batch", None)
        table_sharding = self._sharding("act_batch", None, None)
        per_row = self._sharding("act_batch")
        replicated = NamedSharding(self.mesh, P())
        key = jax.device_put(key, replicated)
        shards = [_Shard(prompt_lengths[s], ss, shape.pages_per_shard) for s in range(n)]
        page_table = np.zeros((n, ss, shape.pages_per_row), np.int32)
        stats = collections.Counter()
        wait_seconds = 0.0
        exit_never = np.full((n,), ss + 1, np.int32)
        with sharding_lib.sharding_context(self.mesh):
            state = programs["init"]()
            while True:
                # 1. Refill free slots with waiting prompts, prefill_rows per shard and call; all
                # but the last batch go alone (max_steps 0), the last one with the decode steps.
                while True:
                    admit_rows, admit_slots = self._admit_batch(shards, page_table, a, page_size)
                    if (admit_rows < 0).all() or not any(
                            shard.pending and shard.free_slots and
                            -(-int(shard.prompt_lengths[shard.pending[0]]) // page_size) <= len(shard.free_pages)
                            for shard in shards):
                        break
                    state = programs["step"](params, state, prompt_ids, prompt_mask, key, *self._place(
                        (admit_rows, admit_slots, page_table, np.zeros((n, ss), bool), np.int32(0), exit_never),
                        (per_shard, per_shard, table_sharding, per_shard, replicated, per_row)))
                    stats["prefill_batches"] += 1
                    stats["host_calls"] += 1
                stats["prefill_batches"] += int((admit_rows >= 0).any())
                if not any(shard.running for shard in shards):
                    assert not any(shard.pending for shard in shards), "rows left unscheduled"
                    break
                # 2. Pages for the decode steps; where not even one step fits, preempt the shard's
                # most recently admitted row (it restarts later and samples the same tokens).
                steps = self.options.decode_steps if any(shard.pending for shard in shards) else max_new
                evict = np.zeros((n, ss), bool)
                for s, shard in enumerate(shards):
                    while shard.running and shard.extra_pages(1, max_new, page_size) > len(shard.free_pages):
                        victim = shard.running[-1]
                        shard.pending.appendleft(shard.slot_row[victim])
                        shard.release(victim, page_table[s])
                        evict[s, victim] = True
                        stats["preemptions"] += 1
                    steps = min(steps, shard.steps_that_fit(steps, max_new, page_size))
                for s, shard in enumerate(shards):
                    for slot in shard.running:
                        shard.grow(slot, shard.positions_after(slot, steps, max_new), page_size, page_table[s])
                # Return as soon as a shard can refill: prefill_rows free slots (fewer if fewer wait).
                exit_free = np.array([len(shard.free_slots) + min(len(shard.pending), a) if shard.pending
                                      else ss + 1 for shard in shards], np.int32)
                state = programs["step"](params, state, prompt_ids, prompt_mask, key, *self._place(
                    (admit_rows, admit_slots, page_table, evict, np.int32(steps), exit_free),
                    (per_shard, per_shard, table_sharding, per_shard, replicated, per_row)))
                stats["host_calls"] += 1
                # 3. Which rows stopped (the one device -> host transfer of the loop).
                waited = time.perf_counter()
                active, sampled = self._to_host(state.active, state.step)
                wait_seconds += time.perf_counter() - waited
                for s, shard in enumerate(shards):
                    for slot in list(shard.running):
                        shard.slot_step[slot] = int(sampled[s, slot])
                        if not active[s, slot]:
                            shard.release(slot, page_table[s])
            tokens, response_mask, logprobs = programs["finish"](state)
            waited = time.perf_counter()
            decode_steps, slot_steps = (int(x) for x in jax.device_get((state.decode_steps, state.slot_steps)))
            jax.block_until_ready(tokens)
            wait_seconds += time.perf_counter() - waited
        seconds = time.perf_counter() - start
        self.last_stats = {
            **{name: float(stats[name]) for name in ("host_calls", "prefill_batches", "preemptions")},
            "decode_steps": float(decode_steps),
            "slot_occupancy": slot_steps / max(1, decode_steps * n * ss),
            "seconds": seconds,
            "device_wait_seconds": wait_seconds,
            "host_seconds": seconds - wait_seconds,
        }
        return Rollout(prompt_ids, prompt_mask, tokens, response_mask, logprobs)


def _abstract_params(config: ModelConfig, mesh: Mesh) -> PyTree:
    """The params as ``ShapeDtypeStruct``s with the trainer's shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        models.abstract_params(config), sharding_lib.param_shardings(config, mesh))
