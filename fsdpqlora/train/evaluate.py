"""Evaluation loss: the mean over every target token of the evaluation data, all ranks together."""

from __future__ import annotations

import torch

from fsdpqlora.data import IGNORE_INDEX, EvalBatches
from fsdpqlora.parallel.process_group import Dist, all_reduce_sum
from fsdpqlora.train.step import summed_loss


@torch.no_grad()
def evaluation_loss(model, batches: EvalBatches, d: Dist) -> dict[str, float]:
    """Token-weighted, so the same for any number of ranks. Eval mode turns LoRA dropout off."""
    model.eval()
    loss_sum, targets = 0.0, 0
    try:
        for batch in batches.for_rank(d.rank, d.world_size):
            loss_sum += summed_loss(model, batch, d.device).item()
            targets += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train()
    total = all_reduce_sum(targets, d.device)
    return {"eval_loss": all_reduce_sum(loss_sum, d.device) / total, "eval_tokens": total}
