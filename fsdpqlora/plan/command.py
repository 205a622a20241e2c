"""`fsdpqlora plan [overrides]`, and the launcher's check before it spawns workers."""

from __future__ import annotations

import sys

from fsdpqlora.config import Config
from fsdpqlora.errors import ConfigError
from fsdpqlora.logs import plural
from fsdpqlora.plan.arch import architecture, hf_config_of
from fsdpqlora.plan.checkpointing import auto_line, is_auto, with_auto_settings
from fsdpqlora.plan.memory import CUDA_CONTEXT_NAME, GIB, Levers, dominant
from fsdpqlora.plan.rig import Rig, rig_of
from fsdpqlora.plan.search import Plan, changed_overrides, evaluate, fastest_fitting, with_overrides

USAGE = """usage: fsdpqlora plan [OVERRIDE ...]

Estimates the memory per GPU and host RAM of the configuration the overrides give, on the rig
(rig=2x24gb, rig=8x80gb, ..., or rig=auto: this machine), and proposes the fastest configuration
that fits. E.g.: fsdpqlora plan model=llama-3.1-70b rig=2x24gb data.seq_len=2048 train.micro_batch_size=2
"""


def main(argv: list[str]) -> int:
    from fsdpqlora.config import compose_config, validate
    from fsdpqlora.errors import exit_on_user_error

    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    with exit_on_user_error():
        cfg = compose_config(argv)
        validate(cfg)
        rig = rig_of(cfg)
        hf_config = hf_config_of(cfg)
        auto = not cfg.data.seq_len
        auto_checkpointing = is_auto(cfg)
        cfg = with_auto_settings(cfg, hf_config, rig)
        arch = architecture(cfg, hf_config)
    given = evaluate(arch, cfg, Levers.of(cfg), rig)
    ranked = fastest_fitting(arch, cfg, rig)
    print(f"fsdpqlora plan: {cfg.model.name} on {rig.describe()}")
    print(f"  data.seq_len={cfg.data.seq_len}{' (auto)' if auto else ''}, {plural(rig.workers, 'worker')}; the memory model and cost model: fsdpqlora/plan/")
    if auto_checkpointing:
        print(f"  {auto_line(cfg)}")
    best = ranked[0] if ranked else None
    print(table(given, best))
    print(f"given configuration: {'fits' if given.memory.fits else 'does NOT fit'}; {timing(given)}")
    if best is None:
        print(nothing_fits(given, rig), file=sys.stderr)
        return 1
    changes = changed_overrides(given.levers, best.levers)
    if not changes:
        print(f"it is also the fastest of the {len(ranked)} combinations that fit")
        return 0
    if auto_checkpointing:  # pinned: auto would choose again for the other levers, perhaps otherwise
        changes += [o for o in best.levers.overrides() if o.startswith("shard.") and "checkpoint" in o and o not in changes]
    print(f"fastest of the {len(ranked)} combinations that fit: {timing(best)}")
    print("  fsdpqlora " + " ".join(with_overrides(argv, changes)))
    return 0


def table(given: Plan, best: Plan | None) -> str:
    """The breakdown, GiB, of the given configuration and of the proposed one."""
    columns = [("given", given)] + ([("proposed", best)] if best and best.levers != given.levers else [])
    width = 48
    lines = []

    def section(title: str, attr: str, capacity: int, total: str = "total") -> None:
        names = list(dict.fromkeys(name for _, p in columns for name in getattr(p.memory, attr)))
        totals = [sum(getattr(p.memory, attr).values()) for _, p in columns]
        unit, scale = ("GiB", GIB) if max(totals) >= GIB else ("MiB", 2**20)
        lines.append(f"{f'{title}, {unit}':<{width}}" + "".join(f"{label:>10}" for label, _ in columns))
        for name in names:
            if name == CUDA_CONTEXT_NAME:  # outside torch's counters: what they report stops here
                reserved = [p.memory.gpu_reserved for _, p in columns]
                lines.append(f"  {'reserved peak (torch.cuda.max_memory_reserved)':<{width - 2}}" + "".join(f"{v / scale:>10.2f}" for v in reserved))
            values = [getattr(p.memory, attr).get(name, 0) for _, p in columns]
            if any(values):
                lines.append(f"  {name:<{width - 2}}" + "".join(f"{v / scale:>10.2f}" for v in values))
        lines.append(f"  {total:<{width - 2}}" + "".join(f"{v / scale:>10.2f}" for v in totals))
        verdicts = ["fits" if t <= capacity else "NO" for t in totals]
        lines.append(f"  {f'of {capacity / GIB:.2f} GiB':<{width - 2}}" + "".join(f"{v:>10}" for v in verdicts))

    if given.memory.gpu_capacity:
        section("per GPU (the fullest)", "gpu", given.memory.gpu_capacity, "total on the GPU")
    section("host RAM per node", "host", given.memory.host_capacity)
    for label, plan in columns:
        name, share = dominant(plan.memory)
        lines.append(f"largest term ({label}): {name}, {share:.0%} of the {'GPU' if plan.memory.gpu else 'host'} total")
    return "\n".join(lines)


