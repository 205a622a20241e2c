"""The chunked linear cross-entropy (fsdpqlora/model/loss.py) against the whole-logits computation
it replaces: the summed loss and the hidden states' gradient, in fp32 to rounding, for any chunk
size, with ignored tokens, and with Gemma's soft-capped head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsdpqlora.data import IGNORE_INDEX
from fsdpqlora.model.loss import linear_cross_entropy


def whole_logits_loss(hidden, head, labels, softcap):
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_chunked_loss_and_gradient_equal_the_whole_logits(chunk_tokens, softcap):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 20, 16, generator=generator, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=generator))
    head.weight.requires_grad_(False)  # frozen, as the LM head always is
    labels = torch.randint(0, 50, (3, 20), generator=generator)
    labels[0, :6] = IGNORE_INDEX  # a prompt
    labels[2, 15:] = IGNORE_INDEX  # padding
    labels[1] = IGNORE_INDEX  # a row with nothing to learn

    want = whole_logits_loss(hidden, head, labels, softcap)
    (want_grad,) = torch.autograd.grad(want * 3.0, hidden)
    got = linear_cross_entropy(hidden, head, labels, chunk_tokens, softcap)
    (got_grad,) = torch.autograd.grad(got * 3.0, hidden)  # backward scales the gradient found in forward
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6 * want_grad.abs().max().item())
    assert got_grad[1].abs().sum() == 0 and got_grad[2, 14:].abs().sum() == 0  # no target, no gradient


def test_no_gradient_is_computed_without_autograd():
    hidden, head = torch.randn(1, 5, 4, requires_grad=True), torch.nn.Linear(4, 9, bias=False)
    labels = torch.randint(0, 9, (1, 5))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, head, labels, 2)
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(whole_logits_loss(hidden, head, labels, None).item(), rel=1e-6)
