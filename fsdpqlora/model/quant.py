"""NF4 quantization with bitsandbytes: swapping nn.Linear for Linear4bit, and quantizing one tensor."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from torch import nn

from fsdpqlora.compat import exact_4bit_kernels
from fsdpqlora.config import QuantConfig


def to_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def make_linear4bit(linear: nn.Linear, qcfg: QuantConfig) -> bnb.nn.Linear4bit:
    """A meta-device Linear4bit with the packed shape of `linear`'s weight, ready to be sharded
    before any byte is loaded."""
    storage = to_dtype(qcfg.storage_dtype)
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=to_dtype(qcfg.compute_dtype),
            compress_statistics=qcfg.double_quant,
            quant_type=qcfg.quant_type,
            quant_storage=storage,
        )
    exact_4bit_kernels(layer)
    if linear.bias is not None:  # Qwen2's q/k/v biases: keep the model's dtype, not torch's default
        layer.bias.data = layer.bias.data.to(linear.bias.dtype)
    packed_numel = linear.in_features * linear.out_features // 2
    packed_rows = packed_numel // storage.itemsize
    layer.weight = bnb.nn.Params4bit(
        torch.empty(packed_rows, 1, dtype=storage, device="meta"),
        requires_grad=False,
        blocksize=qcfg.blocksize,
        compress_statistics=qcfg.double_quant,
        quant_type=qcfg.quant_type,
        quant_storage=storage,
        bnb_quantized=True,
        module=layer,
    )
    return layer


def replace_linears(model: nn.Module, linear_names: tuple[str, ...], qcfg: QuantConfig) -> list[str]:
    """Swap every nn.Linear whose attribute name is in `linear_names` for a meta Linear4bit.
    Returns the qualified names of the swapped modules."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in linear_names and isinstance(child, nn.Linear):
                setattr(parent, child_name, make_linear4bit(child, qcfg))
                swapped.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return swapped


def quantize(weight: torch.Tensor, qcfg: QuantConfig, device: torch.device) -> tuple[torch.Tensor, QuantState]:
    """Packed 4-bit bytes and quantization state of one weight, computed on `device`."""
    return bnb.functional.quantize_4bit(
        weight.to(device).contiguous(),
        blocksize=qcfg.blocksize,
        compress_statistics=qcfg.double_quant,
        quant_type=qcfg.quant_type,
        quant_storage=to_dtype(qcfg.storage_dtype),
    )
