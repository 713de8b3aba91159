"""The OPD trainer, in pieces: the state, the jitted update, the set-up factories and the loop.

  state.py   TrainState, Parameterization (trainable vs frozen params), FullFineTuning
  step.py    update_step (pure, jitted by the Trainer), make_optimizer
  setup.py   factories: mesh, prompts, models, teacher, rollout engines, monitor
  loop.py    Trainer: set-up, train_one_step (rollout -> teacher -> update -> EffOPD), run

The command line is ``python -m effopd_jax.train`` (effopd_jax/train.py).
"""

from effopd_jax.trainer.loop import Stopwatch, Trainer
from effopd_jax.trainer.state import (
    FullFineTuning,
    NonFiniteUpdatesError,
    Parameterization,
    TrainState,
    new_train_state,
)
from effopd_jax.trainer.step import make_optimizer, update_step

__all__ = [
    "FullFineTuning", "NonFiniteUpdatesError", "Parameterization", "Stopwatch", "TrainState", "Trainer",
    "make_optimizer", "new_train_state", "update_step",
]
