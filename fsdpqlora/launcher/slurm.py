"""`fsdpqlora submit [--dry-run] [-m] OVERRIDE ...`: validate a configuration, write its SLURM job
script and submit it, printing the job id; `-m` submits one job per point of a sweep.

The script is sbatch_body.sh under #SBATCH lines made from the `slurm` config group; the templates
in slurm/ are this module's output for the defaults (a test keeps them in step).

Sweeps are expanded here, over Hydra's own override grammar, into the cartesian product its basic
sweeper would run, one sbatch job per point. Not hydra-submitit-launcher: it starts one Python process per
task through submitit, where every node of a job needs our launcher (torchrun's agent, its restart
policy and signal forwarding), and its last release is from 2022.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import itertools
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from fsdpqlora.config import Config
from fsdpqlora.errors import ConfigError, exit_on_user_error

USAGE = """usage: fsdpqlora submit [--dry-run] [-m] [OVERRIDE ...]

Validate the configuration for the job's nodes, write its sbatch script and submit it (one job per
sweep point with -m). slurm.gpus_per_node is the rig's (rig=8x80gb) or must be given (0: a CPU job).
  fsdpqlora submit model=llama-3.1-70b slurm.nodes=2 slurm.gpus_per_node=4 slurm.partition=gpu
  fsdpqlora submit -m rig=8x80gb train.lr=1e-4,2e-4 adapter.r=8,16      4 jobs
  fsdpqlora submit --dry-run rig=8x80gb slurm.time=2:00:00               print the script, submit nothing
A dry run downloads nothing. The job's run directory is <launch.output_root>/slurm-<job id>; its log
is slurm-<job id>.out there.
"""


def sbatch_options(cfg: Config) -> list[str]:
    s = cfg.slurm
    options = [
        f"--job-name={s.job_name}",
        f"--nodes={s.nodes}",
        "--ntasks-per-node=1",  # one launcher per node; it starts the workers
        f"--cpus-per-task={s.cpus_per_task}",
        f"--time={s.time}",
    ]
    if s.gpus_per_node:
        options.append(f"--gres=gpu:{s.gpus_per_node}")
    if s.partition:
        options.append(f"--partition={s.partition}")
    if s.account:
        options.append(f"--account={s.account}")
    if s.signal_seconds:
        # B: to the batch script only, which forwards it; the launchers then checkpoint and stop.
        options.append(f"--signal=B:USR1@{s.signal_seconds}")
    options += ["--requeue", "--open-mode=append"]  # a requeued job appends to the same log
    return [*options, *s.extra_args]


def job_script(cfg: Config, output_root: str, log: str) -> str:
    """The sbatch script for this config; runs go to <output_root>/slurm-<job id>, the log to `log`."""
    body = importlib.resources.files("fsdpqlora.launcher").joinpath("sbatch_body.sh").read_text()
    nodes = "one node" if cfg.slurm.nodes == 1 else f"{cfg.slurm.nodes} nodes"
    header = [
        "#!/usr/bin/env bash",
        f"# QLoRA + FSDP2 fine-tuning on {nodes} under SLURM, written by `fsdpqlora submit`.",
        "# Options given to sbatch on its command line win over these lines.",
        *(f"#SBATCH {option}" for option in [*sbatch_options(cfg), f"--output={log}"]),
    ]
    return "\n".join(header) + "\n" + body.replace("@OUTPUT_ROOT@", output_root)


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every combination of the comma-separated values (Hydra's multirun grammar), in the order of
    Hydra's basic sweeper: the last value varies fastest; a key given twice keeps its first place
    and its last values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"sweep: {exc}") from None
    choices: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise ConfigError(f"sweep: {override.input_line}: an interval has no list of values to submit")
    return [list(point) for point in itertools.product(*choices.values())]


def job_gpus(cfg: Config) -> int:
    """slurm.gpus_per_node, or the named rig's when it is unset; a CPU job only when asked for."""
    from fsdpqlora.logs import log

    gpus = cfg.slurm.gpus_per_node
    if gpus is None:
        if cfg.rig.name == "auto":
            raise ConfigError(
                "slurm.gpus_per_node is not set: give the GPUs per node (slurm.gpus_per_node=4), or name the "
                "nodes' rig (rig=8x80gb; fsdpqlora/conf/rig), or slurm.gpus_per_node=0 for a CPU job"
            )
        gpus = cfg.rig.gpus_per_node
    if gpus == 0:
        log.warning(
            f"[fsdpqlora] warning: slurm.gpus_per_node=0: a CPU job (no --gres line), {cfg.launch.cpu_workers} CPU "
            f"workers per node (launch.cpu_workers); a GPU job needs slurm.gpus_per_node or a GPU rig"
        )
    return gpus


