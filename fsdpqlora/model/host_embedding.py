"""The input embedding kept in host memory (shard.embedding_on_host=true).

The embedding table is the largest frozen tensor outside the decoder layers (Llama 3's 128,256
entries: 0.98 GiB in bf16 for 8B, 1.96 GiB for 70B), yet a step reads only the rows of its tokens,
once, at the start of forward, and sends the table no gradient (it is frozen; LoRA adapts the
linears). So the table can stay in host memory: the token ids go to the CPU, their rows are looked
up there, and only those rows (tokens x hidden size, 32 MiB for 4,096 tokens of Llama-3.1-8B) are
copied to the GPU. The table is not sharded (FSDP2 ignores it): every worker holds it whole, in
host RAM. A table tied to the head is needed on the GPU for the loss; fsdpqlora refuses the lever
for such models (Gemma, Llama 3.2 1B/3B).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


def materialize_with_host_embedding(causal_lm: nn.Module, model: nn.Module, device: torch.device,
                                    compute_device: torch.device) -> None:  # fmt: skip
    """`model.to_empty(device=device)`, except the input embedding of `causal_lm` (the transformers
    model inside `model`): its table is made in host memory (uninitialized: the loader fills it),
    and its forward looks the rows up there and hands them to `compute_device`. The embedding is
    set aside while the rest is materialized, so the table never takes device memory, not even
    for a moment."""
    embedding = causal_lm.get_input_embeddings()
    causal_lm.set_input_embeddings(nn.Identity())
    try:
        model.to_empty(device=device)
    finally:
        causal_lm.set_input_embeddings(embedding)
    embedding.to_empty(device="cpu")
    embedding.register_forward_pre_hook(_ids_to_host)
    embedding.register_forward_hook(partial(_rows_to, compute_device))


def _ids_to_host(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _rows_to(device: torch.device, module: nn.Module, args: tuple, rows: torch.Tensor) -> torch.Tensor:
    return rows.to(device)
