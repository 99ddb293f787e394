"""Schedules at hand-picked steps, against hand computations."""

import math

import pytest

from abot.errors import AbotError
from abot.registry import schedules
from abot.schedules import constant, cosine, linear, wsd

LR, MIN = 1e-3, 1e-4


def test_cosine():
    s = cosine(LR, MIN, warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(LR / 10)  # first update already moves
    assert s(9) == pytest.approx(LR)  # warmup ends at lr
    assert s(10) == pytest.approx(LR)  # decay starts from lr
    assert s(59) == pytest.approx(MIN + 0.5 * (LR - MIN) * (1 + math.cos(math.pi * 49 / 99)))
    assert s(109) == pytest.approx(MIN)  # last update at min_lr
    assert s(500) == pytest.approx(MIN)


def test_constant():
    s = constant(LR, MIN, warmup_steps=4, total_steps=100)
    assert [s(i) for i in range(4)] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR])
    assert s(50) == s(99) == s(1000) == LR


def test_linear():
    s = linear(LR, MIN, warmup_steps=10, total_steps=111)
    assert s(9) == pytest.approx(LR)
    assert s(60) == pytest.approx((LR + MIN) / 2)
    assert s(110) == pytest.approx(MIN)


def test_wsd():
    s = wsd(LR, MIN, warmup_steps=10, total_steps=100)  # decay over the last 20 steps: 80..99
    assert s(0) == pytest.approx(LR / 10)
    assert s(10) == s(50) == s(80) == LR
    assert s(81) == pytest.approx(LR + (MIN - LR) / 19)
    assert s(99) == pytest.approx(MIN)
    s = wsd(LR, MIN, warmup_steps=0, total_steps=100, decay_fraction=0.5)
    assert s(49) == LR and s(99) == pytest.approx(MIN)
    with pytest.raises(ValueError, match="decay_fraction"):
        wsd(LR, MIN, 0, 100, decay_fraction=1.5)


@pytest.mark.parametrize("factory", [cosine, constant, linear, wsd])
@pytest.mark.parametrize("warmup, total", [(0, 100), (0, 1), (0, 0), (10, 10), (10, 5), (10, 11)])
def test_no_division_by_zero_and_bounded(factory, warmup, total):
    s = factory(LR, MIN, warmup_steps=warmup, total_steps=total)
    values = [s(i) for i in range(max(total, warmup) + 3)]
    assert all(0.0 < v <= LR * (1 + 1e-12) for v in values)
    if warmup == 0:
        assert values[0] == LR or total <= 1  # no warmup: starts at lr (a single step is also the last)


def test_registry_lists_schedules_with_summaries():
    for name in ("cosine", "constant", "linear", "wsd"):
        entry = schedules.entry(name)
        assert entry.summary and callable(entry.obj(LR, MIN, 0, 10))
    with pytest.raises(AbotError, match="did you mean 'cosine'"):
        schedules.get("cosin")
