"""What the user sees: a progress bar, metrics in a JSON-lines file (and wandb or TensorBoard), their
plots (plots.py), peak memory."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from fsdpqlora.config import Config, LoggerKind, to_dict
from fsdpqlora.logs import log
from fsdpqlora.memory import peak_memory_gib
from fsdpqlora.parallel.process_group import Dist, all_reduce_max
from fsdpqlora.train.step import StepResult


class MetricsLogger:
    """Every rank decides alike which steps are logged (a logged step's peak memory is the maximum
    over ranks, a collective); rank 0 writes: a tqdm bar over steps, one JSON line per logged step
    and per evaluation, the log lines, wandb or TensorBoard when configured, and the plots at each
    evaluation and at the end."""

    def __init__(self, cfg: Config, run_dir: Path, d: Dist, start_step: int = 0):
        """`start_step` > 0 continues a resumed run: the records after it, written by the
        interrupted run after its last checkpoint, are dropped, since those steps run again."""
        self.every, self.last_step, self.d = cfg.train.log_every, cfg.train.max_steps, d
        self.window = LogWindow()
        self.file = self.bar = self.wandb = self.tensorboard = None
        self.run_dir, self.plots = run_dir, cfg.logger.plots
        if not d.is_main:
            return
        path = run_dir / "metrics.jsonl"
        kept = []
        if start_step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
        self.file = open(path, "w")
        self.file.writelines(line + "\n" for line in kept)
        self.file.flush()
        self.bar = tqdm(total=self.last_step, initial=start_step, desc="train", unit="step", file=sys.stdout, dynamic_ncols=True)
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
        if cfg.logger.kind == LoggerKind.tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: a resumed run drops the events after its checkpoint, as metrics.jsonl does.
            purge_step = start_step + 1 if start_step else None
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def log_step(self, step: int, result: StepResult, slots: float, lr: float, epoch: float) -> dict[str, float] | None:
        """Count the step into the log window; on a log step, write and return the record (the
        loss in it is the window's), else None. Called on every rank."""
        if result.finite:
            self.window.add(result, slots)
        else:
            log.info(f"step {step:>5}  skipped: loss {result.loss} grad_norm {result.grad_norm} (not finite)")
        if not self.due(step):
            return None
        peak_mem_gib = all_reduce_max(peak_memory_gib(self.d.device), self.d.device)
        record = {**result.record(), **self.window.summary(), "lr": lr, "peak_mem_gib": peak_mem_gib, "epoch": epoch}
        self.window = LogWindow()
        if self.file is not None:
            self._write(step, record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            log.info(
                f"step {step:>5}  loss {record['loss']:.4f}  lr {lr:.2e}  grad_norm {record['grad_norm']:.3f}  "
                f"tok/s {record['tokens_per_s']:.0f}  peak_mem (max over ranks) {peak_mem_gib:.2f} GiB"
            )
        return record

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.file is not None:
            self._write(step, metrics)
            log.info(f"step {step:>5}  eval loss {metrics['eval_loss']:.4f} over {metrics['eval_tokens']:.0f} target tokens")
            if self.tensorboard is not None:
                self.tensorboard.flush()
            self.plot()

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(f"{'eval' if key.startswith('eval_') else 'train'}/{key}", value, step)

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training, left out of tokens/s."""
        self.window.exclude(seconds)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.file is None:
            return
        self.bar.close()
        self.file.close()
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def plot(self) -> None:
        """Redraw <run>/plots/metrics.png; a failure is a warning, never the run's end."""
        from fsdpqlora.train.plots import plot_run

        if not self.plots:
            return
        try:
            plot_run(self.run_dir)
        except Exception as exc:
            log.warning(f"[fsdpqlora] warning: plots/metrics.png not drawn: {type(exc).__name__}: {exc}")


class LogWindow:
    """The steps since the last log line: their loss weighted by target tokens (so the printed
    curve is not the noise of one batch), tokens/s over training time only, and padding."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = self.slots = self.loss_sum = self.targets = 0.0

    def add(self, result: StepResult, slots: float) -> None:
        self.tokens += result.tokens
        self.slots += slots
        self.loss_sum += result.loss * result.target_tokens
        self.targets += result.target_tokens

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training (evaluation, a checkpoint)."""
        self.start += seconds

    def summary(self) -> dict[str, float]:
        return {
            "loss": self.loss_sum / self.targets if self.targets else float("nan"),
            "tokens_per_s": self.tokens / (time.perf_counter() - self.start),
            "padding": 1.0 - self.tokens / self.slots if self.slots else 0.0,
        }
