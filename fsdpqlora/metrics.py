"""What the user sees: a progress bar, metrics in a JSON-lines file (and wandb), peak memory."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm


def peak_host_rss_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_host_rss_gib()


class MetricsLogger:
    """Rank 0 only: a tqdm bar over steps, one JSON line per logged step, wandb when configured."""

    def __init__(self, cfg: DictConfig, run_dir: Path, total_steps: int):
        self.file = open(run_dir / "metrics.jsonl", "w")
        self.bar = tqdm(total=total_steps, desc="train", unit="step", file=sys.stdout, dynamic_ncols=True)
        self.wandb = None
        if cfg.logger.kind == "wandb":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logger.project,
                mode=cfg.logger.mode,
                dir=str(run_dir),
                name=run_dir.name,
                config=OmegaConf.to_container(cfg, resolve=True),
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        self.bar.write(
            f"step {step:>5}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  grad_norm {metrics['grad_norm']:.3f}  "
            f"tok/s {metrics['tokens_per_s']:.0f}  peak_mem (max over ranks) {metrics['peak_mem_gib']:.2f} GiB"
        )

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.bar.write(f"step {step:>5}  eval loss {metrics['eval_loss']:.4f} over {metrics['eval_tokens']:.0f} target tokens")

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
