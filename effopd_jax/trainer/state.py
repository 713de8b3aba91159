"""The train state, and which part of the student is trained.

    parameterization = FullFineTuning()
    trainable, frozen = parameterization.split(params)
    state = new_train_state(trainable, optimizer, seed=0, mesh=mesh)
    ...
    params = parameterization.merge(state.trainable_params, frozen)   # what the forward takes

The optimizer (and EffOPD) see only the trainable part; the frozen part is an input of every
step like the teacher's params, never checkpointed (it is reloaded from the student's
checkpoint). Full fine-tuning, the paper's setting, trains everything; an adapter method trains
a small tree of its own and merges it into the frozen base (``effopd_jax.lora.LoRA``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effopd_jax.models import ModelLayout

PyTree = Any


class NonFiniteUpdatesError(FloatingPointError):
    """Too many updates in a row had a non-finite loss or gradient (``max_consecutive_skips``)."""


class TrainState(NamedTuple):
    """Everything a step changes; a pytree that orbax saves and restores.

    Attributes:
      step: int32 scalar, trainer steps completed (skipped updates included).
      trainable_params: what the optimizer updates (for full fine-tuning: the student's params).
      opt_state: the optimizer chain's state over ``trainable_params`` (clip, AdamW, and EffOPD's
        anchor when enabled).
      rng: uint32[2] raw PRNG key; step t uses ``fold_in(rng, t)``.
      skipped_updates: int32 scalar, updates skipped for a non-finite loss or gradient.
      consecutive_skips: int32 scalar, the current run of skipped updates.
    """

    step: jax.Array
    trainable_params: PyTree
    opt_state: PyTree
    rng: jax.Array
    skipped_updates: jax.Array
    consecutive_skips: jax.Array


class Parameterization(Protocol):
    """How the student's params split into a trainable and a frozen part (hashable: it is a
    static argument of the jitted update)."""

    name: str

    def split(self, params: PyTree) -> tuple[PyTree, PyTree]:
        """``(trainable, frozen)`` from the student's initial params."""
        ...

    def merge(self, trainable: PyTree, frozen: PyTree) -> PyTree:
        """The model params the forward takes (pure and jit-able)."""
        ...

    def param_filter(self, layout: ModelLayout) -> Callable[[str], bool]:
        """EffOPD's default filter over the ``/``-joined paths of the *trainable* tree."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON facts the trainer writes into each checkpoint's meta (at least ``name``), so that a
        step directory says how its trainable params relate to the model (``effopd_jax.analyze``)."""
        ...


@dataclasses.dataclass(frozen=True)
class FullFineTuning:
    """Every student parameter is trainable; nothing is frozen (the paper's setting).
    EffOPD extrapolates what the model family's layout marks (the authors' rule)."""

    name: str = "full"

    def split(self, params: PyTree) -> tuple[PyTree, PyTree]:
        return params, {}

    def merge(self, trainable: PyTree, frozen: PyTree) -> PyTree:
        del frozen
        return trainable

    def param_filter(self, layout: ModelLayout) -> Callable[[str], bool]:
        return layout.effopd_filter()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params: PyTree, mesh: Mesh) -> PyTree:
    """Where ``optimizer.init(params)`` lives: a leaf that mirrors a parameter (its key path ends
    with the parameter's path and it has its shape: AdamW's moments, EffOPD's anchor) is laid out
    like that parameter; every other leaf (counts, scalars, EffOPD's ladder) is replicated.

    Left to XLA, ``jax.jit(optimizer.init)`` replicates the moments (``zeros_like`` does not read
    the parameters' values, so no sharding propagates to it): for a Qwen3-1.7B student that is
    13.6 GB of AdamW moments on every device instead of a share of them.

    Args:
      optimizer: the optimizer.
      params: the parameters (arrays, or ``ShapeDtypeStruct``s), each with its sharding.
      mesh: the mesh of the replicated leaves.
    """
    by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, P())

    def sharding(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            param = by_path.get(path[start:])
            if param is not None and tuple(param.shape) == tuple(leaf.shape):
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(optimizer.init, params))


def init_optimizer_state(optimizer: optax.GradientTransformation, params: PyTree, mesh: Mesh) -> PyTree:
    """``optimizer.init(params)``, jitted, laid out by :func:`optimizer_state_shardings`."""
    return jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params, mesh))(params)


def new_train_state(trainable_params: PyTree, optimizer: optax.GradientTransformation, *, seed: int,
                    mesh: Mesh) -> TrainState:
    """Step 0: the optimizer initialised on ``trainable_params`` (already placed on ``mesh``; its
    state sharded like them, see :func:`optimizer_state_shardings`), counters at zero and the
    run's PRNG key, replicated."""
    replicated = NamedSharding(mesh, P())

    def counter():  # a fresh buffer each: the state is donated leaf by leaf
        return jax.device_put(jnp.zeros((), jnp.int32), replicated)

    return TrainState(
        step=counter(),
        trainable_params=trainable_params,
        opt_state=init_optimizer_state(optimizer, trainable_params, mesh),
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
        skipped_updates=counter(),
        consecutive_skips=counter(),
    )
