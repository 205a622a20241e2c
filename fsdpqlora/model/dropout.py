"""LoRA dropout whose mask costs a quarter of a random number per element on the CPU.

peft gives each LoRA linear an `nn.Dropout`. On the CPU, torch draws its mask with a serial loop
that asks the generator for a 64-bit number per element: 15-18% of a CPU training step went there.
Here each 64-bit number gives four 16-bit draws, compared with a threshold in one vectorized pass,
and the input is multiplied by the scaled mask, which backward multiplies by again (kept for it in
the input's dtype, as torch's dropout keeps it). The drop rate is p rounded to a multiple of
1/65,536 (0.05 becomes 0.0500031), and the kept elements are scaled by 1 / (1 - that rate): the
expectation is the input's, exactly in fp32; in bf16 and fp16 the scale itself rounds (1.0547 for
0.05 in bf16), as it does in torch's dropout.

The draws come from torch's default CPU generator: `torch.manual_seed` fixes them, and activation
checkpointing's recompute, which restores the generator's state, draws the same masks. On a GPU
torch's own dropout kernel draws and applies its mask in one pass, and is used as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DRAW_LEVELS = 1 << 16  # one draw: a signed 16-bit integer, uniform over 65,536 values


def drop_threshold(p: float) -> int:
    """The signed 16-bit draws below this are dropped: round(p x 65,536) of the 65,536 values (at
    most 65,535: a rate just under 1 still keeps something to scale)."""
    return min(round(p * DRAW_LEVELS), DRAW_LEVELS - 1) - DRAW_LEVELS // 2


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """True where an element is kept, False (dropped) with probability p rounded to a multiple of 1/65,536."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # every bit uniform
    draws = words.view(torch.int16)[:numel].view(shape)
    return draws >= drop_threshold(p)


class LoraDropout(nn.Module):
    """Dropout of rate p in training, the identity in evaluation: peft's `nn.Dropout` with a cheaper mask."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        rate = (drop_threshold(self.p) + DRAW_LEVELS // 2) / DRAW_LEVELS
        # One pass turns the bool mask into the scaled mask, one multiplies; backward multiplies by the
        # same mask. (Applying the bool mask with where or masked_fill took 2-3x longer in backward.)
        scaled_mask = torch.empty_like(x)
        torch.mul(keep_mask(x.shape, self.p), 1.0 / (1.0 - rate), out=scaled_mask)
        return x * scaled_mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_lora_dropout(model: nn.Module) -> int:
    """Replace the `nn.Dropout` of every LoRA layer (peft's `lora_dropout` entries) with LoraDropout
    of the same rate; returns how many. Dropout 0 is peft's `nn.Identity` and stays."""
    count = 0
    for module in model.modules():
        entries = getattr(module, "lora_dropout", None)
        if not isinstance(entries, nn.ModuleDict):
            continue
        for name, dropout in list(entries.items()):
            if type(dropout) is nn.Dropout:
                entries[name] = LoraDropout(dropout.p)
                count += 1
    return count
