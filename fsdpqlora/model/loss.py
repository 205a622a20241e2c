"""The next-token loss of a causal LM, its head computed a chunk of tokens at a time.

The whole logits tensor (tokens x vocabulary: 5.9 GiB with its fp32 copy and log-softmax for
Llama 3's 128,256 entries at 2 x 2,048 tokens) never exists. The head is frozen, so the only
gradient the loss sends back is the one of the final hidden states: each chunk's logits are
computed, turned into their loss and into that gradient (softmax minus the target, through the
soft-capping's derivative, times the head), and freed before the next chunk. The gradient waits,
target tokens x hidden in fp32, for backward, which only scales it; the head is not needed in backward at all,
so its FSDP unit is resharded right after the loss (fsdpqlora/parallel/fsdp.py).

Only target tokens are sent through the head: prompt tokens and padding cost no logits.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from fsdpqlora.data import IGNORE_INDEX

# The model's method that computes the chunked loss (fsdpqlora.train.step.summed_loss calls it).
CHUNKED_LOSS = "chunked_next_token_loss"
FP16_SOFTMAX_SCALE = 2.0**10


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of `hidden @ weight.T` (soft-capped) against `targets`, in fp32; the
    gradient of `hidden` is computed in forward, a chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, softcap: float | None, with_grad: bool):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # fp32 until backward scales it (fp16 would flush the small components to zero before the
        # loss scale lifts them)
        grad = torch.empty_like(hidden, dtype=torch.float32) if with_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = F.linear(hidden[rows], weight).float()
            slope = None
            if softcap:  # Gemma 2/3: softcap * tanh(logits / softcap), whose derivative is 1 - tanh^2
                logits.div_(softcap).tanh_()
                slope = 1 - logits.square() if grad is not None else None
                logits.mul_(softcap)
            target = targets[rows]
            log_total = torch.logsumexp(logits, dim=-1)
            loss += (log_total - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if grad is None:
                continue
            d_logits = logits.sub_(log_total[:, None]).exp_()  # the softmax, in place of the logits
            d_logits[torch.arange(len(target), device=target.device), target] -= 1
            if slope is not None:
                d_logits.mul_(slope)
            # fp16's smallest normal (6e-5) would flush most of a large vocabulary's softmax to zero
            scale = FP16_SOFTMAX_SCALE if weight.dtype == torch.float16 else 1.0
            grad[rows] = (d_logits.mul_(scale).to(weight.dtype) @ weight).float().div_(scale)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.hidden_dtype), None, None, None, None, None


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: the next token's (IGNORE_INDEX at each row's end). Shifting
    the labels, not the logits or hidden states, spares a copy of the step's largest tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_tokens: int,
                         softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """Summed next-token cross-entropy of `head(hidden)` against `labels` (not yet shifted;
    IGNORE_INDEX carries no loss), `chunk_tokens` tokens at a time."""
    shifted = shifted_labels(labels).flatten()
    rows = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    selected = hidden.flatten(0, 1).index_select(0, rows)
    with_grad = torch.is_grad_enabled() and selected.requires_grad
    return _LinearCrossEntropy.apply(selected, head.weight, shifted[rows], chunk_tokens, softcap, with_grad)


def next_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None, labels: torch.Tensor, *, chunk_tokens: int) -> torch.Tensor:  # fmt: skip
    """The summed next-token loss of the peft-wrapped causal LM `model`: its decoder's last hidden
    state, then the head and the loss a chunk at a time. Under FSDP2 this runs as a forward method
    of the root (fsdpqlora/parallel/fsdp.py), so the decoder's units gather as in forward; the
    head's own unit is gathered here, once for all chunks."""
    causal_lm = model.get_base_model()
    # use_cache=False: a KV cache filled in forward would be filled twice by checkpoint recompute.
    hidden = causal_lm.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    head = causal_lm.get_output_embeddings()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if not isinstance(head, FSDPModule):  # a tied head lives in the root unit, gathered already
        return linear_cross_entropy(hidden, head, labels, chunk_tokens, softcap)
    head.unshard()
    try:
        return linear_cross_entropy(hidden, head, labels, chunk_tokens, softcap)
    finally:
        head.reshard()


def attach_chunked_loss(model: nn.Module, chunk_tokens: int) -> None:
    """Give `model` (sharded or not) its CHUNKED_LOSS method. Under FSDP2 it is registered as a
    forward method of the root, so the root's pre- and post-forward hooks run around it as around
    forward: every unit then gathers under the root's forward, in order, with its prefetching."""
    setattr(model, CHUNKED_LOSS, partial(next_token_loss, model, chunk_tokens=chunk_tokens))
    register_fsdp_forward_method(model, CHUNKED_LOSS)
