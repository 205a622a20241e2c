"""LoraDropout (fsdpqlora/model/dropout.py): drops at rate p, scales the rest so the expectation is
the input's, draws its masks from torch's seeded generator (so checkpointing's recompute draws them
again), and replaces peft's nn.Dropout in every LoRA layer."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsdpqlora.model.dropout import DRAW_LEVELS, LoraDropout, keep_mask, use_lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drops_a_fraction_p_and_scales_the_rest_to_keep_the_expectation(p):
    torch.manual_seed(0)
    x = torch.rand(1024, 1024) + 0.5  # no zeros of its own
    out = LoraDropout(p).train()(x)
    dropped = out == 0
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.003)
    rate = round(p * DRAW_LEVELS) / DRAW_LEVELS
    assert rate == pytest.approx(p, abs=1 / DRAW_LEVELS)
    assert torch.equal(out[~dropped], x[~dropped] * (1 / (1 - rate)))


def test_the_draws_are_uniform_in_every_bit_and_position():
    """Each 64-bit number gives four 16-bit draws: no position of the four, and no bit, is biased."""
    torch.manual_seed(1)
    for position in range(4):
        kept = keep_mask((4 * 250_000,), 0.25).view(-1, 4)[:, position]
        assert kept.float().mean().item() == pytest.approx(0.75, abs=0.004)


def test_a_seed_fixes_the_masks_and_another_seed_changes_them():
    x = torch.ones(64, 300)  # an odd number of elements: the last 64-bit number is used in part
    dropout = LoraDropout(0.3).train()
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(first, dropout(x))
    torch.manual_seed(8)
    assert not torch.equal(first, dropout(x))


def test_backward_multiplies_by_the_same_scaled_mask():
    x = torch.randn(32, 48, requires_grad=True)
    out = LoraDropout(0.2).train()(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    scale = 1 / (1 - round(0.2 * DRAW_LEVELS) / DRAW_LEVELS)
    assert torch.equal(x.grad, grad * (out != 0) * scale)


def test_checkpointing_recomputes_the_same_masks():
    layer = nn.Linear(40, 40)
    dropout = LoraDropout(0.25).train()
    x = torch.randn(16, 40, requires_grad=True)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(3)
        x.grad, layer.weight.grad = None, None
        forward = lambda t: layer(dropout(t)).square().sum()  # noqa: E731
        loss = checkpoint(forward, x, use_reentrant=False) if checkpointed else forward(x)
        loss.backward()
        grads.append((x.grad.clone(), layer.weight.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_a_rate_just_under_one_keeps_one_value_in_65536():
    x = torch.ones(64, 1024)
    out = LoraDropout(0.999995).train()(x)
    assert torch.isfinite(out).all() and set(out.unique().tolist()) <= {0.0, float(DRAW_LEVELS)}


def test_evaluation_and_rate_zero_return_the_input_itself():
    x = torch.randn(8, 8)
    assert LoraDropout(0.1).eval()(x) is x
    assert LoraDropout(0.0).train()(x) is x


def test_keeps_the_input_dtype():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    assert LoraDropout(0.1).train()(x).dtype == torch.bfloat16


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_every_peft_lora_dropout_is_replaced_with_the_same_rate(p):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_dropout=p, target_modules=["0", "2"]))
    replaced = use_lora_dropout(peft_model)
    entries = [m.lora_dropout["default"] for m in peft_model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    assert len(entries) == 2
    if p:  # peft's nn.Dropout becomes ours
        assert replaced == 2 and all(type(e) is LoraDropout and e.p == p for e in entries)
    else:  # dropout 0 is peft's nn.Identity, left as it is
        assert replaced == 0 and all(type(e) is nn.Identity for e in entries)