def validate_point(overrides: list[str], dry_run: bool = False) -> Config:
    """The launcher's checks (config, model, data) for the job's nodes, here, before anything is
    queued: the plan for slurm.nodes nodes of the job's GPUs, and data enough for a global batch of
    their workers. A dry run downloads nothing: a hub model's files and tokenizer are not checked.
    Returns the configuration with slurm.gpus_per_node resolved."""
    from fsdpqlora.config import compose_config
    from fsdpqlora.launcher.cli import check_workers
    from fsdpqlora.plan.checkpointing import with_auto_settings
    from fsdpqlora.plan.rig import job_rig
    from fsdpqlora.preflight import preflight

    cfg = compose_config(overrides)
    # What the checks print goes to stderr: stdout is the job script (--dry-run) or the job id.
    with contextlib.redirect_stdout(sys.stderr):
        gpus = job_gpus(cfg)
        cfg = replace(cfg, slurm=replace(cfg.slurm, gpus_per_node=gpus))
        checked = preflight(cfg, has_cuda=gpus > 0, download=not dry_run)
        nproc = gpus or cfg.launch.cpu_workers
        rig = job_rig(cfg, gpus)
        cfg = with_auto_settings(cfg, checked.hf_config, rig)
        check_workers(cfg, checked, nproc, cfg.slurm.nodes, rig)
    return cfg


def submit(overrides: list[str], cfg: Config, dry_run: bool) -> None:
    output_root = Path(cfg.launch.output_root).expanduser().resolve()
    script = job_script(cfg, str(output_root), str(output_root / "slurm-%j.out"))
    if dry_run:
        print(script, end="")
        print(f"# sbatch <this script> {shlex.join(overrides)}")
        return
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH: run `fsdpqlora submit` on a SLURM login node (--dry-run prints the script)")
    output_root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", dir=output_root, delete=False) as f:
        f.write(script)
    pending = Path(f.name)
    result = subprocess.run(["sbatch", "--parsable", str(pending), *overrides], capture_output=True, text=True)
    if result.returncode != 0:
        pending.unlink()
        raise ConfigError(f"sbatch refused the job: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    run_dir = output_root / f"slurm-{job_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    pending.replace(run_dir / "job.sbatch")  # sbatch keeps its own copy; this one is for the record
    print(f"[fsdpqlora] submitted job {job_id}: {shlex.join(overrides) or '(defaults)'}\n"
          f"[fsdpqlora]   run directory {run_dir}, log {run_dir.parent / f'slurm-{job_id}.out'}", flush=True)  # fmt: skip
    print(job_id, flush=True)


def main(argv: list[str]) -> int:
    from fsdpqlora.logs import configure_logging

    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    configure_logging()
    dry_run = "--dry-run" in argv
    multirun = "-m" in argv or "--multirun" in argv
    overrides = [a for a in argv if a not in ("--dry-run", "-m", "--multirun")]
    with exit_on_user_error():
        if unknown := [a for a in overrides if a.startswith("-")]:
            raise ConfigError(f"fsdpqlora submit: unknown option {unknown[0]}; see fsdpqlora submit --help")
        points = sweep_points(overrides) if multirun else [overrides]
        configs = [validate_point(point, dry_run) for point in points]  # all checked before any is queued
        for point, cfg in zip(points, configs, strict=True):
            submit(point, cfg, dry_run)
    return 0


# The templates of slurm/ (for `sbatch slurm/NAME OVERRIDE ...` without `fsdpqlora submit`): the
# script for these `slurm` settings, runs under ./outputs. Rewrite them with
# `python -m fsdpqlora.launcher.slurm slurm/` after changing this module or sbatch_body.sh.
TEMPLATES = {
    "train.sbatch": ["slurm.gpus_per_node=2"],
    "train-multinode.sbatch": ["slurm.nodes=2", "slurm.gpus_per_node=8", "slurm.cpus_per_task=64"],
}


def template(name: str) -> str:
    from fsdpqlora.config import compose_config

    return job_script(compose_config(TEMPLATES[name]), "outputs", "outputs/slurm-%j.out")


if __name__ == "__main__":
    for name in TEMPLATES:
        (Path(sys.argv[1]) / name).write_text(template(name))
