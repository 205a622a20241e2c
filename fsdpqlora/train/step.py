"""One optimizer step: token-weighted loss over the global batch, backward, clip, step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from fsdpqlora.config import Config
from fsdpqlora.data import IGNORE_INDEX
from fsdpqlora.model import adapters
from fsdpqlora.model.loss import CHUNKED_LOSS, shifted_labels
from fsdpqlora.parallel.process_group import Dist, agree
from fsdpqlora.parallel.replicate import averager_of
from fsdpqlora.train.optim import clip_grads_, local_grad_square_sum
from fsdpqlora.train.preemption import StopRequests


def summed_loss(model, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of next-token cross-entropy over this micro-batch's target tokens: a chunk of tokens at a
    time through the head where the model was built with train.loss_chunk_tokens (the default;
    fsdpqlora/model/loss.py), else from the whole logits tensor."""
    batch = {k: v.to(device) for k, v in batch.items()}
    # Packed rows: position_ids restart at each example, and transformers builds the block-diagonal
    # mask from them only when it is given no attention_mask (fsdpqlora/data/packing.py).
    packed = "position_ids" in batch
    attention_mask = None if packed else batch["attention_mask"]
    if hasattr(model, CHUNKED_LOSS):
        return getattr(model, CHUNKED_LOSS)(batch["input_ids"], attention_mask, batch.get("position_ids"), batch["labels"])
    # use_cache=False: a KV cache filled in forward would be filled twice by checkpoint recompute.
    logits = model(
        input_ids=batch["input_ids"], attention_mask=attention_mask, position_ids=batch.get("position_ids"), use_cache=False
    ).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), shifted_labels(batch["labels"]).flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def build_grad_scaler(cfg: Config, d: Dist) -> torch.amp.GradScaler | None:
    """fp16 compute needs loss scaling (small gradients underflow in fp16); bf16 and fp32 do not.
    torch's own scaler, not FSDP1's ShardedGradScaler: FSDP2's gradients are DTensors, whose
    overflow check reduces "found inf" over the mesh (DTensor's handler of
    _amp_foreach_non_finite_check_and_unscale_), and no_shard's replicated copies hold the same
    averaged gradients on every rank, so every rank skips the same steps."""
    if cfg.quant.compute_dtype != "float16":
        return None
    return torch.amp.GradScaler(d.device.type)


def target_tokens(labels: torch.Tensor) -> int:
    """The tokens of a batch that carry loss: those with a label, less each row's first token,
    which nothing precedes to predict it."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class StepResult:
    """One optimizer step, the same on every rank: its values are agreed on across ranks."""

    loss: float  # the mean over the global batch's target tokens
    grad_norm: float
    tokens: float
    target_tokens: float
    finite: bool
    grad_scale: float | None  # the loss scale this step used (fp16), else None
    stop_signal: int  # a stop signal that any rank received, 0 for none
    seconds_since_save: float  # the slowest rank's time since the last checkpoint

    def record(self) -> dict[str, float]:
        """The step's values as metrics.jsonl holds them."""
        values = {"loss": self.loss, "grad_norm": self.grad_norm, "tokens": self.tokens, "target_tokens": self.target_tokens}
        if self.grad_scale is not None:
            values["grad_scale"] = self.grad_scale
        return values


def train_step(model, optimizer, scheduler, micro_batches, global_targets: int, cfg: Config, d: Dist, scaler=None,
               stop: StopRequests | None = None, seconds_since_save: Callable[[], float] | None = None) -> StepResult:  # fmt: skip
    """One optimizer step over this rank's micro-batches. The loss is the mean over every target
    token of the global batch (all ranks, all micro-batches, `global_targets` of them), not a mean
    of per-rank means. This rank's stop requests, checkpoint clock and share of the gradient norm
    are read after the backward passes and travel with the loss in the step's one collective, so
    that all ranks agree on them; the gradients are then clipped to that norm, each rank its own
    shards (fsdpqlora/train/optim.py)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    tokens = 0
    # What averages the gradients over ranks: FSDP2, or no_shard's replicated copies' averager.
    gradient_sync = model if isinstance(model, FSDPModule) else averager_of(model)
    for i, batch in enumerate(micro_batches):
        if gradient_sync is not None and not cfg.train.reduce_every_micro_batch:
            # Gradients accumulate unreduced (FSDP: unsharded, in fp32, its reduce dtype) and are
            # reduced once, after the last micro-batch.
            gradient_sync.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss = summed_loss(model, batch, d.device)
        # Gradients are averaged over ranks; scaling by world size turns that average into the
        # sum that a token-weighted mean over the global batch needs.
        scaled = loss * d.world_size / float(global_targets)
        (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += loss.detach()  # on the device, in float64: no synchronization per micro-batch
        tokens += int(batch["attention_mask"].sum())
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for _, p in adapters.lora_parameters(model)]
    all_loss_sum, all_tokens, grad_square_sum, signal, slowest_clock = agree(
        d,
        sums=[loss_sum, tokens, local_grad_square_sum(params, d)],
        maxes=[stop.received if stop else 0, seconds_since_save() if seconds_since_save else 0.0],
    )
    grad_norm = math.sqrt(grad_square_sum)  # before clipping, as clip_grad_norm_ returns it
    if cfg.train.max_grad_norm > 0:
        clip_grads_(params, cfg.train.max_grad_norm, grad_norm)
    loss = all_loss_sum / global_targets
    # Both are global values, the same on every rank, so every rank decides alike.
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    grad_scale = None
    if scaler:
        # An overflowed gradient is the scaler's business: it skips the step and lowers the scale.
        finite = math.isfinite(loss)
        grad_scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
    elif finite:  # a NaN or inf would poison the adapter and the optimizer's moments for good
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, all_tokens, float(global_targets), finite, grad_scale, int(signal), slowest_clock)

