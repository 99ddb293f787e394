"""Run logging for the training loop: metrics and events as JSON lines, scalars to TensorBoard.

Every write is flushed at once, so killing the run loses nothing already logged. Files are appended to,
so a resumed run continues the same logs (steps replayed after the last checkpoint appear twice; readers
keep the last line for a step).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from abot.checkpoint import atomic_write_bytes
from abot.errors import AbotError

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "final_training_summary.json"
TENSORBOARD_DIR = "tensorboard"


def plain_value(value: Any) -> Any:
    """A JSON-safe copy: one-element mx/numpy arrays and numpy scalars become Python numbers, NaN/inf
    become null (strict JSON has no NaN), containers are converted recursively."""
    if isinstance(value, (mx.array, np.ndarray)):
        if value.size != 1:
            raise ValueError(f"only one-element arrays can be logged, got shape {tuple(value.shape)}")
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise ValueError(f"cannot log a value of type {type(value).__name__}")


def json_line(record: dict) -> str:
    """One strict-JSON line (no NaN) ending in a newline."""
    return json.dumps(plain_value(record), allow_nan=False) + "\n"


def _with_reserved(reserved: dict, fields: dict) -> dict:
    """`reserved` followed by `fields`; a field that would overwrite a reserved one is an error."""
    clash = reserved.keys() & fields.keys()
    if clash:
        raise ValueError(f"field names {sorted(clash)} are reserved in log lines; rename them")
    return {**reserved, **fields}


class RunLogger:
    """Appends metrics and events for one run under `log_dir`; use as a context manager."""

    def __init__(self, log_dir: str | Path, tensorboard: bool = True):
        self.log_dir = Path(log_dir)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AbotError(f"{self.log_dir}: cannot create the log folder ({err.strerror}); "
                            "set train.log_path to a writable folder") from None
        self._tensorboard = self._open_tensorboard() if tensorboard else None
        self._metrics = open(self.log_dir / METRICS_FILE, "a", encoding="utf-8")
        self._events = open(self.log_dir / EVENTS_FILE, "a", encoding="utf-8")
        self.closed = False

    def _open_tensorboard(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise AbotError("TensorBoard logging needs tensorboardX: pip install tensorboardX "
                            "(or construct RunLogger with tensorboard=False)") from None
        return SummaryWriter(logdir=str(self.log_dir / TENSORBOARD_DIR))

    def _append(self, f, record: dict) -> None:
        if self.closed:
            raise RuntimeError(f"RunLogger for {self.log_dir} is closed")
        f.write(json_line(record))
        f.flush()  # into the OS, which keeps it across a SIGKILL of this process

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """One line {step, split, time, **metrics} to metrics.jsonl; numeric metrics to TensorBoard as
        `prefix/name`."""
        record = _with_reserved({"step": int(step), "split": prefix, "time": time.time()}, plain_value(metrics))
        self._append(self._metrics, record)
        if self._tensorboard is not None:
            for name, value in record.items():
                if name in ("step", "split", "time"):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"{prefix}/{name}", value, global_step=int(step))
            self._tensorboard.flush()

    def event(self, kind: str, **fields: Any) -> None:
        """One line {event, time, **fields} to events.jsonl: checkpoint saved, step skipped, resumed, ..."""
        self._append(self._events, _with_reserved({"event": kind, "time": time.time()}, fields))

    def write_summary(self, summary: dict) -> Path:
        """Write final_training_summary.json atomically (a reader never sees half of it)."""
        path = self.log_dir / SUMMARY_FILE
        text = json.dumps(plain_value(summary), indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(path, text.encode("utf-8"))
        return path

    def close(self) -> None:
        """Flush and close every file; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._metrics.close()
        self._events.close()
        if self._tensorboard is not None:
            self._tensorboard.flush()
            self._tensorboard.close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NullLogger:
    """RunLogger's interface, writing nothing: data-parallel ranks other than 0 (rank 0 alone writes logs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, step, metrics, prefix="train"):
        pass

    def event(self, kind, **fields):
        pass

    def write_summary(self, summary):
        return None
