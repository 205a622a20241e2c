"""The worker: one process per GPU (or CPU worker), started by torchrun.

    torchrun --nproc-per-node 2 -m fsdpqlora.train model=tiny train.max_steps=20
    torchrun --nproc-per-node 2 -m fsdpqlora.train --config outputs/<run>/config.yaml   (the launcher's way)
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
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
from fsdpqlora.data import IGNORE_INDEX, StepBatches, data_path, read_records, tokenize_alpaca
from fsdpqlora.distributed import Dist, all_reduce_max, all_reduce_sum, init_distributed, on_rank0
from fsdpqlora.errors import exit_on_user_error
from fsdpqlora.metrics import MetricsLogger, peak_memory_gib
from fsdpqlora.model import check_tokenizer, resolve_model_dir


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


def lr_lambda(cfg: DictConfig):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        if t.schedule == "linear":
            return max(0.0, 1.0 - progress)
        # cosine down to 10% of the peak, as in the QLoRA paper's runs
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def summed_loss(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of next-token cross-entropy over this micro-batch's target tokens."""
    batch = {k: v.to(device) for k, v in batch.items()}
    # use_cache=False: a KV cache filled in forward would be filled twice by checkpoint recompute.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # Shift the labels, not the logits: slicing the logits would copy the largest tensor of the step.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_step(model, optimizer, scheduler, micro_batches, cfg: DictConfig, d: Dist) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches. The loss is the mean over every target
    token of the global batch (all ranks, all micro-batches), not a mean of per-rank means."""
    local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    global_targets = all_reduce_sum(local_targets, d.device)
    loss_sum = 0.0
    tokens = 0
    for batch in micro_batches:
        loss = summed_loss(model, batch, d.device)
        # FSDP averages gradients over ranks; scaling by world size turns that average into the
        # sum that a token-weighted mean over the global batch needs.
        (loss * d.world_size / global_targets).backward()
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
    params = [p for _, p in adapters.lora_parameters(model)]
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": all_reduce_sum(loss_sum, d.device) / global_targets,
        "grad_norm": float(grad_norm),
        "tokens": all_reduce_sum(tokens, d.device),
        "target_tokens": global_targets,
    }


def run(cfg: DictConfig, d: Dist) -> Path:
    validate(cfg)
    model_dir = on_rank0(lambda: resolve_model_dir(cfg))  # builds `tiny` or downloads, once
    validate(cfg, model_max_positions(model_dir))
    run_dir = agree_run_dir(cfg, d)
    torch.manual_seed(cfg.train.seed)

    tokenizer = check_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    path = on_rank0(lambda: data_path(cfg))
    rows = read_records(path)
    if cfg.data.max_examples:
        rows = rows[: cfg.data.max_examples]
    examples, dropped = tokenize_alpaca(rows, tokenizer, cfg.data.seq_len, path)
    batches = StepBatches(examples, cfg, d.rank, d.world_size, pad_id)

    built = build_model(cfg, d, model_dir)
    model = built.model
    load_summary = loading.summary(built.load, built.load_seconds, d, model_dir)
    # Trap B of DESIGN.md: the optimizer must hold the sharded parameters, so build it right after
    # sharding and before any forward pass.
    optimizer = torch.optim.AdamW(
        [p for _, p in adapters.lora_parameters(model)],
        lr=cfg.train.lr,
        betas=tuple(cfg.train.betas),
        weight_decay=cfg.train.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if d.is_main:
        n_trainable = sum(p.numel() for _, p in adapters.lora_parameters(model))
        print(load_summary, flush=True)
        print(
            f"[fsdpqlora] {len(examples)} examples ({dropped} dropped: prompt longer than data.seq_len); "
            f"{n_trainable:,} trainable parameters; {d.world_size} workers, shard={cfg.shard.strategy}",
            flush=True,
        )

    logger = MetricsLogger(cfg, run_dir, cfg.train.max_steps) if d.is_main else None
    started = time.perf_counter()
    window = {"start": started, "tokens": 0.0, "loss_sum": 0.0, "targets": 0.0}
    total_tokens = 0.0
    metrics: dict[str, float] = {}
    first_loss = None
    for step in range(cfg.train.max_steps):
        lr = scheduler.get_last_lr()[0]
        metrics = train_step(model, optimizer, scheduler, batches.for_step(step), cfg, d)
        total_tokens += metrics["tokens"]
        window["tokens"] += metrics["tokens"]
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
                peak_mem_gib=all_reduce_max(peak_memory_gib(d.device), d.device),
                epoch=(step + 1) / batches.steps_per_epoch,
            )
            window = {"start": now, "tokens": 0.0, "loss_sum": 0.0, "targets": 0.0}
            first_loss = metrics["loss"] if first_loss is None else first_loss
            if logger:
                logger.log(step + 1, metrics)
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
        print(
            "\n[fsdpqlora] done: "
            f"{cfg.train.max_steps} steps in {elapsed:.1f}s, loss {first_loss:.4f} -> {metrics['loss']:.4f}, "
            f"{total_tokens / elapsed:.0f} tokens/s over {d.world_size} workers\n"
            f"[fsdpqlora] peak memory per rank ({memory_kind}): "
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
