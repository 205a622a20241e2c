"""One optimizer step: token-weighted loss over the global batch, backward, clip, step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from fsdpqlora.config import Config
from fsdpqlora.data import IGNORE_INDEX
from fsdpqlora.model import adapters
from fsdpqlora.parallel.process_group import Dist, all_reduce_sum


def summed_loss(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of next-token cross-entropy over this micro-batch's target tokens."""
    batch = {k: v.to(device) for k, v in batch.items()}
    # Packed rows: position_ids restart at each example, and transformers builds the block-diagonal
    # mask from them only when it is given no attention_mask (fsdpqlora/data/packing.py).
    packed = "position_ids" in batch
    # use_cache=False: a KV cache filled in forward would be filled twice by checkpoint recompute.
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=None if packed else batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).logits
    # Shift the labels, not the logits: slicing the logits would copy the largest tensor of the step.
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def build_grad_scaler(cfg: Config, d: Dist) -> ShardedGradScaler | None:
    """fp16 compute needs loss scaling (small gradients underflow in fp16); bf16 and fp32 do not.
    FSDP's scaler: it agrees across ranks on whether any shard's gradient overflowed."""
    if cfg.quant.compute_dtype != "float16":
        return None
    return ShardedGradScaler(device=d.device.type)


def train_step(model, optimizer, scheduler, micro_batches, cfg: Config, d: Dist, scaler=None) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches. The loss is the mean over every target
    token of the global batch (all ranks, all micro-batches), not a mean of per-rank means."""
    local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    global_targets = all_reduce_sum(local_targets, d.device)
    loss_sum = 0.0
    tokens = 0
    for i, batch in enumerate(micro_batches):
        if isinstance(model, FSDPModule) and not cfg.train.reduce_every_micro_batch:
            # Gradients accumulate unsharded (in fp32, FSDP's reduce dtype) and are reduce-scattered
            # once, after the last micro-batch.
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss = summed_loss(model, batch, d.device)
        # FSDP averages gradients over ranks; scaling by world size turns that average into the
        # sum that a token-weighted mean over the global batch needs.
        scaled = loss * d.world_size / global_targets
        (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for _, p in adapters.lora_parameters(model)]
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    loss = all_reduce_sum(loss_sum, d.device) / global_targets
    # Both are global values, the same on every rank, so every rank decides alike.
    finite = math.isfinite(loss) and math.isfinite(float(grad_norm))
    metrics = {}
    if scaler:
        # An overflowed gradient is the scaler's business: it skips the step and lowers the scale.
        finite = math.isfinite(loss)
        metrics["grad_scale"] = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
    elif finite:  # a NaN or inf would poison the adapter and the optimizer's moments for good
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss,
        "finite": finite,
        "grad_norm": float(grad_norm),
        "tokens": all_reduce_sum(tokens, d.device),
        "target_tokens": global_targets,
        **metrics,
    }
