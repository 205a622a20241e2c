"""The worker: one process per GPU (or CPU worker), started by torchrun.

    torchrun --nproc-per-node 2 -m fsdpqlora.train model=tiny train.max_steps=20
    torchrun --nproc-per-node 2 -m fsdpqlora.train --config outputs/<run>/config.yaml   (the launcher's way)
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch.distributed as dist

from fsdpqlora.config import Config, compose_config, load_config_file
from fsdpqlora.errors import exit_on_user_error
from fsdpqlora.launcher.cli import LAUNCHED_BY
from fsdpqlora.logs import configure_logging, kept_in, log, record_command
from fsdpqlora.parallel.process_group import init_distributed
from fsdpqlora.train.preemption import stop_with_parent
from fsdpqlora.train.trainer import Trainer


def load_cfg(argv: list[str]) -> Config:
    if argv[:1] == ["--config"]:
        return load_config_file(argv[1])
    return compose_config(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop_with_parent()
    with exit_on_user_error():
        cfg = load_cfg(argv)
        d = init_distributed(cfg.launch)
        configure_logging(d.rank)
        try:
            trainer = Trainer(cfg, d)
            with kept_in(trainer.run_dir / "train.log") if d.is_main else contextlib.nullcontext():
                if d.is_main and LAUNCHED_BY not in os.environ:
                    record_started_by_torchrun(trainer.run_dir, argv, d)
                exit_code = trainer.run()
                # Every rank finishes its collectives before any tears the group down; a rank that
                # destroys it while a peer is still in one can abort the peer's process.
                dist.barrier()
                dist.destroy_process_group()
                if d.is_main and not exit_code:
                    end_of_run_sample(cfg, trainer)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return exit_code


def record_started_by_torchrun(run_dir, argv: list[str], d) -> None:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    nodes = ["--nnodes", str(d.world_size // local)] if d.world_size > local else []
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    how = "a worker under torchrun (its rendezvous options are not recorded)"
    how += f", restart {restart}" if restart else ""
    record_command(run_dir, ["torchrun", *nodes, "--nproc-per-node", str(local), "-m", "fsdpqlora.train", *argv], how)


def end_of_run_sample(cfg: Config, trainer: Trainer) -> None:
    """generate.prompt, or the prompt of an evaluation example, answered with the saved adapter."""
    from fsdpqlora.export.generate import show_generation

    if not (cfg.generate.prompt or cfg.generate.at_end) or not cfg.generate.max_new_tokens:
        return
    try:
        show_generation(cfg, trainer.run_dir, trainer.data.eval)
    except Exception as exc:  # the adapter is saved; a failed sample must not fail the run
        log.warning(f"[fsdpqlora] generation skipped: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    code = main()
    # End here, without the interpreter's teardown: gloo's C++ threads can outlive the process group
    # and abort the process while Python finalizes ("terminate called without an active
    # exception", SIGABRT after a finished run), which torchrun reports as a failed worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
