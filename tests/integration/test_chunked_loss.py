"""The chunked loss on the real 4-bit + LoRA model of each kind of head: the summed loss and every
adapter gradient equal those of the whole logits (train.loss_chunk_tokens=0) in fp32, for packed
rows (position ids) and for padded rows with prompt tokens ignored. Llama has its own head; Qwen3
ties it to the embedding; Gemma 2 ties it and soft-caps the logits (at 2 here, so the cap bends
every logit). One rank builds the plain module: nothing to shard, so no FSDP."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fsdpqlora.config import compose_config
from fsdpqlora.data import IGNORE_INDEX
from fsdpqlora.model.build import build_model
from fsdpqlora.model.loss import CHUNKED_LOSS, attach_chunked_loss
from fsdpqlora.train.step import summed_loss
from tests.helpers import FP32, base_overrides, write_test_model

HEADS = {
    "llama": {},
    "qwen3": {"head_dim": 16, "tie_word_embeddings": True},
    "gemma2": {"head_dim": 16, "tie_word_embeddings": True, "final_logit_softcapping": 2.0},
}


def batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 24), generator=generator)
    # Two packed rows of 3 and 2 examples: position ids restart, prompts carry no loss.
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in ((10, 8, 6), (14, 10))])
    packed_labels = ids.clone()
    packed_labels[0, :4] = packed_labels[0, 10:13] = packed_labels[1, 14:16] = IGNORE_INDEX
    packed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": packed_labels, "position_ids": positions}
    # Two padded rows: the second ends in padding; the first has a prompt.
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    padded_labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    padded_labels[0, :9] = IGNORE_INDEX
    return [packed, {"input_ids": ids, "attention_mask": mask, "labels": padded_labels}]


def loss_and_grads(model, batch, device):
    model.zero_grad(set_to_none=True)
    loss = summed_loss(model, batch, device)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", HEADS)
def test_chunked_loss_equals_the_whole_logits(family, tmp_path, cache_dir, process_group):
    model_dir = write_test_model(tmp_path / family, model_type=family, dtype=torch.float32, **HEADS[family])
    cfg = compose_config([*base_overrides(model_dir, cache_dir), *FP32, "train.loss_chunk_tokens=0"])
    model = build_model(cfg, process_group, model_dir).model
    assert not isinstance(model, FSDPModule) and not any(isinstance(p, DTensor) for p in model.parameters())
    assert not hasattr(model, CHUNKED_LOSS)
    with torch.no_grad():  # B != 0, so every adapter takes part in the output and gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    vocab = model.get_base_model().config.vocab_size
    for batch in batches(vocab):
        want_loss, want_grads = loss_and_grads(model, batch, process_group.device)
        attach_chunked_loss(model, 5)  # target tokens in several chunks, the last one shorter
        got_loss, got_grads = loss_and_grads(model, batch, process_group.device)
        delattr(model, CHUNKED_LOSS)
        assert got_loss == pytest.approx(want_loss, rel=1e-6)
        assert want_grads.keys() == got_grads.keys()
        for name, grad in want_grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(), msg=name)
