"""`fsdpqlora [COMMAND] [overrides]`: the user's entry point.

Without a command (or with `train`) it fine-tunes: check everything that can be checked in one
process, then start torchrun. Other commands are listed in COMMANDS, each a module's `main`.

The configuration is composed and validated here, the model and data are located (or built, for
the offline defaults), and the run directory is created with the resolved config in it, so that a
mistake costs a second and one clear line instead of a crash in every worker.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsdpqlora.config import Config
    from fsdpqlora.data import StepBatches
    from fsdpqlora.launcher.agent import Rendezvous
    from fsdpqlora.plan.rig import Rig
    from fsdpqlora.plan.search import Plan
    from fsdpqlora.preflight import Checked
    from fsdpqlora.rundir import RunDirLock

USAGE = """usage: fsdpqlora [train] [OVERRIDE ...]
       fsdpqlora COMMAND [ARG ...]

Fine-tune with QLoRA + FSDP2. Overrides are Hydra's: pick a preset per group (group=option) and set
any key (section.key=value).
  fsdpqlora                                         the offline demo (tiny model, 2 CPU workers)
  fsdpqlora model=llama-3.1-70b adapter.r=16 train.lr=2e-4 shard=full_shard
  fsdpqlora model=llama-3.1-8b model.path=/data/Llama-3.1-8B data=alpaca_json data.path=train.jsonl

Commands:
  train [OVERRIDE ...]        fine-tune (the default)
  config [OVERRIDE ...]       print the resolved configuration as YAML, start nothing (also: --cfg job)
  presets [GROUP]             the presets of every group (or of one), a line each
  plan [OVERRIDE ...]         will it fit, and what fits fastest
  data [-n N] [OVERRIDE ...]  the data as the model sees it: N rendered examples, their loss mask, packing
  submit [OVERRIDE ...]       submit to SLURM (--dry-run prints the job script)
  merge RUN OUT               merge the adapter into its base: a plain Hugging Face model directory
  generate RUN --prompt TEXT  answer prompts with the trained adapter or a merged model
  plot RUN [RUN ...]          loss, learning rate, tokens/s and memory of runs, overlaid, as a PNG

