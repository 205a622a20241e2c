"""No attention across packed examples: the loss and the LoRA gradients of a packed batch equal
those of the same examples run one by one, on the real 4-bit + LoRA model, for each attention
implementation transformers builds the packed mask for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from fsdpqlora.config import compose_config
from fsdpqlora.data import TokenizedSet, prepare
from fsdpqlora.data.packing import best_fit_decreasing, collate
from fsdpqlora.model.build import build_model
from fsdpqlora.train.step import summed_loss
from tests.helpers import FP32, base_overrides, qa_overrides


def loss_and_grads(model, batches, device):
    model.zero_grad(set_to_none=True)
    loss = sum(summed_loss(model, batch, device) for batch in batches)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("precision, rtol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_packed_loss_equals_examples_one_by_one(model_dir, cache_dir, qa_file, process_group, precision, rtol):
    dtype = FP32 if precision == "float32" else ["adapter.dropout=0"]
    overrides = [*base_overrides(model_dir, cache_dir), *qa_overrides(qa_file), *dtype, "shard.activation_checkpointing=false"]
    cfg = compose_config(overrides)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = TokenizedSet.load(prepare(cfg, tokenizer, show_progress=False).train_dir)
    rows = best_fit_decreasing(dataset.lengths, np.arange(8), cfg.data.seq_len)
    assert max(len(row) for row in rows) >= 2, "some rows must hold several examples"
    packed = collate(dataset, rows, tokenizer.pad_token_id, packed=True)

    model = build_model(cfg, process_group, model_dir, shard=False).model
    with torch.no_grad():  # B != 0, so the adapters take part in the output and get gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    alone = [collate(dataset, [[e]], tokenizer.pad_token_id, packed=False) for row in rows for e in row]
    # bf16: the default implementation; fp32 (tight): every one that builds the packed mask
    for implementation in ("sdpa", "eager") if precision == "float32" else ("sdpa",):
        model.set_attn_implementation(implementation)
        want_loss, want_grads = loss_and_grads(model, alone, process_group.device)
        got_loss, got_grads = loss_and_grads(model, [packed], process_group.device)
        assert got_loss == pytest.approx(want_loss, rel=rtol), implementation
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=rtol, atol=rtol * grad.abs().max().item(), msg=name)
    # flex_attention builds the same mask; torch has no flex backward on CPU, so the loss only
    model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        flex_loss = summed_loss(model, packed, process_group.device).item()
    assert flex_loss == pytest.approx(want_loss, rel=rtol)

    if precision == "float32":  # the check can fail: rows read as one sequence each let attention cross examples
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            crossing_loss = summed_loss(model, {k: v for k, v in packed.items() if k != "position_ids"}, process_group.device).item()
        assert abs(crossing_loss - want_loss) > 100 * rtol * want_loss
