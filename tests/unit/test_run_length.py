"""How long a run is when the configuration leaves it to the data (train.max_steps=0: train.epochs
passes), and the line the launcher prints about it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fsdpqlora.config import Config
from fsdpqlora.errors import ConfigError
from fsdpqlora.logs import plural
from fsdpqlora.plan.length import run_length_line, with_max_steps


def train(**values) -> Config:
    cfg = Config()
    return replace(cfg, train=replace(cfg.train, **values))


@pytest.mark.parametrize(
    "values, steps_per_epoch, steps",
    [({}, 40, 40), ({"epochs": 3}, 40, 120), ({"epochs": 2.5}, 7, 18), ({"epochs": 0.01}, 7, 1), ({"max_steps": 5, "epochs": 3}, 40, 5)],
)
def test_max_steps_zero_means_epochs_and_a_given_max_steps_wins(values, steps_per_epoch, steps):
    assert Config().train.max_steps == 0 and Config().train.epochs == 1
    assert with_max_steps(train(**values), steps_per_epoch).train.max_steps == steps


def test_the_lengths_left_to_the_run_pass_the_checks_and_nonsense_is_refused():
    Config().check()
    with pytest.raises(ConfigError, match=r"^train.epochs=0: must be positive"):
        train(epochs=0).check()
    with pytest.raises(ConfigError, match=r"^train.max_steps=-1: must be >= 0 \(0: train.epochs passes over the data\)"):
        train(max_steps=-1).check()


def test_the_run_length_line_says_steps_tokens_and_time():
    given = train(epochs=2)
    cfg = with_max_steps(replace(given, data=replace(given.data, seq_len=2048)), 625)
    line = run_length_line(cfg, given, 625, 5_100_000, 26.68, on_gpus=True)
    assert line == (
        "[fsdpqlora] run length: 1,250 steps (train.epochs=2 x 625 steps per epoch), data.seq_len=2048 (auto), "
        "about 10.2M tokens; about 9.3 h at 26.68 s per step (the planner's step time for these GPUs)"
    )
    fixed = train(max_steps=1)
    line = run_length_line(replace(fixed, data=replace(fixed.data, seq_len=256)), fixed, 4, 3000, 0.5, on_gpus=False)
    assert line.startswith("[fsdpqlora] run length: 1 step (train.max_steps=1: 0.25 epochs of 4 steps), data.seq_len=256 (auto), about 750 tokens; about 0 s")
    assert line.endswith("(the planner's rough CPU model; the log shows the measured tokens/s)")


def test_plurals():
    assert [plural(n, "worker") for n in (0, 1, 2, 1200)] == ["0 workers", "1 worker", "2 workers", "1,200 workers"]
