"""The worker: one process per GPU (or CPU worker), started by torchrun.

    torchrun --nproc-per-node 2 -m fsdpqlora.train model=tiny train.max_steps=20
    torchrun --nproc-per-node 2 -m fsdpqlora.train --config outputs/<run>/config.yaml   (the launcher's way)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from fsdpqlora import adapters, loading
from fsdpqlora.build import build_model
from fsdpqlora.config import (
    choose_run_dir,
    compose_config,
    load_config_file,
    model_max_positions,
    save_run_config,
    validate,
)
from fsdpqlora.data import load_data
from fsdpqlora.distributed import Dist, all_reduce_max, init_distributed, on_rank0
from fsdpqlora.errors import exit_on_user_error
from fsdpqlora.evaluate import evaluation_loss
from fsdpqlora.metrics import MetricsLogger, peak_memory_gib
from fsdpqlora.model import check_tokenizer, resolve_model_dir
from fsdpqlora.optim import build_optimizer, build_scheduler
from fsdpqlora.step import train_step


def load_cfg(argv: list[str]) -> DictConfig:
    if argv[:1] == ["--config"]:
        return load_config_file(argv[1])
    return compose_config(argv)


def agree_run_dir(cfg: DictConfig, d: Dist) -> Path:
    """One run directory for all ranks: the configured one, or a timestamped one that rank 0
    names and broadcasts (each rank reading the clock itself would give each its own)."""
    chosen = [choose_run_dir(cfg)]
    dist.broadcast_object_list(chosen, src=0)
    run_dir = chosen[0]
    if d.is_main:
        save_run_config(cfg, run_dir)
    dist.barrier()
    return run_dir


def run(cfg: DictConfig, d: Dist) -> Path:
    validate(cfg)
    model_dir = on_rank0(lambda: resolve_model_dir(cfg))  # builds `tiny` or downloads, once
    validate(cfg, model_max_positions(model_dir))
    run_dir = agree_run_dir(cfg, d)
    torch.manual_seed(cfg.train.seed)

    data = load_data(cfg, d, check_tokenizer(model_dir))
    batches = data.train

    built = build_model(cfg, d, model_dir)
    model = built.model
    load_summary = loading.summary(built.load, built.load_seconds, d, model_dir)
    optimizer = build_optimizer(cfg, model)  # right after sharding (trap B)
    scheduler = build_scheduler(cfg, optimizer)
    if d.is_main:
        n_trainable = sum(p.numel() for _, p in adapters.lora_parameters(model))
        print(load_summary, flush=True)
        print(data.summary, flush=True)
        print(
            f"[fsdpqlora] {n_trainable:,} trainable parameters; {d.world_size} workers, shard={cfg.shard.strategy}",
            flush=True,
        )

    logger = MetricsLogger(cfg, run_dir, cfg.train.max_steps) if d.is_main else None
    started = time.perf_counter()
    new_window = {"tokens": 0.0, "slots": 0.0, "loss_sum": 0.0, "targets": 0.0}
    window = {"start": started, **new_window}
    total_tokens = 0.0
    metrics: dict[str, float] = {}
    first_loss = None
    eval_losses, eval_seconds = [], 0.0
    for step in range(cfg.train.max_steps):
        lr = scheduler.get_last_lr()[0]
        metrics = train_step(model, optimizer, scheduler, batches.next_step(), cfg, d)
        total_tokens += metrics["tokens"]
        window["tokens"] += metrics["tokens"]
        window["slots"] += batches.last_step.slots
        window["loss_sum"] += metrics["loss"] * metrics["target_tokens"]
        window["targets"] += metrics["target_tokens"]
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.max_steps:
            now = time.perf_counter()
            metrics.update(
                # token-weighted over the steps since the last log line, so the printed curve is
                # not the noise of one batch
                loss=window["loss_sum"] / window["targets"],
                lr=lr,
                tokens_per_s=window["tokens"] / (now - window["start"]),
                padding=1.0 - window["tokens"] / window["slots"],
                peak_mem_gib=all_reduce_max(peak_memory_gib(d.device), d.device),
                epoch=batches.epochs_done,
            )
            window = {"start": now, **new_window}
            first_loss = metrics["loss"] if first_loss is None else first_loss
            if logger:
                logger.log(step + 1, metrics)
        every = cfg.train.eval_every
        if data.eval is not None and ((every and (step + 1) % every == 0) or step + 1 == cfg.train.max_steps):
            eval_started = time.perf_counter()
            eval_losses.append(evaluation_loss(model, data.eval, d))
            spent = time.perf_counter() - eval_started
            eval_seconds += spent
            window["start"] += spent  # tokens/s counts training time only
            if logger:
                logger.log_eval(step + 1, eval_losses[-1])
        if logger:
            logger.advance()
    elapsed = time.perf_counter() - started

    adapter_dir = run_dir / "adapter"
    state = adapters.gather_adapter_state(model)
    if d.is_main:
        adapters.save_adapter(model, state, adapter_dir)
    peaks = [None] * d.world_size
    dist.all_gather_object(peaks, peak_memory_gib(d.device))
    if logger:
        logger.close()
        memory_kind = "CUDA" if d.device.type == "cuda" else "host RSS"
        eval_line = ""
        if eval_losses:
            first_eval, last_eval = eval_losses[0]["eval_loss"], eval_losses[-1]["eval_loss"]
            eval_line = f"[fsdpqlora] eval loss {first_eval:.4f}" + (f" -> {last_eval:.4f}" if len(eval_losses) > 1 else "") + "\n"
        print(
            "\n[fsdpqlora] done: "
            f"{cfg.train.max_steps} steps in {elapsed:.1f}s, loss {first_loss:.4f} -> {metrics['loss']:.4f}, "
            f"{total_tokens / (elapsed - eval_seconds):.0f} tokens/s over {d.world_size} workers\n"
            + eval_line
            + f"[fsdpqlora] peak memory per rank ({memory_kind}): "
            + ", ".join(f"rank {r}: {p:.2f} GiB" for r, p in enumerate(peaks))
            + f"\n[fsdpqlora] adapter: {adapter_dir}\n[fsdpqlora] metrics: {run_dir / 'metrics.jsonl'}",
            flush=True,
        )
    return run_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_user_error():
        cfg = load_cfg(argv)
        d = init_distributed()
        try:
            run_dir = run(cfg, d)
            # Every rank finishes its collectives before any tears the group down; a rank that
            # destroys it while a peer is still in one can abort the peer's process.
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if d.is_main and cfg.generate.prompt and cfg.generate.max_new_tokens:
            from fsdpqlora.generate import show_generation

            try:
                show_generation(cfg, run_dir)
            except Exception as exc:  # the adapter is saved; a failed sample must not fail the run
                print(f"[fsdpqlora] generation skipped: {type(exc).__name__}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
