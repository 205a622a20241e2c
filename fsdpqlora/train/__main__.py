"""The worker: one process per GPU (or CPU worker), started by torchrun.

    torchrun --nproc-per-node 2 -m fsdpqlora.train model=tiny train.max_steps=20
    torchrun --nproc-per-node 2 -m fsdpqlora.train --config outputs/<run>/config.yaml   (the launcher's way)
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from fsdpqlora.config import Config, compose_config, load_config_file
from fsdpqlora.errors import exit_on_user_error
from fsdpqlora.logs import configure_logging, log
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
            exit_code = trainer.run()
            # Every rank finishes its collectives before any tears the group down; a rank that
            # destroys it while a peer is still in one can abort the peer's process.
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if exit_code:
            return exit_code
        if d.is_main and cfg.generate.prompt and cfg.generate.max_new_tokens:
            from fsdpqlora.export.generate import show_generation

            try:
                show_generation(cfg, trainer.run_dir)
            except Exception as exc:  # the adapter is saved; a failed sample must not fail the run
                log.warning(f"[fsdpqlora] generation skipped: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    code = main()
    # End here, without the interpreter's teardown: gloo's C++ threads can outlive the process group
    # and abort the process while Python finalizes ("terminate called without an active
    # exception", SIGABRT after a finished run), which torchrun reports as a failed worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
