"""`fsdpqlora [COMMAND] [overrides]`: the user's entry point.

Without a command (or with `train`) it fine-tunes: check everything that can be checked in one
process, then start torchrun. Other commands are listed in COMMANDS, each a module's `main`.

The configuration is composed and validated here, the model and data are located (or built, for
the offline defaults), and the run directory is created with the resolved config in it, so that a
mistake costs a second and one clear line instead of a crash in every worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

USAGE = """usage: fsdpqlora [train] [OVERRIDE ...]
       fsdpqlora COMMAND [ARG ...]      (commands: {commands})

Fine-tune with QLoRA + FSDP2. Overrides are Hydra's: pick presets by group and set any key.
  fsdpqlora                                         the offline demo (tiny model, 2 CPU workers)
  fsdpqlora model=llama-3.1-70b adapter.r=16 train.lr=2e-4 shard=full_shard
  fsdpqlora model=llama-3.1-8b model.path=/data/Llama-3.1-8B data=alpaca_json data.path=train.jsonl
  fsdpqlora plan model=llama-3.1-70b rig=2x24gb           will it fit, and what fits fastest

Groups: model, quant, adapter, shard, data, train, logger, rig (see conf/). Every key and its default
is in fsdpqlora/config.py. Workers: one per visible GPU, or launch.cpu_workers on a CPU-only machine.
"""


# Commands beside training: name -> "module:function" taking the remaining arguments and returning
# the exit code. Imported only when used, so `fsdpqlora --help` stays fast.
COMMANDS: dict[str, str] = {
    "plan": "fsdpqlora.plan.command:main",
    "merge": "fsdpqlora.merge:main",
    "generate": "fsdpqlora.generate:main",
}


def worker_count(cfg) -> int:
    import torch

    gpus = torch.cuda.device_count()
    if cfg.launch.nproc_per_node:
        if gpus and cfg.launch.nproc_per_node > gpus:
            from fsdpqlora.errors import ConfigError

            raise ConfigError(f"launch.nproc_per_node={cfg.launch.nproc_per_node}: only {gpus} GPUs are visible")
        return cfg.launch.nproc_per_node
    return gpus or cfg.launch.cpu_workers


def prepare_run(overrides: list[str]) -> tuple[DictConfig, Path, int]:
    """Validate, locate model and data, create the run directory. Returns (config, its file, workers)."""
    import torch

    from fsdpqlora.config import (
        choose_run_dir,
        compose_config,
        model_max_positions,
        save_run_config,
        validate,
        validate_for_machine,
    )
    from fsdpqlora.data import build_batches, check_sources, pad_id_of, prepare
    from fsdpqlora.errors import ConfigError
    from fsdpqlora.families import family_of
    from fsdpqlora.model import check_prequantized, check_tokenizer, load_hf_config, resolve_model_dir
    from fsdpqlora.plan.command import check_launch
    from fsdpqlora.weights import checkpoint_entries

    cfg = compose_config(overrides)
    validate(cfg)
    validate_for_machine(cfg, torch.cuda.is_available())
    check_sources(cfg)  # before the model: a data mistake should not wait for a download or a build
    model_dir = resolve_model_dir(cfg)
    hf_config = load_hf_config(model_dir, cfg.model.trust_remote_code)
    family_of(hf_config)
    check_prequantized(cfg, hf_config, model_dir)
    checkpoint_entries(model_dir)
    tokenizer = check_tokenizer(model_dir)
    validate(cfg, model_max_positions(model_dir))
    nproc = worker_count(cfg)
    if cfg.shard.strategy == "hybrid_shard" and cfg.shard.hybrid_shard_size and nproc % cfg.shard.hybrid_shard_size:
        raise ConfigError(f"shard.hybrid_shard_size={cfg.shard.hybrid_shard_size}: must divide the {nproc} workers")
    check_launch(cfg, hf_config, nproc)  # refuses, naming the lever, what would run out of memory
    # Every row read, checked and tokenized once, into the cache the workers read, and enough of
    # them for a global batch of these workers.
    build_batches(cfg, prepare(cfg, tokenizer), 0, nproc, pad_id_of(tokenizer))
    # Last: a refused configuration leaves no run directory behind.
    return cfg, save_run_config(cfg, choose_run_dir(cfg)), nproc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE.format(commands=", ".join(["train", *COMMANDS])))
        return 0
    # A Hydra override always holds "=" (or starts with "~"), so a bare first word is a command.
    if argv[:1] == ["train"]:
        argv = argv[1:]
    elif argv and argv[0] in COMMANDS:
        import importlib

        module, function = COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    elif argv and "=" not in argv[0] and not argv[0].startswith(("~", "-")):
        print(f"fsdpqlora: error: unknown command {argv[0]!r}; commands: {', '.join(['train', *COMMANDS])}", file=sys.stderr)
        return 2
    return train(argv)


def train(argv: list[str]) -> int:
    """Validate, create the run directory, start torchrun and wait for the workers."""
    from fsdpqlora.errors import ConfigError, exit_on_user_error

    with exit_on_user_error():
        if "-m" in argv or "--multirun" in argv:
            raise ConfigError("multirun sweeps (-m) are not supported yet; run one configuration per command")
        cfg, config_file, nproc = prepare_run(argv)
    run_dir = config_file.parent
    print(f"[fsdpqlora] run directory: {run_dir}\n[fsdpqlora] starting {nproc} workers", flush=True)
    env = dict(os.environ)
    # torchrun defaults each worker to 1 thread and warns; give each worker an equal share of the
    # cores this process may use (the affinity mask: a SLURM job's allocation, not the whole node).
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={cfg.launch.max_restarts}",
        "-m", "fsdpqlora.train", "--config", str(config_file),
    ]  # fmt: skip
    try:
        code = subprocess.call(command, env=env)
    except KeyboardInterrupt:
        code = 130
    status = "finished" if code == 0 else f"failed (exit code {code})"
    print(f"[fsdpqlora] run {status}; run directory: {run_dir}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
