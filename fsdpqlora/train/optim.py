"""The optimizer and learning-rate schedule of the trainable adapter parameters."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fsdpqlora.config import Config
from fsdpqlora.model import adapters
from fsdpqlora.parallel.fsdp import local_tensor
from fsdpqlora.parallel.process_group import Dist

# train.optimizer -> bitsandbytes optimizer class name
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the adapter parameters: torch's (fused on CUDA, foreach on CPU) or one of
    bitsandbytes', stepping local tensors (on_local_shards). Call it right after sharding and before
    any forward pass (trap B in the README): with reshard_after_forward=False (shard_grad_op) a
    forward leaves the unsharded parameters registered on the modules, so an optimizer built then
    would hold those instead of the sharded ones that backward fills, and the loss would stay flat."""
    t = cfg.train
    params = [p for _, p in adapters.lora_parameters(model)]
    options = dict(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        on_cuda = all(local_tensor(p).is_cuda for p in params)  # not with CPU offload: the shards live on the host
        # On CPU torch defaults to a Python loop over the parameters; foreach is one call for all.
        kernels = {"fused": True} if on_cuda else {"foreach": True}
        return on_local_shards(torch.optim.AdamW, sharded_state=True)(params, **kernels, **options)
    import bitsandbytes as bnb

    return on_local_shards(getattr(bnb.optim, BNB_OPTIMIZERS[t.optimizer]), sharded_state=False)(params, **options)


def on_local_shards(base: type[torch.optim.Optimizer], sharded_state: bool) -> type[torch.optim.Optimizer]:
    """`base`, stepping FSDP2's DTensor parameters on their local shards: plain tensors, which
    bitsandbytes' kernels need and which spare torch's foreach and fused kernels DTensor's dispatch
    of every operation on every parameter (the update is elementwise: each shard's own). Plain
    parameters (one rank, no_shard's replicated copies) step as they are.

    The state stays keyed by the parameters themselves, which the checkpoint's
    get_optimizer_state_dict names. With `sharded_state` (torch's AdamW), state shaped like a shard
    is kept as a DTensor of the parameter's layout, sharing the shard's storage, so that
    torch.distributed.checkpoint saves it sharded and reshards it on load, as it would torch's own
    DTensor state; without (bitsandbytes: 8-bit blocks cut within each rank's shard), the plain
    tensors the optimizer made, saved per rank (fsdpqlora/train/checkpoint.py)."""

    class OnLocalShards(base):
        @torch.no_grad()
        def step(self, closure=None):
            swapped = []
            for group in self.param_groups:
                params = group["params"]
                for i, p in enumerate(params):
                    if isinstance(p, DTensor):
                        local = p.to_local().detach()  # shares the shard's storage: updates land in p
                        local.grad = None if p.grad is None else p.grad.to_local()
                        kept = self.state.pop(p, None)
                        if kept is not None:
                            self.state[local] = {k: local_tensor(v) for k, v in kept.items()}
                        params[i] = local
                        swapped.append((params, i, p, local, kept))
            try:
                return super().step(closure)
            finally:
                for params, i, p, local, kept in swapped:
                    params[i] = p
                    if local in self.state:
                        self.state[p] = {k: self._outside_step(v, k, p, local, kept) for k, v in self.state.pop(local).items()}

        @staticmethod
        def _outside_step(value, key: str, p: DTensor, local: torch.Tensor, kept: dict | None):
            """The state value `value` as the optimizer keeps it between steps: the DTensor it was
            before this step, or, for state the step created, a new one over its storage."""
            if kept is not None and isinstance(kept.get(key), DTensor) and kept[key].to_local() is value:
                return kept[key]
            if sharded_state and torch.is_tensor(value) and value.shape == local.shape:
                return DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            return value

    OnLocalShards.__name__ = OnLocalShards.__qualname__ = base.__name__
    return OnLocalShards


def local_grad_square_sum(params: list[torch.Tensor], d: Dist) -> torch.Tensor:
    """This rank's share of the squared total norm of the gradients of `params` (float64): the sum
    of squares of the gradient shards it holds, every copy of a replicated one counted once. The
    shares of all ranks add up to the square of the norm that clip_grad_norm_ takes of the whole
    gradients; train_step adds them in its one collective of the step, instead of a collective of
    its own per step. A DTensor shard counts on the ranks at coordinate 0 of each mesh dimension
    it is replicated over (hybrid_shard: the first shard group); a plain gradient is the same on
    every rank (one rank, or no_shard's averaged copies) and counts on rank 0."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None and _counted_here(p.grad, d.rank)]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return torch.stack(norms).double().square().sum()


def _counted_here(grad: torch.Tensor, rank: int) -> bool:
    if not isinstance(grad, DTensor):
        return rank == 0
    coordinate = grad.device_mesh.get_coordinate()
    return all(coordinate[dim] == 0 for dim, placement in enumerate(grad.placements) if placement.is_replicate())


@torch.no_grad()
def clip_grads_(params: list[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale the gradients of `params` so that their total norm `total_norm` (every rank's shares,
    local_grad_square_sum) is at most `max_norm`, as clip_grad_norm_ does; each rank scales the
    shards it holds, in one foreach call."""
    coefficient = max_norm / (total_norm + 1e-6)
    if coefficient < 1.0:
        torch._foreach_mul_([local_tensor(p.grad) for p in params if p.grad is not None], coefficient)


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
