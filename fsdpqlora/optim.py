"""The optimizer and learning-rate schedule of the trainable adapter parameters."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from fsdpqlora import adapters


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the adapter parameters. Trap B of DESIGN.md: call it right after sharding and
    before any forward pass, so that it holds the sharded parameters."""
    return torch.optim.AdamW(
        [p for _, p in adapters.lora_parameters(model)],
        lr=cfg.train.lr,
        betas=tuple(cfg.train.betas),
        weight_decay=cfg.train.weight_decay,
    )


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


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
