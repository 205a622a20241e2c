"""How long a run is where the configuration leaves it to the model, the machine and the data:
data.seq_len=0 (auto) and train.max_steps=0 (train.epochs passes over the data), and the line the
launcher prints about it before any worker starts."""

from __future__ import annotations

import math
from dataclasses import replace

from fsdpqlora.config import Config
from fsdpqlora.config.schema import AUTO_SEQ_LEN_CAP
from fsdpqlora.logs import plural
from fsdpqlora.plan.rig import Rig

SHORTEST_AUTO_SEQ_LEN = 256


def with_auto_seq_len(cfg: Config, hf_config, rig: Rig) -> Config:
    """`cfg` with data.seq_len=0 replaced by the longest of AUTO_SEQ_LEN_CAP, half of it, ... down to
    SHORTEST_AUTO_SEQ_LEN that the model allows and at which the planner finds the configuration
    fits `rig` as given; when none fits, the longest (and the planner's refusal says what to turn)."""
    if cfg.data.seq_len:
        return cfg
    from fsdpqlora.plan.arch import architecture
    from fsdpqlora.plan.memory import Levers, estimate

    longest = min(AUTO_SEQ_LEN_CAP, getattr(hf_config, "max_position_embeddings", None) or AUTO_SEQ_LEN_CAP)
    arch = architecture(cfg, hf_config)
    lengths = [longest >> k for k in range(16) if longest >> k >= SHORTEST_AUTO_SEQ_LEN] or [longest]
    for seq_len in lengths:
        trial = _with_seq_len(cfg, seq_len)
        if estimate(arch, trial, Levers.of(trial), rig).fits:
            return trial
    return _with_seq_len(cfg, longest)


def _with_seq_len(cfg: Config, seq_len: int) -> Config:
    return replace(cfg, data=replace(cfg.data, seq_len=seq_len))


def with_max_steps(cfg: Config, steps_per_epoch: int) -> Config:
    """`cfg` with train.max_steps=0 replaced by train.epochs passes over the data, in whole steps."""
    if cfg.train.max_steps:
        return cfg
    steps = max(1, math.ceil(cfg.train.epochs * steps_per_epoch - 1e-9))
    return replace(cfg, train=replace(cfg.train, max_steps=steps))


def run_length_line(cfg: Config, given: Config, steps_per_epoch: int, epoch_tokens: int, seconds_per_step: float, on_gpus: bool) -> str:
    """What the launcher says before starting: steps, tokens, and about how long, from the planner's
    step time (`cfg` resolved, `given` as the user gave it)."""
    steps = cfg.train.max_steps
    epochs = steps / steps_per_epoch
    if given.train.max_steps:
        how = f"train.max_steps={steps}: {epochs:.2f} epochs of {plural(steps_per_epoch, 'step')}"
    else:
        how = f"train.epochs={given.train.epochs:g} x {plural(steps_per_epoch, 'step')} per epoch"
    seq_len = f"data.seq_len={cfg.data.seq_len}" + (" (auto)" if not given.data.seq_len else "")
    tokens = epoch_tokens * epochs
    source = "the planner's step time for these GPUs" if on_gpus else "the planner's rough CPU model; the log shows the measured tokens/s"
    return (
        f"[fsdpqlora] run length: {plural(steps, 'step')} ({how}), {seq_len}, about {_count(tokens)} tokens; "
        f"about {_duration(steps * seconds_per_step)} at {seconds_per_step:.2f} s per step ({source})"
    )


def _count(value: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
