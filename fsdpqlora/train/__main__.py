"""The worker: one process per GPU (or CPU worker), started by torchrun.

    torchrun --nproc-per-node 2 -m fsdpqlora.train model=tiny train.max_steps=20
    torchrun --nproc-per-node 2 -m fsdpqlora.train --config outputs/<run>/config.yaml   (the launcher's way)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fsdpqlora.config import Config, choose_run_dir, compose_config, load_config_file, save_run_config
from fsdpqlora.data import load_data
from fsdpqlora.errors import ConfigError, TrainingDiverged, exit_on_user_error
from fsdpqlora.memory import peak_memory_gib
from fsdpqlora.model import adapters
from fsdpqlora.model.build import build_model
from fsdpqlora.model.directory import check_tokenizer
from fsdpqlora.parallel.process_group import Dist, all_reduce_max, init_distributed, on_rank0
from fsdpqlora.preflight import preflight
from fsdpqlora.train.checkpoint import Checkpointer
from fsdpqlora.train.evaluate import evaluation_loss
from fsdpqlora.train.metrics import LogWindow, MetricsLogger
from fsdpqlora.train.optim import build_optimizer, build_scheduler
from fsdpqlora.train.preemption import REQUEUE_EXIT_CODE, StopRequests
from fsdpqlora.train.step import build_grad_scaler, train_step
from fsdpqlora.weights import load as loading


def load_cfg(argv: list[str]) -> Config:
    if argv[:1] == ["--config"]:
        return load_config_file(argv[1])
    return compose_config(argv)


def agree_run_dir(cfg: Config, d: Dist) -> Path:
    """One run directory for all ranks: the configured one, or a timestamped one that rank 0
    names and broadcasts (each rank reading the clock itself would give each its own). Workers
    that torchrun restarts after a failure get the directory their first start chose, and so
    resume in it."""
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
    run_dir = chosen[0]
    if d.is_main:
        save_run_config(cfg, run_dir)
    dist.barrier()
    return run_dir


def resume_point(cfg: Config, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint to start from, per checkpoint.resume."""
    if cfg.checkpoint.resume == "auto":
        return checkpointer.latest()
    if cfg.checkpoint.resume == "never":
        if checkpointer.latest() is not None:
            raise ConfigError(
                f"checkpoint.resume=never: {checkpointer.root} already holds checkpoints of a run; "
                "choose another launch.run_dir, or resume it with checkpoint.resume=auto"
            )
        return None
    path = Path(cfg.checkpoint.resume).expanduser()
    if not (path / "meta.json").is_file():
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r}: not a complete checkpoint directory")
    return path


