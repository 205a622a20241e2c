"""The training run, top to bottom: set-up (run directory, data, model, optimizer, checkpoints,
resume), the loop, the last checkpoint and the adapter, the summary. Every rank runs all of it."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fsdpqlora.config import Config, OnNonfinite, choose_run_dir, save_run_config
from fsdpqlora.data import load_data, tokenizer_for_export
from fsdpqlora.errors import TrainingDiverged, UserError
from fsdpqlora.logs import log, plural
from fsdpqlora.memory import peak_memory_gib
from fsdpqlora.model import adapters
from fsdpqlora.model.build import build_model
from fsdpqlora.model.directory import check_tokenizer
from fsdpqlora.parallel.process_group import Dist, on_rank0
from fsdpqlora.plan.checkpointing import with_auto_settings
from fsdpqlora.plan.length import with_max_steps
from fsdpqlora.plan.rig import measure
from fsdpqlora.preflight import check_run_dir, preflight
from fsdpqlora.rundir import LOCKED_BY_LAUNCHER_ENV, lock_run_dir
from fsdpqlora.train.checkpoint import Checkpointer, write_final_adapter
from fsdpqlora.train.determinism import make_deterministic
from fsdpqlora.train.evaluate import Evaluator
from fsdpqlora.train.metrics import MetricsLogger
from fsdpqlora.train.optim import build_optimizer, build_scheduler
from fsdpqlora.train.preemption import REQUEUE_EXIT_CODE, StopRequests, signal_name
from fsdpqlora.train.step import StepResult, build_grad_scaler, train_step
from fsdpqlora.weights import load as loading


@dataclass
class RunStats:
    """What the run's summary reports, gathered as it goes."""

    start_step: int = 0
    resumed_from: Path | None = None
    saved_step: int | None = None  # the last checkpoint's step
    tokens: float = 0.0  # trained on, over all ranks; skipped steps not counted
    skipped: int = 0  # steps whose loss or gradient was not finite
    first_loss: float | None = None  # of the first and the last log line
    last_loss: float | None = None
    eval_losses: list[dict[str, float]] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    excluded_seconds: float = 0.0  # spent on evaluations and checkpoints
    peak_mem_gib: list[float] = field(default_factory=list)  # per rank, at the end

    @property
    def train_seconds(self) -> float:
        return self.elapsed_seconds - self.excluded_seconds

    def note_logged_loss(self, loss: float) -> None:
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss


