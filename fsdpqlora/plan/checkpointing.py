"""shard.checkpoint_every=0 (auto): activation checkpointing only as much as memory needs.

A checkpointed layer keeps only its input and runs its forward again in backward (at every layer
about 6N instead of 4N FLOPs per token), so the fastest setting that fits is the one that
checkpoints the fewest layers. The launcher resolves it on its machine before any worker starts
(under plain torchrun, rank 0 does), after data.seq_len=0, which is chosen as if every layer were
checkpointed; the run directory's config.yaml records the choice.
"""

from __future__ import annotations

from dataclasses import replace

from fsdpqlora.config import Config
from fsdpqlora.plan.length import with_auto_seq_len
from fsdpqlora.plan.rig import Rig

# What auto tries, fastest first: no checkpointing, every 4th layer, every 2nd, every layer.
AUTO_CHECKPOINT_EVERY = (0, 4, 2, 1)


def with_auto_settings(cfg: Config, hf_config, rig: Rig) -> Config:
    """`cfg` with data.seq_len=0 and shard.checkpoint_every=0 resolved for `rig`, in that order."""
    return with_auto_checkpointing(with_auto_seq_len(cfg, hf_config, rig), hf_config, rig)


def is_auto(cfg: Config) -> bool:
    return cfg.shard.activation_checkpointing and not cfg.shard.checkpoint_every


def with_auto_checkpointing(cfg: Config, hf_config, rig: Rig) -> Config:
    """`cfg` with shard.checkpoint_every=0 replaced by the first of AUTO_CHECKPOINT_EVERY at which the
    planner finds the run fits `rig` (0 turns shard.activation_checkpointing off); every layer when
    none fits, and the planner's refusal then says what else to turn. Activation offload needs
    checkpointed layers, so with it auto checkpoints at least every 4th."""
    if not is_auto(cfg):
        return cfg
    from fsdpqlora.plan.arch import architecture
    from fsdpqlora.plan.memory import Levers, estimate

    arch = architecture(cfg, hf_config)
    choices = [k for k in AUTO_CHECKPOINT_EVERY if k or not cfg.shard.activation_offload]
    for every in choices:
        trial = with_checkpoint_every(cfg, every)
        if estimate(arch, trial, Levers.of(trial), rig).fits:
            return trial
    return with_checkpoint_every(cfg, 1)


def with_checkpoint_every(cfg: Config, every: int) -> Config:
    """`cfg` checkpointing every `every`-th decoder layer; none for 0."""
    shard = replace(cfg.shard, activation_checkpointing=every > 0, checkpoint_every=max(every, 1))
    return replace(cfg, shard=shard)


def auto_line(cfg: Config) -> str:
    """The launcher's and the planner's line about the resolved choice."""
    return f"shard.checkpoint_every=0 (auto): {describe(cfg)}, the least that fits (every layer if none does)"


def describe(cfg: Config) -> str:
    """The resolved choice in words."""
    every = cfg.shard.checkpoint_every
    if not cfg.shard.activation_checkpointing:
        return "no activation checkpointing"
    if every == 1:
        return "activation checkpointing of every layer"
    return f"activation checkpointing of every {every}{'nd' if every == 2 else 'th'} layer"
