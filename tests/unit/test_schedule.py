"""The learning-rate schedule (fsdpqlora/train/optim.py lr_lambda): the factor of the peak rate at
each optimizer step, for warmup then cosine (to 10% of the peak), linear (to 0) or constant."""

from __future__ import annotations

import math

import pytest

from fsdpqlora.config import config_from
from fsdpqlora.train.optim import lr_lambda


def factor(schedule: str, warmup_steps: int = 4, max_steps: int = 24):
    return lr_lambda(config_from({"train": {"schedule": schedule, "warmup_steps": warmup_steps, "max_steps": max_steps}}))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_below_the_peak(schedule):
    f = factor(schedule, warmup_steps=4)
    assert [f(step) for step in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)  # the first step after warmup is at the peak


def test_cosine_falls_to_a_tenth_of_the_peak_and_stays_there():
    f = factor("cosine", warmup_steps=4, max_steps=24)
    assert f(4) == pytest.approx(1.0)
    assert f(14) == pytest.approx(0.55)  # halfway: the cosine's midpoint between 1 and 0.1
    assert f(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert f(24) == pytest.approx(0.1)
    assert f(40) == pytest.approx(0.1)  # past max_steps: no rebound
    values = [f(step) for step in range(4, 25)]
    assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True))


def test_linear_falls_to_zero_and_never_below():
    f = factor("linear", warmup_steps=4, max_steps=24)
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.75)
    assert f(14) == pytest.approx(0.5)
    assert f(24) == 0.0
    assert f(30) == 0.0


def test_constant_stays_at_the_peak():
    f = factor("constant", warmup_steps=2, max_steps=10)
    assert [f(step) for step in (2, 5, 10, 100)] == [1.0, 1.0, 1.0, 1.0]


def test_no_warmup_starts_at_the_peak():
    assert factor("cosine", warmup_steps=0, max_steps=10)(0) == pytest.approx(1.0)
    assert factor("linear", warmup_steps=0, max_steps=10)(5) == pytest.approx(0.5)


def test_warmup_as_long_as_the_run_does_not_divide_by_zero():
    f = factor("cosine", warmup_steps=10, max_steps=10)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)  # progress is measured over max(1, max_steps - warmup_steps)
    assert f(11) == pytest.approx(0.1)
