"""Optimizers as pure functions over parameter trees; each module holds one optimizer."""

from abot.optim.base import Optimizer

__all__ = ["Optimizer"]