class Trainer:
    def __init__(self, cfg: Config, d: Dist):
        self.d = d
        # First: a stop signal from here on waits for the next step boundary (and its checkpoint).
        self.stop = StopRequests()
        # On rank 0 only: it builds `tiny` or downloads, once; a refusal there reaches every rank.
        # The launcher hands over a configuration with its lengths resolved; plain torchrun does not.
        model_dir, cfg = on_rank0(lambda: checked_with_auto_settings(cfg, d))
        self.cfg, self.model_dir = cfg, model_dir
        self.run_dir = agree_run_dir(cfg, d)
        if cfg.train.deterministic:
            make_deterministic()  # before the first product on the GPU: cuBLAS reads its setting once
        self.run_lock = None  # rank 0's share of the run directory's lock, held while the process lives
        self.resume_from = on_rank0(self.claim_run_dir)
        torch.manual_seed(cfg.train.seed)

        tokenizer = check_tokenizer(model_dir)
        self.data = load_data(cfg, d, tokenizer)
        self.batches = self.data.train
        if not cfg.train.max_steps:
            cfg = with_max_steps(cfg, self.batches.steps_per_epoch)
            if d.is_main:
                save_run_config(cfg, self.run_dir)
        self.cfg = cfg
        built = build_model(cfg, d, model_dir)
        self.model = built.model
        load_summary = loading.summary(built.load, built.load_seconds, d, model_dir)
        self.optimizer = build_optimizer(cfg, self.model)  # right after sharding (trap B)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = build_grad_scaler(cfg, d)
        self.checkpointer = Checkpointer(cfg, self.run_dir, d)
        self.evaluator = Evaluator(cfg, self.data.eval, d, tokenizer)

        self.stats = RunStats()
        changed = self.resume()
        self.announce(load_summary, changed)
        self.logger = MetricsLogger(cfg, self.run_dir, d, self.stats.start_step)

    def claim_run_dir(self) -> Path | None:
        """On rank 0, before anything is loaded or written: refuse what cannot work (a run directory
        that cannot be written or that a live run holds, a resume that would be refused), then lock
        the directory and record the configuration in it. The checkpoint to resume from, or None."""
        run_dir = self.run_dir
        under_launcher = os.environ.get(LOCKED_BY_LAUNCHER_ENV) == str(run_dir)
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        resume_from = check_run_dir(self.cfg, run_dir, under_launcher, restarted)
        self.run_lock = lock_run_dir(run_dir, joining=under_launcher)
        save_run_config(self.cfg, run_dir)
        return resume_from

    def resume(self) -> list[str]:
        """Continue from the checkpoint chosen before the model loaded (claim_run_dir), if any;
        returns the settings changed since that checkpoint that alter the run's trajectory."""
        self.checkpointer.remove_partial()
        path = self.resume_from
        if path is None:
            return []
        restored = self.checkpointer.restore(path, self.model, self.optimizer, self.scheduler, self.scaler)
        self.batches.load_state_dict(restored.data_state)
        self.stats.start_step = self.stats.saved_step = restored.step
        self.stats.resumed_from = path
        return restored.changed_keys

    def announce(self, load_summary: str, changed: list[str]) -> None:
        if not self.d.is_main:
            return
        n_trainable = sum(p.numel() for _, p in adapters.lora_parameters(self.model))
        log.info(load_summary)
        log.info(self.data.summary)
        log.info(f"[fsdpqlora] {n_trainable:,} trainable parameters; {plural(self.d.world_size, 'worker')}, shard={self.cfg.shard.strategy}")
        if self.stats.resumed_from is not None:
            log.info(f"[fsdpqlora] resumed from {self.stats.resumed_from} at step {self.stats.start_step}")
            if changed:
                log.warning(f"[fsdpqlora] warning: changed since that checkpoint: {', '.join(changed)}; "
                            "the run continues, but not as it would have without the interruption")  # fmt: skip

    def run(self) -> int:
        """Train; the process's exit code: 0, or REQUEUE_EXIT_CODE when a stop signal ended the run
        after a checkpoint."""
        started = time.perf_counter()
        try:
            stopped = self.train()
        except UserError:  # a diverged loss, a full disk: the progress bar ends its line before the error's
            self.logger.close()
            raise
        self.stats.elapsed_seconds = time.perf_counter() - started
        if stopped:
            self.logger.close()
            return REQUEUE_EXIT_CODE
        self.finish()
        return 0

    def train(self) -> bool:
        """The loop; whether a stop signal ended it (after a checkpoint)."""
        stats, batches = self.stats, self.batches
        for step in range(stats.start_step + 1, self.cfg.train.max_steps + 1):  # counted from 1
            lr = self.optimizer.param_groups[0]["lr"]
            micro_batches = batches.next_step()
            result = train_step(self.model, self.optimizer, self.scheduler, micro_batches, batches.last_step.targets,
                                self.cfg, self.d, self.scaler, self.stop, self.checkpointer.seconds_since_save)  # fmt: skip
            if result.finite:
                stats.tokens += result.tokens
            else:
                self.skip_or_stop(step, result)
            if record := self.logger.log_step(step, result, batches.last_step.slots, lr, batches.epochs_done):
                stats.note_logged_loss(record["loss"])
            with self.excluded_from_training_time():  # the evaluation, its samples and the plots it redraws
                evaluation = self.evaluator.maybe_evaluate(step, self.model)
                if evaluation is not None:
                    stats.eval_losses.append(evaluation)
                    self.logger.log_eval(step, evaluation)
            self.logger.advance()
            with self.excluded_from_training_time():
                saved = self.checkpointer.maybe_save(step, result.seconds_since_save, self.model, self.optimizer,
                                                     self.scheduler, batches, self.scaler, force=bool(result.stop_signal))  # fmt: skip
            if saved is not None:
                stats.saved_step = step
                log.info(f"step {step:>5}  checkpoint: {saved}")
            if result.stop_signal:
                name = signal_name(result.stop_signal)
                log.info(f"[fsdpqlora] {name}: stopped after step {step}, checkpoint saved; "
                         f"the same command with launch.run_dir={self.run_dir} resumes the run")  # fmt: skip
                return True
        return False

    def skip_or_stop(self, step: int, result: StepResult) -> None:
        """A step whose loss or gradient norm is not finite was not applied: count it, or stop the run
        (checkpoint.on_nonfinite)."""
        if self.cfg.checkpoint.on_nonfinite == OnNonfinite.stop:
            last_good = self.checkpointer.latest()
            raise TrainingDiverged(
                f"step {step}: the loss ({result.loss}) or the gradient norm ({result.grad_norm}) is not "
                f"finite; stopped before the optimizer step. Last good checkpoint: {last_good or 'none'}. "
                "A lower train.lr often helps; checkpoint.on_nonfinite=skip skips such steps"
            )
        self.stats.skipped += 1

    @contextlib.contextmanager
    def excluded_from_training_time(self):
        """Time on something other than training steps (evaluation, checkpoints), left out of tokens/s."""
        started = time.perf_counter()
        yield
        spent = time.perf_counter() - started
        self.logger.exclude(spent)
        self.stats.excluded_seconds += spent

    def finish(self) -> None:
        """The last checkpoint (unless the last step saved one), the adapter, the summary."""
        last = self.cfg.train.max_steps
        if self.stats.saved_step != last:
            self.checkpointer.save(last, self.model, self.optimizer, self.scheduler, self.batches, self.scaler)
        write_final_adapter(self.model, self.run_dir / "adapter", self.checkpointer.latest(), self.d,
                            lambda: tokenizer_for_export(self.cfg, self.model_dir))  # with the chat template training used
        peaks = [None] * self.d.world_size
        dist.all_gather_object(peaks, peak_memory_gib(self.d.device))
        self.stats.peak_mem_gib = peaks
        self.logger.close()
        if self.d.is_main:
            print_summary(self.stats, self.cfg, self.d, self.run_dir)