def timing(plan: Plan) -> str:
    t = plan.time
    return (
        f"about {t.seconds:.2f} s per step (compute {t.compute:.2f} s, collectives {t.collectives:.2f} s, "
        f"PCIe {t.pcie:.2f} s), {t.tokens_per_second:,.0f} tokens/s"
    )


def nothing_fits(given: Plan, rig: Rig) -> str:
    need = [f"{given.memory.host_total / GIB:.1f} GiB of host RAM of {rig.host_memory_gib:.0f}"]
    if rig.gpus_per_node:
        need.insert(0, f"{given.memory.gpu_total / GIB:.1f} GiB per GPU of {rig.gpu_memory_gib:.0f}")
    return (
        f"fsdpqlora: error: no combination of the memory levers fits {rig.name}: as given it needs "
        f"{' and '.join(need)}, and neither sharding, CPU offload, checkpointing, paged optimizers nor a "
        f"smaller micro-batch brings it under; use more GPUs or memory, a smaller model or a shorter data.seq_len"
    )


def check_launch(cfg: Config, hf_config, rig: Rig) -> Plan:
    """The launcher's plan on this machine (`measure`), or submit's on the job's nodes: one line; a
    ConfigError naming the lever to turn when it does not fit (unless launch.force=true). Where the
    rig's memory is unknown (submit with rig=auto), the line says what the run needs per GPU and node.
    Returns the plan of the configuration as given."""
    from fsdpqlora.logs import log

    arch = architecture(cfg, hf_config)
    given = evaluate(arch, cfg, Levers.of(cfg), rig)
    m = given.memory
    where = "this machine" if rig.name.startswith("this machine") else rig.name
    workers = f"{rig.workers // rig.nodes} {'GPUs' if rig.gpus_per_node else 'CPU workers'}"
    on = "" if where == "this machine" else f" for {rig.nodes} node{'s' if rig.nodes > 1 else ''} of {workers}"
    if (rig.gpus_per_node and not rig.gpu_memory_gib) or not rig.host_memory_gib:
        gpu = f"{m.gpu_total / GIB:.1f} GiB per GPU, " if rig.gpus_per_node else ""
        log.info(
            f"[fsdpqlora] plan{on}: needs {gpu}{m.host_total / GIB:.1f} GiB host RAM per node; about "
            f"{given.time.seconds:.2f} s per step; their memory is unknown, so nothing is checked: name the rig "
            "(rig=8x80gb, or rig.gpu_memory_gib=80 rig.host_memory_gib=512) to check that it fits"
        )
        return
    gpu = f"{m.gpu_total / GIB:.1f} of {rig.gpu_memory_gib:.1f} GiB per GPU, " if rig.gpus_per_node else ""
    log.info(
        f"[fsdpqlora] plan{on}: {gpu}{m.host_total / GIB:.1f} of {rig.host_memory_gib:.1f} GiB host RAM"
        f"{' per node' if on else ''}; about {given.time.seconds:.2f} s per step (fsdpqlora plan ... for the breakdown)"
    )
    if m.fits:
        return given
    if cfg.launch.force:
        log.info(f"[fsdpqlora] the plan does not fit {where}; launch.force=true: starting anyway")
        return given
    ranked = fastest_fitting(arch, cfg, rig)
    if not ranked:
        raise ConfigError(nothing_fits(given, rig).removeprefix("fsdpqlora: error: ") + " (or launch.force=true)")
    over = "per GPU" if rig.gpus_per_node and m.gpu_total > m.gpu_capacity else "of host RAM"
    raise ConfigError(
        f"the configuration does not fit {where} ({over}); turn "
        f"{' '.join(changed_overrides(given.levers, ranked[0].levers))} (the fastest that fits: "
        f"{timing(ranked[0])}), or start anyway with launch.force=true"
    )