Groups (group=list shows a group's presets): {groups}.
Every key and its default is in fsdpqlora/config/schema.py. Workers: one per visible GPU, or
launch.cpu_workers on a CPU-only machine
(or with launch.device=cpu). COMMAND --help tells more about a command.
"""


# Commands beside training: name -> "module:function" taking the remaining arguments and returning
# the exit code. Imported only when used, so `fsdpqlora --help` stays fast.
COMMANDS: dict[str, str] = {
    "config": "fsdpqlora.launcher.cli:show_config",
    "presets": "fsdpqlora.launcher.cli:show_presets",
    "plan": "fsdpqlora.plan.command:main",
    "data": "fsdpqlora.data.preview:main",
    "plot": "fsdpqlora.train.plots:main",
    "submit": "fsdpqlora.launcher.slurm:main",
    "merge": "fsdpqlora.export.merge:main",
    "generate": "fsdpqlora.export.generate:main",
}


# Set in the workers' environment by the launcher; a worker without it (plain torchrun) records its
# own command line in command.txt.
LAUNCHED_BY = "FSDPQLORA_LAUNCHER"


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def worker_count(cfg) -> int:
    """Workers on this node: launch.nproc_per_node, else one per GPU, or launch.cpu_workers when the
    workers run on CPU (launch.device)."""
    gpus = _visible_gpus() if cfg.launch.uses_cuda(_visible_gpus()) else 0
    if cfg.launch.nproc_per_node:
        if gpus and cfg.launch.nproc_per_node > gpus:
            from fsdpqlora.errors import ConfigError

            raise ConfigError(f"launch.nproc_per_node={cfg.launch.nproc_per_node}: only {gpus} GPUs are visible")
        return cfg.launch.nproc_per_node
    return gpus or cfg.launch.cpu_workers


def rendezvous_of(cfg) -> Rendezvous:
    """Where this node's launcher meets the others: launch.nnodes / rdzv_endpoint / rdzv_id, with
    the node count and run id of the SLURM job step (srun) when they are not given."""
    from fsdpqlora.errors import ConfigError
    from fsdpqlora.launcher.agent import Rendezvous

    nnodes = cfg.launch.nnodes or int(os.environ.get("SLURM_STEP_NUM_NODES", "1"))
    if nnodes == 1:
        return Rendezvous.single_node()
    if not cfg.launch.rdzv_endpoint:
        raise ConfigError(
            f"launch.rdzv_endpoint is empty: a run on {nnodes} nodes needs the host:port where they meet, "
            "the same on every node (e.g. the first node's name and a free port: node001:29500)"
        )
    run_id = cfg.launch.rdzv_id or os.environ.get("SLURM_JOB_ID", "")
    if not run_id:
        raise ConfigError(f"launch.rdzv_id is empty: a run on {nnodes} nodes needs a name, the same on every node")
    return Rendezvous(nnodes, cfg.launch.rdzv_endpoint, run_id)


def prepare_run(overrides: list[str]) -> tuple[Config, Path, int, Rendezvous, RunDirLock | None]:
    """Validate, locate model and data, check and lock the run directory, and record the config in
    it. Returns (config, its file, workers on this node, the rendezvous of the nodes, the run
    directory's lock: held by this process for the run's life; None on several nodes, where the
    rank-0 worker holds it)."""
    from fsdpqlora.config import choose_run_dir, compose_config, save_run_config
    from fsdpqlora.plan.arch import architecture
    from fsdpqlora.plan.checkpointing import auto_line, is_auto, with_auto_settings
    from fsdpqlora.plan.length import run_length_line, with_max_steps
    from fsdpqlora.plan.memory import checkpoint_bytes
    from fsdpqlora.plan.rig import measure
    from fsdpqlora.preflight import check_run_dir, preflight
    from fsdpqlora.rundir import lock_run_dir, short_of_space

    given = compose_config(overrides)
    checked = preflight(given, given.launch.uses_cuda(_visible_gpus()))
    rendezvous = rendezvous_of(given)
    # Every node's launcher must name the same directory; a timestamp would differ between them.
    if rendezvous.nnodes > 1 and not given.launch.run_dir:
        run_dir = (Path(given.launch.output_root).expanduser() / rendezvous.run_id).resolve()
    else:
        run_dir = choose_run_dir(given)
    check_run_dir(given, run_dir)  # before the data is read: a live run there, or a refused resume, ends it here
    nproc = worker_count(given)
    rig = measure(given, nproc, rendezvous.nnodes)
    cfg = with_auto_settings(given, checked.hf_config, rig)
    if is_auto(given):
        print(f"[fsdpqlora] {auto_line(cfg)}", flush=True)
    train, plan = check_workers(cfg, checked, nproc, rendezvous.nnodes, rig)
    cfg = with_max_steps(cfg, train.steps_per_epoch)
    print(run_length_line(cfg, given, train.steps_per_epoch, train.epoch_tokens(), plan.time.seconds, rig.gpus_per_node > 0), flush=True)
    if warning := short_of_space(run_dir, checkpoint_bytes(architecture(cfg, checked.hf_config), cfg.train.optimizer.value)):
        print(f"[fsdpqlora] {warning}", flush=True)
    # Last: a refused configuration leaves no run directory behind, and nothing changed in one. (A run
    # that took the directory since check_run_dir makes this refuse.)
    lock = lock_run_dir(run_dir) if rendezvous.nnodes == 1 else None
    return cfg, save_run_config(cfg, run_dir), nproc, rendezvous, lock


def resume_command(argv: list[str], run_dir: Path) -> str:
    """The command that resumes a stopped run: this one, in its run directory, from its newest
    checkpoint (whatever checkpoint.resume said)."""
    import shlex

    kept = [a for a in argv if not a.lstrip("+~").startswith(("launch.run_dir=", "checkpoint.resume="))]
    return shlex.join(["fsdpqlora", *kept, f"launch.run_dir={run_dir}"])


def check_workers(cfg: Config, checked: Checked, nproc: int, nnodes: int, rig: Rig) -> tuple[StepBatches | None, Plan]:
    """What depends on the workers (nproc per node on nnodes nodes of `rig`): the hybrid shard
    group, the memory plan, and data enough for a global batch (every row read, checked and
    tokenized once, into the cache the workers read; skipped without a tokenizer). Returns the
    training batches (None without a tokenizer) and the plan."""
    from fsdpqlora.data import build_batches, pad_id_of, prepare
    from fsdpqlora.plan.command import check_launch

    world_size = nproc * nnodes
    cfg.shard.shard_group_size(world_size, nproc)  # refuses a hybrid shard group that does not divide the workers
    plan = check_launch(cfg, checked.hf_config, rig)  # refuses, naming the lever, what would run out of memory
    if checked.tokenizer is None:
        return None, plan
    return build_batches(cfg, prepare(cfg, checked.tokenizer), 0, world_size, pad_id_of(checked.tokenizer)).train, plan


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if "--cfg" in argv:  # Hydra's way of asking for the configuration (--cfg job)
        at = argv.index("--cfg")
        overrides = argv[:at] + argv[at + 2 :]
        return show_config(overrides[1:] if overrides[:1] == ["train"] else overrides)
    # A Hydra override always holds "=" (or starts with "~"), so a bare first word is a command.
    if argv[:1] == ["train"]:
        argv = argv[1:]
    elif argv and argv[0] in COMMANDS:
        import importlib

        module, function = COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    elif argv and "=" not in argv[0] and not argv[0].startswith(("~", "-")):
        commands = ["train", *COMMANDS]
        guess = difflib.get_close_matches(argv[0], commands, n=1)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        print(f"fsdpqlora: error: unknown command {argv[0]!r}; commands: {', '.join(commands)}{hint}", file=sys.stderr)
        return 2
    elif argv and argv[0].startswith("-") and argv[0] not in ("-m", "--multirun"):
        print(f"fsdpqlora: error: unknown option {argv[0]!r}; fsdpqlora --help lists the commands", file=sys.stderr)
        return 2
    listed = _group_to_list(argv)
    if listed is not None:
        return show_presets([listed])
    return train(argv)


def usage() -> str:
    from fsdpqlora.config.compose import config_groups

    return USAGE.format(groups=", ".join(config_groups()))


def _group_to_list(overrides: list[str]) -> str | None:
    """The group of a `model=` or `model=list` override: a request for that group's presets."""
    from fsdpqlora.config.compose import config_groups

    for override in overrides:
        group, _, option = override.partition("=")
        if group in config_groups() and option in ("", "list"):
            return group
    return None


def show_config(argv: list[str]) -> int:
    """`fsdpqlora config [OVERRIDE ...]`: the configuration a run with these overrides would use,
    its values checked, as YAML; nothing is started, read or downloaded."""
    from fsdpqlora.config import compose_config, to_yaml, validate
    from fsdpqlora.errors import exit_on_user_error

    if argv[:1] in (["-h"], ["--help"]):
        print("usage: fsdpqlora config [OVERRIDE ...]\n\nPrint the resolved configuration as YAML; start nothing.")
        return 0
    listed = _group_to_list(argv)
    if listed is not None:
        return show_presets([listed])
    with exit_on_user_error():
        cfg = compose_config(argv)
        validate(cfg)
    print(to_yaml(cfg), end="")
    return 0


def show_presets(argv: list[str]) -> int:
    """`fsdpqlora presets [GROUP]`: every group's presets (or one group's), with a line each."""
    from fsdpqlora.config.compose import config_groups, preset_options
    from fsdpqlora.errors import ConfigError, exit_on_user_error

    if argv[:1] in (["-h"], ["--help"]):
        print("usage: fsdpqlora presets [GROUP]\n\nList the presets of every group of conf/, or of GROUP.")
        return 0
    groups = config_groups()
    with exit_on_user_error():
        unknown = [g for g in argv if g not in groups]
        if unknown:
            guess = difflib.get_close_matches(unknown[0], groups, n=1)
            hint = f"; did you mean {guess[0]}?" if guess else ""
            raise ConfigError(f"no group {unknown[0]!r}; groups: {', '.join(groups)}{hint}")
    for group in argv or groups:
        options = preset_options(group)
        width = max(map(len, options))
        print(f"{group} ({group}=OPTION):")
        print("\n".join(f"  {name:<{width}}  {description}".rstrip() for name, description in options.items()))
    return 0


def train(argv: list[str]) -> int:
    """Validate, create the run directory, start torchrun and wait for the workers."""
    from fsdpqlora.errors import ConfigError, exit_on_user_error
    from fsdpqlora.launcher.agent import INTERRUPTED_EXIT_CODE, run_workers
    from fsdpqlora.logs import configure_logging, kept_in, log, plural, record_command
    from fsdpqlora.rundir import LOCKED_BY_LAUNCHER_ENV
    from fsdpqlora.train.preemption import REQUEUE_EXIT_CODE

    configure_logging()

    with exit_on_user_error():
        if "-m" in argv or "--multirun" in argv:
            raise ConfigError("multirun sweeps (-m) run on SLURM, one job per point: fsdpqlora submit -m ...; here, one configuration per command")
        try:
            cfg, config_file, nproc, rendezvous, lock = prepare_run(argv)  # the lock is released as this process ends
        except KeyboardInterrupt:  # Ctrl-C while checking: no worker started, and the run directory is not yet written
            print("fsdpqlora: interrupted before any worker started; nothing was written", file=sys.stderr, flush=True)
            return INTERRUPTED_EXIT_CODE
    run_dir = config_file.parent
    if lock is not None:  # the workers share it rather than ask for it
        os.environ[LOCKED_BY_LAUNCHER_ENV] = str(run_dir)
    how = f"the launcher: {nproc} workers per node, {rendezvous.nnodes} node(s)"
    record_command(run_dir, ["fsdpqlora", *argv], how)
    with kept_in(run_dir / "train.log"):
        nodes = f" on each of {rendezvous.nnodes} nodes (rendezvous {rendezvous.endpoint})" if rendezvous.nnodes > 1 else ""
        log.info(f"[fsdpqlora] run directory: {run_dir}\n[fsdpqlora] starting {plural(nproc, 'worker')}{nodes}")
        # torchrun defaults each worker to 1 thread and warns; give each worker an equal share of the
        # cores this process may use (the affinity mask: a SLURM job's allocation, not the whole node).
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
        if not cfg.launch.uses_cuda(_visible_gpus()):
            # CPU workers leave the GPUs alone: no CUDA context, pinned memory or CUDA stream in them.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        command = [sys.executable, "-u", "-m", "fsdpqlora.train", "--config", str(config_file)]
        os.environ[LAUNCHED_BY] = "1"  # the workers leave command.txt to this launcher
        try:
            code = run_workers(command, nproc, cfg.launch.max_restarts, rendezvous)
        finally:
            del os.environ[LAUNCHED_BY]
        if code == 0:
            log.info(f"[fsdpqlora] run finished; run directory: {run_dir}")
        elif code in (REQUEUE_EXIT_CODE, INTERRUPTED_EXIT_CODE):
            how = "after a checkpoint" if code == REQUEUE_EXIT_CODE else "at once, without a checkpoint"
            log.info(f"[fsdpqlora] run stopped {how} (exit code {code}); run directory: {run_dir}\n"
                     f"[fsdpqlora] resume it from its last checkpoint with: {resume_command(argv, run_dir)}")  # fmt: skip
        else:
            log.info(f"[fsdpqlora] run failed (exit code {code}); run directory: {run_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
