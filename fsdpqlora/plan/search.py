"""The search: every combination of the memory levers, those that fit, the fastest first.

The levers are answer.ai's tuning order and more: sharding strategy, CPU offload, activation
checkpointing (off, every layer, every 2nd or 4th), activation offload, the paged twin of the
configured optimizer (8-bit or not stays the user's choice: it changes the numbers trained), and
the micro-batch size, with gradient accumulation keeping each worker's rows per step (the global
batch) unchanged. The rest of the configuration stays as given.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from fsdpqlora.config import Config
from fsdpqlora.plan.arch import Architecture
from fsdpqlora.plan.cost import StepTime, step_time
from fsdpqlora.plan.memory import Breakdown, Levers, estimate
from fsdpqlora.plan.rig import Rig


@dataclass(frozen=True)
class Plan:
    levers: Levers
    memory: Breakdown
    time: StepTime


def evaluate(arch: Architecture, cfg: Config, levers: Levers, rig: Rig) -> Plan:
    return Plan(levers, estimate(arch, cfg, levers, rig), step_time(arch, cfg, levers, rig))


def candidates(cfg: Config, rig: Rig, tied: bool) -> list[Levers]:
    given = Levers.of(cfg)
    strategies = ["full_shard", "shard_grad_op", "no_shard"] + (["hybrid_shard"] if rig.nodes > 1 else [])
    if rig.workers == 1:
        strategies = ["full_shard"]
    offloads = [False, True] if rig.gpus_per_node else [False]
    optimizer = given.optimizer.removeprefix("paged_")
    optimizers = [optimizer, f"paged_{optimizer}"] if rig.gpus_per_node else [given.optimizer]
    rows = given.micro_batch_size * given.grad_accum_steps
    micro_batches = [m for m in range(1, rows + 1) if rows % m == 0]
    checkpointing = [(0, False), (1, False), (1, True), (2, False), (2, True), (4, False), (4, True)]
    if not rig.gpus_per_node:
        checkpointing = [c for c in checkpointing if not c[1]]
    # the embedding in host memory: only where there is a GPU to spare, and a table that is not the head's
    host_embedding = [False, True] if rig.gpus_per_node and not tied else [False]
    return [
        replace(
            given,
            strategy=s,
            cpu_offload=o,
            checkpoint_every=k,
            activation_offload=a,
            embedding_on_host=e,
            optimizer=opt,
            micro_batch_size=m,
            grad_accum_steps=rows // m,
        )  # fmt: skip
        for s, o, (k, a), e, opt, m in itertools.product(strategies, offloads, checkpointing, host_embedding, optimizers, micro_batches)
    ]


def fastest_fitting(arch: Architecture, cfg: Config, rig: Rig) -> list[Plan]:
    """Every combination that fits, the fastest first; among those within 0.1% of the same time, the
    fewest levers changed from the given configuration, then the least GPU memory."""
    given = Levers.of(cfg)
    plans = [evaluate(arch, cfg, levers, rig) for levers in candidates(cfg, rig, tied=not arch.embedding.tensors)]
    fitting = [p for p in plans if p.memory.fits]
    return sorted(
        fitting,
        key=lambda p: (
            float(f"{p.time.seconds:.3g}"),
            len(changed_overrides(given, p.levers)),
            p.memory.gpu_total,
            p.memory.host_total,
        ),
    )


def changed_overrides(given: Levers, proposed: Levers) -> list[str]:
    """The overrides that turn the given configuration into the proposed one."""
    before = set(given.overrides())
    return [o for o in proposed.overrides() if o not in before]


def with_overrides(argv: list[str], changes: list[str]) -> list[str]:
    """`argv` with `changes` in place of the overrides of the same keys (Hydra refuses a key twice)."""
    keys = {change.split("=", 1)[0] for change in changes}
    if "shard" in keys:
        keys.add("shard.strategy")
    return [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in keys] + changes
