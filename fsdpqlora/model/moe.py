"""Mixture-of-experts layers with one linear per expert projection, so that experts can be 4-bit.

transformers 5 stores Mixtral's experts as two 3-D parameters (all experts' gate+up, all experts'
down). bitsandbytes quantizes Linear layers, so `from_pretrained` with BitsAndBytesConfig leaves
those experts, nearly all of Mixtral's weights, in 16-bit. Here the fused module is replaced on the
meta skeleton by a list of experts with w1 (gate), w3 (up) and w2 (down) linears, the layout and
names of the hub checkpoints, which then become Linear4bit like any other linear and take LoRA
adapters. The router is untouched: it stays in the model dtype, frozen, and picks the same experts.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False, dtype=dtype)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class SeparateExperts(nn.ModuleList):
    """Drop-in for transformers' fused experts: same call, (tokens, top-k indices, top-k weights)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            # Every expert runs, on zero tokens if none were routed to it: then every rank computes
            # a gradient (maybe zero) for every adapter, which FSDP's reduce-scatter needs to match.
            y = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def replace_fused_experts(moe_block: nn.Module) -> None:
    fused = moe_block.experts
    dtype = fused.gate_up_proj.dtype
    with torch.device(fused.gate_up_proj.device):
        moe_block.experts = SeparateExperts(
            ExpertMLP(fused.hidden_dim, fused.intermediate_dim, fused.act_fn, dtype) for _ in range(fused.num_experts)
        )
