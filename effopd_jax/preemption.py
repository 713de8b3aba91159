"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, exit 0 (host-side).

Preemptible TPU and GPU capacity announces a kill with SIGTERM and a short grace period. The
trainer wraps its loop in :class:`PreemptionGuard`::

    with PreemptionGuard(grace_seconds=120.0) as guard:
        for step in ...:
            train_one_step()
            if guard.should_stop():       # every process agrees on the same step
                save_checkpoint(); wait_for_save(); break

The signal handler only sets a flag, so the step in flight (which may be inside a compiled XLA
program) completes normally. From the first signal on:

* ``should_stop()`` is true on every process at the same step: with several processes the
  local flags are combined with an all-gather at the end of each step, because the scheduler
  does not deliver the signal to every host at the same instant;
* a watchdog thread ends the process with exit code :data:`GRACE_EXCEEDED_EXIT_CODE` if it is
  still alive ``grace_seconds`` later (a step or a save that cannot finish in time); the last
  *complete* checkpoint is still valid then, because orbax commits a checkpoint by renaming a
  finished temporary directory;
* the default handler is back in place, so a second Ctrl-C or SIGTERM stops at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

GRACE_EXCEEDED_EXIT_CODE = 1


class PreemptionGuard:
    """Context manager turning termination signals into a "stop after this step" request.

    Args:
      grace_seconds: after the first signal, the process is ended (exit code
        ``GRACE_EXCEEDED_EXIT_CODE``) if it has not exited this many seconds later.
      signals: which signals request the stop.
      enabled: False makes the guard inert (signals keep their default behaviour).
      log: where the guard reports a received signal.

    Handlers can only be installed from the main thread; elsewhere ``__enter__`` raises
    ``RuntimeError`` rather than silently running unprotected (pass ``enabled=False`` there).
    """

    def __init__(
        self,
        grace_seconds: float,
        *,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
        enabled: bool = True,
        log: Callable[..., None] = print,
    ):
        if not grace_seconds > 0:
            raise ValueError(f"grace_seconds must be > 0, got {grace_seconds!r}")
        self.grace_seconds = float(grace_seconds)
        self.signals = tuple(signals)
        self.enabled = enabled
        self._log = log
        self._previous: dict[int, object] = {}
        self._received: int | None = None
        self._watchdog: threading.Timer | None = None

    # -- context ----------------------------------------------------------------------------

    def __enter__(self) -> PreemptionGuard:
        if not self.enabled:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionGuard must be entered from the main thread (signal handlers can only be "
                "installed there); pass enabled=False (config.preemption.handle_signals=False) to run "
                "without it"
            )
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore_handlers()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    # -- signal side ------------------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._received = signum
        # A second signal acts immediately (the user means it).
        self._restore_handlers()
        self._watchdog = threading.Timer(self.grace_seconds, self._grace_exceeded)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._log(
            f"received {signal.Signals(signum).name}: stopping after the current step "
            f"(checkpoint, then exit; grace {self.grace_seconds:g} s)"
        )

    def _grace_exceeded(self) -> None:
        sys.stderr.write(
            f"effopd_jax: still running {self.grace_seconds:g} s after "
            f"{signal.Signals(self._received).name}; exiting with code {GRACE_EXCEEDED_EXIT_CODE}. "
            "The last complete checkpoint is intact.\n"
        )
        sys.stderr.flush()
        os._exit(GRACE_EXCEEDED_EXIT_CODE)

    # -- loop side --------------------------------------------------------------------------

    @property
    def received(self) -> str | None:
        """The name of the signal this process received (None if none)."""
        return None if self._received is None else signal.Signals(self._received).name

    def should_stop(self) -> bool:
        """Whether any process has received a stop signal; the same answer on every process.

        A collective when ``jax.process_count() > 1``: every process must call it at the same
        point of the loop.
        """
        local = self._received is not None
        if jax.process_count() == 1:
            return local
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.any(flags))
