"""no_shard on several ranks: every rank holds the whole 4-bit model and its adapter as plain
tensors, without FSDP, and only the adapter's gradients cross ranks, averaged as DDP averages them.

FSDP2 over shard groups of one would replicate too, but at FSDP's price for nothing: a collective
per layer in forward and backward that the step waits for, and DTensor dispatch. Here the
gradients are grouped into buckets of about shard.bucket_mib, in the order backward produces them
(the parameters' reverse order: the last layer's first). Each bucket is all-reduced asynchronously
as soon as backward has produced all of its gradients, so communication overlaps the rest of
backward; buckets start in index order on every rank, since collectives must come in the same
order everywhere. When backward ends, every bucket's average is copied back into the gradients:
after `loss.backward()` each rank holds the mean over ranks, as FSDP leaves it. Buckets are
reduced in fp32, FSDP's reduce dtype here, whatever the adapter's dtype.

Gradient accumulation: set_requires_gradient_sync(False), as on an FSDP module, leaves a
backward's gradients to accumulate on each rank, unreduced; train_step does so for every
micro-batch but the last, unless train.reduce_every_micro_batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

# The attribute of the model that holds its GradientAverager (averager_of).
AVERAGER = "gradient_averager"


def plan_buckets(sizes: list[int], cap: int) -> list[list[int]]:
    """The indices of tensors of `sizes` bytes, last first (backward produces the last parameters'
    gradients first), cut into consecutive buckets of at most `cap` bytes; a tensor larger than
    `cap` has a bucket of its own."""
    buckets: list[list[int]] = []
    filled = 0
    for index in reversed(range(len(sizes))):
        if not buckets or filled + sizes[index] > cap:
            buckets.append([])
            filled = 0
        buckets[-1].append(index)
        filled += sizes[index]
    return buckets


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.pending = len(params)  # gradients backward has yet to produce
        self.buffer: torch.Tensor | None = None  # fp32, flat: allocated at the first reduction
        self.views: list[torch.Tensor] = []  # each parameter's part of the buffer, in its shape
        self.work: dist.Work | None = None

    def launch(self) -> None:
        """Copy the gradients into the buffer and start averaging it over all ranks. A gradient
        that backward did not produce on this rank counts as zeros."""
        if self.buffer is None:
            sizes = [p.numel() for p in self.params]
            self.buffer = torch.empty(sum(sizes), dtype=torch.float32, device=self.params[0].device)
            self.views = [part.view(p.shape) for part, p in zip(self.buffer.split(sizes), self.params, strict=True)]
        produced = [(view, p.grad) for view, p in zip(self.views, self.params, strict=True) if p.grad is not None]
        torch._foreach_copy_([view for view, _ in produced], [grad for _, grad in produced])
        for view, p in zip(self.views, self.params, strict=True):
            if p.grad is None:
                view.zero_()
        self.work = dist.all_reduce(self.buffer, op=dist.ReduceOp.AVG, async_op=True)

    def finish(self) -> None:
        """Wait for the average and copy it into the gradients."""
        self.work.wait()
        self.work = None
        for p in self.params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
        torch._foreach_copy_([p.grad for p in self.params], self.views)
        self.pending = len(self.params)


class GradientAverager:
    """Averages the gradients of `params` over all ranks in buckets of about `bucket_bytes`, from
    hooks that run as backward accumulates each gradient (see the module's docstring)."""

    def __init__(self, params: list[nn.Parameter], bucket_bytes: int):
        fp32_sizes = [4 * p.numel() for p in params]
        self.buckets = [_Bucket([params[i] for i in indices]) for indices in plan_buckets(fp32_sizes, bucket_bytes)]
        self._bucket_of = {p: bucket for bucket in self.buckets for p in bucket.params}
        self.requires_gradient_sync = True
        self._next = 0  # the next bucket to launch
        self._in_backward = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None:
        """Whether the next backward averages the gradients (FSDPModule's method of the same name)."""
        self.requires_gradient_sync = requires_gradient_sync

    def _grad_ready(self, param: nn.Parameter) -> None:
        if not self.requires_gradient_sync:
            return
        if not self._in_backward:
            self._start_backward()
        bucket = self._bucket_of[param]
        if bucket.pending == 0:
            raise RuntimeError("an adapter gradient was produced twice in one backward pass; averaging expects each once")
        bucket.pending -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self.buckets[self._next].launch()
            self._next += 1

    def _start_backward(self) -> None:
        # From a clean slate: a backward that raised half-way left counts and a launch position behind.
        self._in_backward = True
        self._next = 0
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
        Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        # Buckets with a gradient this rank's backward did not produce start now, in order as
        # everywhere else, so every rank makes the same collectives.
        for bucket in self.buckets[self._next :]:
            bucket.launch()
        for bucket in self.buckets:
            bucket.finish()
        self._next = 0
        self._in_backward = False


def average_gradients(model: nn.Module, params: list[nn.Parameter], bucket_bytes: int) -> GradientAverager:
    """Make every backward of `model` average the gradients of `params` over all ranks."""
    averager = GradientAverager(params, bucket_bytes)
    setattr(model, AVERAGER, averager)
    return averager


def averager_of(model: nn.Module) -> GradientAverager | None:
    return getattr(model, AVERAGER, None)
