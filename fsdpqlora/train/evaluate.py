"""Evaluation loss: the mean over every target token of the evaluation data, all ranks together."""

from __future__ import annotations

import torch

from fsdpqlora.config import Config
from fsdpqlora.data import EvalBatches
from fsdpqlora.parallel.process_group import Dist, agree
from fsdpqlora.train.step import summed_loss, target_tokens


@torch.no_grad()
def evaluation_loss(model, batches: EvalBatches, d: Dist) -> dict[str, float]:
    """Token-weighted, so the same for any number of ranks. Eval mode turns LoRA dropout off."""
    model.eval()
    loss_sum, targets = torch.zeros((), dtype=torch.float64, device=d.device), 0
    try:
        for batch in batches.for_rank(d.rank, d.world_size):
            loss_sum += summed_loss(model, batch, d.device)
            targets += target_tokens(batch["labels"])
    finally:
        model.train()
    all_loss_sum, total = agree(d, sums=[loss_sum, targets], maxes=[])
    return {"eval_loss": all_loss_sum / total, "eval_tokens": total}


class Evaluator:
    """Evaluates every train.eval_every steps and after the last one, when there is evaluation data."""

    def __init__(self, cfg: Config, batches: EvalBatches | None, d: Dist):
        self.every, self.last_step = cfg.train.eval_every, cfg.train.max_steps
        self.batches, self.d = batches, d

    def due(self, step: int) -> bool:
        return self.batches is not None and ((self.every and step % self.every == 0) or step == self.last_step)

    def maybe_evaluate(self, step: int, model) -> dict[str, float] | None:
        if not self.due(step):
            return None
        return evaluation_loss(model, self.batches, self.d)
