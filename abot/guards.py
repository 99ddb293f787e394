"""What keeps a run safe to stop: Ctrl-C / SIGTERM as a request the loop honours at a step boundary, and the
data-parallel watchdog that ends a rank whose peers died instead of letting it wait forever."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx


@dataclass(frozen=True)
class World:
    """The data-parallel ranks of this run: mx.distributed's group when launched with several (mlx.launch)."""

    group: Any = None  # mx.distributed.Group of several ranks, or None
    rank: int = 0
    size: int = 1


def distributed_world() -> World:
    if not mx.distributed.is_available():
        return World()
    group = mx.distributed.init()
    return World(group, group.rank(), group.size()) if group.size() > 1 else World()


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits cleanly."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def requested(self, group) -> bool:
        """Whether any rank was asked to stop: data-parallel ranks must stop at the same step."""
        if group is None:
            return self.signal is not None
        return mx.distributed.all_sum(mx.array(float(self.signal is not None)), group=group).item() > 0

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Watchdog:
    """Data parallel: a rank whose peer died would wait in an all-reduce forever. If no step completes
    for ABOT_DIST_TIMEOUT seconds (default 600), print why and exit with status 1."""

    def __init__(self, world_size: int):
        self.timeout = float(os.environ.get("ABOT_DIST_TIMEOUT", "600")) if world_size > 1 else 0.0
        self.last = time.monotonic()
        self._done = threading.Event()

    def __enter__(self):
        if self.timeout > 0:
            threading.Thread(target=self._watch, daemon=True, name="abot-watchdog").start()
        return self

    def step_done(self):
        self.last = time.monotonic()

    def _watch(self):
        while not self._done.wait(min(self.timeout, 10.0)):
            if time.monotonic() - self.last > self.timeout:
                sys.stderr.write(f"abot: no training step finished in {self.timeout:.0f} s; another rank probably "
                                 "died or hangs. Exiting (set ABOT_DIST_TIMEOUT to wait longer).\n")
                os._exit(1)

    def __exit__(self, *exc):
        self._done.set()
