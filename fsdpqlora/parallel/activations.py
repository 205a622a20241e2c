"""Activation checkpointing of decoder layers, and offloading what checkpointing keeps to host memory.

With non-reentrant checkpointing a layer keeps only its inputs (torch saves them through a no-op
autograd function, outside the checkpoint's own saved-tensor hooks), and recomputes the rest in
backward. Offloading wraps each checkpointed call in saved-tensor hooks that see exactly those
inputs: pack copies them to pinned host memory on a side stream, so the copy overlaps the next
layer's compute; unpack brings them back when backward recomputes the layer.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from fsdpqlora.compat import checkpoint_wrapper


class HostOffload(saved_tensors_hooks):
    """Saved tensors wait in host memory. CUDA tensors are copied to pinned memory on a side stream
    (the source is kept alive for that stream until the copy is done); CPU tensors already are in
    host memory and are kept as they are. `packed_bytes` counts what went through, for tests and
    reports."""

    def __init__(self) -> None:
        super().__init__(self._pack, self._unpack)
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.packed_bytes = 0

    def _pack(self, tensor: torch.Tensor):
        self.packed_bytes += tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda":
            return tensor
        compute = torch.cuda.current_stream(tensor.device)
        self.stream.wait_stream(compute)  # the tensor is written by work queued on the compute stream
        with torch.cuda.stream(self.stream):
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        tensor.record_stream(self.stream)
        return tensor.device, host, copied

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, copied = packed
        torch.cuda.current_stream(device).wait_event(copied)
        return host.to(device, non_blocking=True)


def _offloaded_checkpoint(function, *args, offload: HostOffload, **kwargs):
    with offload:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(layers: nn.ModuleList, every: int = 1, offload: bool = False) -> HostOffload | None:
    """Recompute every `every`-th decoder layer (0, every, 2*every, ...) in backward; with `offload`,
    their saved inputs wait in host memory. The wrapper's state-dict hook strips its prefix, so
    saved names stay those of the bare model. The RNG state is preserved so that the recompute
    draws the same LoRA dropout masks as the forward did. Returns the offload hooks, if any."""
    hooks = HostOffload() if offload else None
    for i, layer in enumerate(layers):
        if i % every:
            continue
        if hooks is None:
            layers[i] = checkpoint_wrapper(layer)
        else:
            layers[i] = checkpoint_wrapper(layer, checkpoint_fn=partial(_offloaded_checkpoint, offload=hooks))
    return hooks
