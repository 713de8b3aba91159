"""Save / resume of a training run with orbax's CheckpointManager.

A checkpoint is one step directory with three items, plus an optional fourth:
  state    the train state pytree (trainable params, optimizer state incl. the EffOPD anchor,
           step, rng),
           saved with its shardings and restored into the target shardings;
  data     the data iterator's state (JSON), so a resumed run continues at the next batch;
  meta     small JSON facts (step, wall-clock so far, the student's model config) for humans,
           the trainer and the offline analysis;
  monitor  the live foresight monitor's reference bases (when it has any), so the first monitor
           pass after a resume measures subspace overlap exactly as an uninterrupted run would.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous complete checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any
# The meta item of every trainer checkpoint carries the student's model config
# (``config.to_dict()``) under this key, so a step directory can be read on its own.
META_MODEL_CONFIG = "student_model_config"
# ... and the parameterization's ``to_dict()`` under this one (``{"name": "full"}``, or LoRA's rank,
# alpha and modules), so that the analysis knows whether ``trainable_params`` is the whole student
# or adapters to merge into a base.
META_PARAMETERIZATION = "parameterization"


class RunCheckpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the trainer's three items.

    Args:
      directory: where step directories live (``WORKDIR/checkpoints``).
      keep: how many recent checkpoints to keep.
      async_save: save in a background thread (call :meth:`wait` before exiting).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            # Orbax decides by itself which steps to save unless told; the trainer decides.
            save_interval_steps=1,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta", "monitor")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, data_state: dict, meta: dict, monitor: PyTree | None = None) -> None:
        """Starts saving ``step`` (asynchronously when enabled); ``monitor`` is optional."""
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        if monitor is not None:
            items["monitor"] = ocp.args.StandardSave(monitor)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self, step: int, abstract_state: PyTree, abstract_monitor: PyTree | None = None
    ) -> tuple[PyTree, dict, dict, PyTree | None]:
        """Restores ``step`` into the shapes, dtypes and shardings of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g.
        from ``jax.eval_shape`` plus the trainer's shardings). The monitor item is restored
        into ``abstract_monitor`` when both it and the item exist; otherwise None comes back.

        Returns:
          ``(state, data_state, meta, monitor_or_None)``.
        """
        items = dict(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        has_monitor = os.path.isdir(os.path.join(self.directory, str(step), "monitor"))
        if abstract_monitor is not None and has_monitor:
            items["monitor"] = ocp.args.StandardRestore(abstract_monitor)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        monitor = restored.monitor if "monitor" in items else None
        return restored.state, restored.data, restored.meta, monitor

    def wait(self) -> None:
        """Blocks until every pending asynchronous save has committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: PyTree) -> PyTree:
    """``ShapeDtypeStruct`` pytree (with shardings) describing the arrays of ``tree``."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