def run(cfg: Config, d: Dist) -> tuple[Path, int]:
    """Train; returns the run directory and the process's exit code (0, or REQUEUE_EXIT_CODE
    when a stop signal ended the run after a checkpoint)."""
    # On rank 0 only: it builds `tiny` or downloads, once; a refusal there reaches every rank.
    model_dir = on_rank0(lambda: preflight(cfg, torch.cuda.is_available()).model_dir)
    run_dir = agree_run_dir(cfg, d)
    torch.manual_seed(cfg.train.seed)
    stop = StopRequests()  # from here on, a stop signal waits for the next step boundary

    data = load_data(cfg, d, check_tokenizer(model_dir))
    batches = data.train

    built = build_model(cfg, d, model_dir)
    model = built.model
    load_summary = loading.summary(built.load, built.load_seconds, d, model_dir)
    optimizer = build_optimizer(cfg, model)  # right after sharding (trap B)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = build_grad_scaler(cfg, d)

    checkpointer = Checkpointer(cfg, run_dir, d)
    checkpointer.remove_partial()
    start_step, resumed_from, changed = 0, None, []
    if (path := resume_point(cfg, checkpointer)) is not None:
        restored = checkpointer.restore(path, model, optimizer, scheduler, scaler)
        batches.load_state_dict(restored.data_state)
        start_step, resumed_from, changed = restored.step, path, restored.changed_keys
    if d.is_main:
        n_trainable = sum(p.numel() for _, p in adapters.lora_parameters(model))
        print(load_summary, flush=True)
        print(data.summary, flush=True)
        print(
            f"[fsdpqlora] {n_trainable:,} trainable parameters; {d.world_size} workers, shard={cfg.shard.strategy}",
            flush=True,
        )
        if resumed_from is not None:
            print(f"[fsdpqlora] resumed from {resumed_from} at step {start_step}", flush=True)
            if changed:
                print(f"[fsdpqlora] warning: changed since that checkpoint: {', '.join(changed)}; "
                      "the run continues, but not as it would have without the interruption", flush=True)  # fmt: skip

    logger = MetricsLogger(cfg, run_dir, cfg.train.max_steps, start_step) if d.is_main else None
    started = time.perf_counter()
    window = LogWindow()
    total_tokens, excluded_seconds, skipped = 0.0, 0.0, 0
    first_loss, last_loss, saved_step = None, None, start_step if resumed_from else None
    eval_losses = []
    exit_code = 0
    for step in range(start_step, cfg.train.max_steps):
        done = step + 1
        lr = optimizer.param_groups[0]["lr"]
        metrics = train_step(model, optimizer, scheduler, batches.next_step(), cfg, d, scaler)
        if not metrics.pop("finite"):
            if cfg.checkpoint.on_nonfinite == "stop":
                last_good = checkpointer.latest()
                raise TrainingDiverged(
                    f"step {done}: the loss ({metrics['loss']}) or the gradient norm ({metrics['grad_norm']}) is not "
                    f"finite; stopped before the optimizer step. Last good checkpoint: {last_good or 'none'}. "
                    "A lower train.lr often helps; checkpoint.on_nonfinite=skip skips such steps"
                )
            skipped += 1
            if logger:
                logger.note(f"step {done:>5}  skipped: loss {metrics['loss']} grad_norm {metrics['grad_norm']} (not finite)")
        else:
            total_tokens += metrics["tokens"]
            window.add(metrics, batches.last_step.slots)
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            metrics.update(
                window.summary(),
                lr=lr,
                peak_mem_gib=all_reduce_max(peak_memory_gib(d.device), d.device),
                epoch=batches.epochs_done,
            )
            window = LogWindow()
            first_loss = metrics["loss"] if first_loss is None else first_loss
            last_loss = metrics["loss"]
            if logger:
                logger.log(done, metrics)
        every = cfg.train.eval_every
        if data.eval is not None and ((every and done % every == 0) or done == cfg.train.max_steps):
            eval_started = time.perf_counter()
            eval_losses.append(evaluation_loss(model, data.eval, d))
            window.exclude(spent := time.perf_counter() - eval_started)
            excluded_seconds += spent
            if logger:
                logger.log_eval(done, eval_losses[-1])
        if logger:
            logger.advance()
        if (signal_name := stop.requested(d)) or checkpointer.due(done):
            save_started = time.perf_counter()
            path = checkpointer.save(done, model, optimizer, scheduler, batches.state_dict(), scaler)
            window.exclude(spent := time.perf_counter() - save_started)
            excluded_seconds += spent
            saved_step = done
            if logger:
                logger.note(f"step {done:>5}  checkpoint: {path}")
            if signal_name:
                if logger:
                    logger.note(f"[fsdpqlora] {signal_name}: stopped after step {done}; the same command resumes the run")
                exit_code = REQUEUE_EXIT_CODE
                break
    elapsed = time.perf_counter() - started

    if exit_code == 0 and saved_step != cfg.train.max_steps:
        checkpointer.save(cfg.train.max_steps, model, optimizer, scheduler, batches.state_dict(), scaler)
    adapter_dir = run_dir / "adapter"
    state = adapters.gather_adapter_state(model)
    if d.is_main and exit_code == 0:
        adapters.save_adapter(model, state, adapter_dir)
    peaks = [None] * d.world_size
    dist.all_gather_object(peaks, peak_memory_gib(d.device))
    if logger:
        logger.close()
        if exit_code == 0:
            print_summary(cfg, d, start_step, elapsed - excluded_seconds, total_tokens, first_loss, last_loss,
                          eval_losses, skipped, peaks, adapter_dir, run_dir)  # fmt: skip
    return run_dir, exit_code


def print_summary(cfg, d, start_step, train_seconds, total_tokens, first_loss, last_loss, eval_losses, skipped, peaks,
                  adapter_dir, run_dir) -> None:  # fmt: skip
    steps = cfg.train.max_steps - start_step
    memory_kind = "CUDA" if d.device.type == "cuda" else "host RSS"
    lines = [f"\n[fsdpqlora] done: {steps} steps" + (f" (from step {start_step})" if start_step else "")]
    if first_loss is not None:
        lines[0] += (f" in {train_seconds:.1f}s, loss {first_loss:.4f} -> {last_loss:.4f}, "
                     f"{total_tokens / max(train_seconds, 1e-9):.0f} tokens/s over {d.world_size} workers")  # fmt: skip
    if skipped:
        lines.append(f"[fsdpqlora] {skipped} steps skipped: loss or gradient not finite")
    if eval_losses:
        first_eval, last_eval = eval_losses[0]["eval_loss"], eval_losses[-1]["eval_loss"]
        lines.append(f"[fsdpqlora] eval loss {first_eval:.4f}" + (f" -> {last_eval:.4f}" if len(eval_losses) > 1 else ""))
    lines.append(f"[fsdpqlora] peak memory per rank ({memory_kind}): " + ", ".join(f"rank {r}: {p:.2f} GiB" for r, p in enumerate(peaks)))
    lines.append(f"[fsdpqlora] adapter: {adapter_dir}\n[fsdpqlora] metrics: {run_dir / 'metrics.jsonl'}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_user_error():
        cfg = load_cfg(argv)
        d = init_distributed()
        try:
            run_dir, exit_code = run(cfg, d)
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
                show_generation(cfg, run_dir)
            except Exception as exc:  # the adapter is saved; a failed sample must not fail the run
                print(f"[fsdpqlora] generation skipped: {type(exc).__name__}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    # End here, without the interpreter's teardown: gloo's C++ threads can outlive the process group
    # and abort the process while Python finalizes ("terminate called without an active
    # exception", SIGABRT after a finished run), which torchrun reports as a failed worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
