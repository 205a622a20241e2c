"""The optimizer and learning-rate schedule of the trainable adapter parameters."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fsdpqlora.config import Config
from fsdpqlora.model import adapters
from fsdpqlora.parallel.fsdp import local_tensor

# train.optimizer -> bitsandbytes optimizer class name
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the adapter parameters: torch's (fused on CUDA) or one of bitsandbytes'. Call it
    right after sharding and before any forward pass (trap B in the README): with
    reshard_after_forward=False (shard_grad_op) a forward leaves the unsharded parameters registered
    on the modules, so an optimizer built then would hold those instead of the sharded ones that
    backward fills, and the loss would stay flat."""
    t = cfg.train
    params = [p for _, p in adapters.lora_parameters(model)]
    options = dict(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        on_cuda = all(local_tensor(p).is_cuda for p in params)  # not with CPU offload: the shards live on the host
        return torch.optim.AdamW(params, fused=on_cuda or None, **options)
    return _on_local_shards(BNB_OPTIMIZERS[t.optimizer])(params, **options)


def _on_local_shards(class_name: str) -> type[torch.optim.Optimizer]:
    """A bitsandbytes optimizer class that steps FSDP2's DTensor parameters on their local shards:
    its kernels take plain tensors only. Its state stays keyed by the parameters themselves, and
    is computed per shard (8-bit blocks are cut within each rank's shard)."""
    import bitsandbytes as bnb

    base = getattr(bnb.optim, class_name)

    class OnLocalShards(base):
        @torch.no_grad()
        def step(self, closure=None):
            swapped = []
            for group in self.param_groups:
                for i, p in enumerate(group["params"]):
                    if isinstance(p, DTensor):
                        local = p.to_local().detach()  # shares the shard's storage: updates land in p
                        local.grad = None if p.grad is None else p.grad.to_local()
                        if p in self.state:
                            self.state[local] = self.state.pop(p)
                        group["params"][i] = local
                        swapped.append((group, i, p, local))
            try:
                return super().step(closure)
            finally:
                for group, i, p, local in swapped:
                    group["params"][i] = p
                    if local in self.state:
                        self.state[p] = self.state.pop(local)

    OnLocalShards.__name__ = OnLocalShards.__qualname__ = class_name
    return OnLocalShards


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

def lr_lambda(cfg: Config):
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
