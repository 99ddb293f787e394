"""Learning-rate schedules: factories returning pure functions of the 0-based optimizer-update index.

Every factory takes (lr, min_lr, warmup_steps, total_steps, **options) and returns `schedule(step) -> float`.
Warmup is linear, lr * (step + 1) / warmup_steps for step < warmup_steps, so the first update already moves
and the last warmup step reaches lr. Decays end at min_lr on the last update (step total_steps - 1) and stay
there. warmup_steps == 0 skips warmup; total_steps <= warmup_steps leaves no decay (nothing divides by 0).
"""

from __future__ import annotations

import math
from typing import Callable

Schedule = Callable[[int], float]


def _check(lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> None:
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"schedule: warmup_steps ({warmup_steps}) and total_steps ({total_steps}) must be >= 0")
    if lr < 0 or min_lr < 0:
        raise ValueError(f"schedule: lr ({lr}) and min_lr ({min_lr}) must be >= 0")


def _warmup(lr: float, warmup_steps: int, step: int) -> float:
    return lr * (step + 1) / warmup_steps


def _progress(step: int, start: int, end: int) -> float:
    """0 at `start`, 1 at `end` and after, linear between; 1 from `start` on when end <= start."""
    if end <= start:
        return 0.0 if step < start else 1.0
    return min(max((step - start) / (end - start), 0.0), 1.0)


def _with_warmup(lr: float, warmup_steps: int, after: Schedule) -> Schedule:
    def schedule(step: int) -> float:
        return _warmup(lr, warmup_steps, step) if step < warmup_steps else after(step)

    return schedule


def cosine(lr: float, min_lr: float = 0.0, warmup_steps: int = 0, total_steps: int = 1) -> Schedule:
    """Linear warmup, then cosine decay from lr to min_lr at the last step."""
    _check(lr, min_lr, warmup_steps, total_steps)

    def decay(step: int) -> float:
        t = _progress(step, warmup_steps, total_steps - 1)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))

    return _with_warmup(lr, warmup_steps, decay)


def constant(lr: float, min_lr: float = 0.0, warmup_steps: int = 0, total_steps: int = 1) -> Schedule:
    """Linear warmup, then constant lr (min_lr and total_steps are unused)."""
    _check(lr, min_lr, warmup_steps, total_steps)
    return _with_warmup(lr, warmup_steps, lambda step: lr)


def linear(lr: float, min_lr: float = 0.0, warmup_steps: int = 0, total_steps: int = 1) -> Schedule:
    """Linear warmup, then linear decay from lr to min_lr at the last step."""
    _check(lr, min_lr, warmup_steps, total_steps)

    def decay(step: int) -> float:
        return lr + (min_lr - lr) * _progress(step, warmup_steps, total_steps - 1)

    return _with_warmup(lr, warmup_steps, decay)


def wsd(lr: float, min_lr: float = 0.0, warmup_steps: int = 0, total_steps: int = 1,
        decay_fraction: float = 0.2) -> Schedule:
    """Warmup-stable-decay: linear warmup, constant lr, then linear decay to min_lr over the last 20% of steps.

    The decay covers the last round(decay_fraction * total_steps) steps (never starting inside warmup),
    falling linearly from lr at its first step to min_lr at step total_steps - 1 (Hu et al., MiniCPM, 2024).
    """
    _check(lr, min_lr, warmup_steps, total_steps)
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"wsd: decay_fraction must be in [0, 1], got {decay_fraction}")
    decay_start = max(warmup_steps, total_steps - round(decay_fraction * total_steps))

    def stable_then_decay(step: int) -> float:
        if step < decay_start:
            return lr
        return lr + (min_lr - lr) * _progress(step, decay_start, total_steps - 1)

    return _with_warmup(lr, warmup_steps, stable_then_decay)
