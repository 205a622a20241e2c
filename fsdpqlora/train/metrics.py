"""What the user sees: a progress bar, metrics in a JSON-lines file (and wandb), peak memory."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from fsdpqlora.config import Config, LoggerKind, to_dict


class MetricsLogger:
    """Rank 0 only: a tqdm bar over steps, one JSON line per logged step, wandb when configured."""

    def __init__(self, cfg: Config, run_dir: Path, total_steps: int, start_step: int = 0):
        """`start_step` > 0 continues a resumed run: the records after it, written by the
        interrupted run after its last checkpoint, are dropped, since those steps run again."""
        path = run_dir / "metrics.jsonl"
        kept = []
        if start_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
        self.file = open(path, "w")
        self.file.writelines(line + "\n" for line in kept)
        self.file.flush()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stdout, dynamic_ncols=True)
        self.wandb = None
        if cfg.logger.kind == LoggerKind.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logger.project,
                mode=cfg.logger.mode,
                dir=str(run_dir),
                name=run_dir.name,
                # One wandb run per run directory, continued when the training resumes.
                id=hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16],
                resume="allow",
                config=to_dict(cfg),
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

    def note(self, text: str) -> None:
        self.bar.write(text)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class LogWindow:
    """The steps since the last log line: their loss weighted by target tokens (so the printed
    curve is not the noise of one batch), tokens/s over training time only, and padding."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = self.slots = self.loss_sum = self.targets = 0.0

    def add(self, metrics: dict[str, float], slots: float) -> None:
        self.tokens += metrics["tokens"]
        self.slots += slots
        self.loss_sum += metrics["loss"] * metrics["target_tokens"]
        self.targets += metrics["target_tokens"]

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training (evaluation, a checkpoint)."""
        self.start += seconds

    def summary(self) -> dict[str, float]:
        return {
            "loss": self.loss_sum / self.targets if self.targets else float("nan"),
            "tokens_per_s": self.tokens / (time.perf_counter() - self.start),
            "padding": 1.0 - self.tokens / self.slots if self.slots else 0.0,
        }
