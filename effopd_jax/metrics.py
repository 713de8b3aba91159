"""Metric sinks for the trainer: a crash-safe JSONL log, optional TensorBoard, a progress line.

Host-side (not jitted). Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np


def _to_python(value: Any) -> Any:
    """Converts JAX / numpy scalars to plain Python numbers for JSON."""
    if isinstance(value, Mapping):
        return {str(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    array = np.asarray(value)
    if array.ndim == 0:
        item = array.item()
        if isinstance(item, float) and not math.isfinite(item):
            return repr(item)  # JSON has no NaN/inf; keep them visible as strings.
        return item
    return _to_python(array.tolist())


class MetricsWriter:
    """Appends one JSON object per step to ``WORKDIR/metrics.jsonl``.

    Each record is written with a single ``write`` of a complete line followed by ``fsync``, so a
    killed process leaves at most a missing line, never a torn one. On resume, records with
    ``step > resume_step`` (the last checkpointed step) are dropped first, so a resumed run never
    duplicates steps.
    TensorBoard event files are written too when ``tensorboardX`` is importable.
    """

    def __init__(self, workdir: str, *, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(resume_step)
        try:  # optional dependency: TensorBoard event files when available
            from tensorboardX import SummaryWriter  # type: ignore

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:
            self._tb = None

    def _truncate_after(self, resume_step: int | None) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a torn final line (killed mid-write): drop it
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    break
                if resume_step is not None and int(record.get("step", 0)) <= resume_step:
                    kept.append(raw)
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = _to_python(dict(record))
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir_or_path: str) -> list[dict[str, Any]]:
    """Reads ``metrics.jsonl`` (a workdir or the file itself) into a list of dicts."""
    path = workdir_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """A one-line progress display with ETA on stdout (plain lines when not a TTY)."""

    def __init__(self, total: int, *, start: int = 0, stream=None, enabled: bool = True):
        self.total = max(int(total), 1)
        self.start_step = start
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self._t0 = time.monotonic()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        eta_text = f"{eta:6.0f}s" if math.isfinite(eta) else "     ?s"
        line = f"[{bar}] {step}/{self.total} eta {eta_text} {shown}"
        if self._tty:
            self.stream.write("\r" + line)
            if step >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