def print_summary(stats: RunStats, cfg: Config, d: Dist, run_dir: Path) -> None:
    steps = cfg.train.max_steps - stats.start_step
    memory_kind = "CUDA" if d.device.type == "cuda" else "host RSS"
    lines = [f"\n[fsdpqlora] done: {plural(steps, 'step')}" + (f" (from step {stats.start_step})" if stats.start_step else "")]
    if stats.first_loss is not None:
        train_seconds = stats.train_seconds
        lines[0] += (f" in {train_seconds:.1f}s, loss {stats.first_loss:.4f} -> {stats.last_loss:.4f}, "
                     f"{stats.tokens / max(train_seconds, 1e-9):.0f} tokens/s over {plural(d.world_size, 'worker')}")  # fmt: skip
    if stats.skipped:
        lines.append(f"[fsdpqlora] {plural(stats.skipped, 'step')} skipped: loss or gradient not finite")
    if evals := stats.eval_losses:
        first_eval, last_eval = evals[0]["eval_loss"], evals[-1]["eval_loss"]
        lines.append(f"[fsdpqlora] eval loss {first_eval:.4f}" + (f" -> {last_eval:.4f}" if len(evals) > 1 else ""))
    peaks = ", ".join(f"rank {r}: {p:.2f} GiB" for r, p in enumerate(stats.peak_mem_gib))
    lines.append(f"[fsdpqlora] peak memory per rank ({memory_kind}): {peaks}")
    lines.append(f"[fsdpqlora] adapter: {run_dir / 'adapter'}\n[fsdpqlora] metrics: {run_dir / 'metrics.jsonl'}")
    log.info("\n".join(lines))


def checked_with_auto_settings(cfg: Config, d: Dist) -> tuple[Path, Config]:
    """The preflight's model directory, and `cfg` with data.seq_len=0 and shard.checkpoint_every=0
    resolved for this machine."""
    checked = preflight(cfg, d.device.type == "cuda")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    rig = measure(cfg, per_node, d.world_size // per_node)
    return checked.model_dir, with_auto_settings(cfg, checked.hf_config, rig)


def agree_run_dir(cfg: Config, d: Dist) -> Path:
    """One run directory for all ranks (nothing written in it yet): the configured one, or a
    timestamped one that rank 0 names and broadcasts (each rank reading the clock itself would give
    each its own). Workers that torchrun restarts after a failure get the directory their first
    start chose, and so resume in it."""
    chosen = [None]
    if d.is_main:
        chosen[0] = choose_run_dir(cfg)
        elastic_run = os.environ.get("TORCHELASTIC_RUN_ID")
        if not cfg.launch.run_dir and elastic_run:
            record = Path(cfg.launch.cache_dir).expanduser() / "torchelastic-runs" / elastic_run
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and record.is_file():
                chosen[0] = Path(record.read_text())
            else:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(str(chosen[0]))
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]
