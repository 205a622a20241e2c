"""LoRA linears that read the same input share one A product and one dropout mask
(fsdpqlora/model/shared_input.py), against peft's own per-module path (adapter.fused_shared_inputs=false):
the forward bit for bit and the gradients to rounding at dropout 0, in fp32 and bf16 compute; one
mask per shared input at dropout p, at rate p; the same masks redrawn by checkpointing's recompute;
every family's groups fed one tensor. One rank builds the plain module (no FSDP; the two-rank runs
are tests/integration/test_levers.py's)."""

from __future__ import annotations

import pytest
import torch

from fsdpqlora.config import compose_config
from fsdpqlora.model.adapters import ADAPTER_NAME, lora_parameters
from fsdpqlora.model.build import build_model
from fsdpqlora.model.dropout import LoraDropout
from fsdpqlora.model.shared_input import SharedInput, SharedInputLinear4bit
from fsdpqlora.train.step import summed_loss
from tests.helpers import FP32, PROBE, base_overrides, write_test_model

UNFUSED = ["adapter.fused_shared_inputs=false"]
PRECISIONS = {
    "fp32": FP32,
    "bf16_mixed": ["adapter.dropout=0"],  # bf16 base, fp32 adapter: peft casts the input to fp32
    "bf16": ["adapter.dropout=0", "adapter.dtype=bfloat16"],  # the adapter computes in bf16 too, as under FSDP2
}
BATCH = {"input_ids": PROBE, "attention_mask": torch.ones_like(PROBE), "labels": PROBE}


def _build(model_dir, cache_dir, process_group, overrides):
    """The test model with every LoRA weight drawn from one seed (B is zero at init, which would hide
    the adapters), the same in every model built."""
    cfg = compose_config([*base_overrides(model_dir, cache_dir), *overrides])
    model = build_model(cfg, process_group, model_dir, shard=False).model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in lora_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _logits_loss_grads(model, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        logits = model(input_ids=PROBE, use_cache=False).logits
    torch.manual_seed(seed)
    loss = summed_loss(model, BATCH, torch.device("cpu"))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in lora_parameters(model)}
    model.zero_grad(set_to_none=True)
    return logits, loss.detach(), grads


def _groups(model) -> list[SharedInput]:
    return list({id(m.shared_input): m.shared_input for m in model.modules() if isinstance(m, SharedInputLinear4bit)}.values())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_forward_is_peft_bit_for_bit(precision, model_dir, cache_dir, process_group):
    fused = _build(model_dir, cache_dir, process_group, PRECISIONS[precision])
    peft = _build(model_dir, cache_dir, process_group, PRECISIONS[precision] + UNFUSED)
    assert len(_groups(fused)) == 2 * 2 and not _groups(peft)  # q/k/v and gate/up of 2 layers
    logits, loss, grads = _logits_loss_grads(fused)
    peft_logits, peft_loss, peft_grads = _logits_loss_grads(peft)
    assert torch.equal(logits, peft_logits) and torch.equal(loss, peft_loss)
    # The A and B gradients are computed as peft's; only the input's gradient sums the group's
    # branches in another order, which reaches every adapter upstream of the last layer's MLP.
    for name, grad in grads.items():
        if ".layers.1.mlp." in name:
            assert torch.equal(grad, peft_grads[name]), name
        # fp32: rounding; bf16: two roundings of 8 bits in every upstream input gradient (peft's own
        # bf16 gradients are 1-5% from fp32 compute's here).
        tolerance = 1e-5 if precision == "fp32" else 3e-2
        torch.testing.assert_close(grad, peft_grads[name], rtol=0, atol=tolerance * peft_grads[name].abs().max().item())


def test_a_module_called_on_another_input_gets_its_own_product(model_dir, cache_dir, process_group):
    fused = _build(model_dir, cache_dir, process_group, FP32)
    peft = _build(model_dir, cache_dir, process_group, FP32 + UNFUSED)
    x1, x2 = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    outputs = []
    for model in (fused, peft):
        attention = model.base_model.model.model.layers[0].self_attn
        with torch.no_grad():
            outputs.append([attention.q_proj(x1), attention.k_proj(x2), attention.v_proj(x1), attention.q_proj(x1)])
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


@pytest.mark.parametrize("fused", [True, False])
def test_one_dropout_mask_per_shared_input_at_rate_p(fused, model_dir, cache_dir, process_group):
    """A = [I 0] and B = [I 0]^T: each module's LoRA output is s * dropout(x)[:, :r], so on x = 1 its
    zeros are its mask's. Fused: q, k and v share one mask; peft: three independent ones. Either
    way each drops a fraction p of its input and scales the rest by 1/(1-p)."""
    p, r, scaling = 0.25, 16, 2.0
    model = _build(model_dir, cache_dir, process_group, [*FP32[:-2], f"adapter.dropout={p}", *([] if fused else UNFUSED)])
    attention = model.base_model.model.model.layers[0].self_attn
    modules = (attention.q_proj, attention.k_proj, attention.v_proj)
    with torch.no_grad():
        for module in modules:
            module.lora_A[ADAPTER_NAME].weight.copy_(torch.eye(r, 64))
            module.lora_B[ADAPTER_NAME].weight.copy_(torch.eye(module.out_features, r))
            module.scaling[ADAPTER_NAME] = scaling
        x = torch.ones(4096, 64)
        torch.manual_seed(3)
        lora = [(module(x) - module.base_layer(x))[:, :r] for module in modules]
        torch.manual_seed(3)
        first_mask = LoraDropout(p)(x)[:, :r] != 0  # what the first module's dropout draws
    kept = [out != 0 for out in lora]
    for out, mask in zip(lora, kept, strict=True):
        assert (1 - mask.float().mean()).item() == pytest.approx(p, abs=0.01)
        assert torch.allclose(out[mask], torch.tensor(scaling / (1 - p)))
    assert torch.equal(kept[0], first_mask)
    same = [torch.equal(kept[0], mask) for mask in kept[1:]]
    assert same == ([True, True] if fused else [False, False])


def test_checkpointing_recomputes_the_same_masks(model_dir, cache_dir, process_group):
    """At dropout > 0, the same seed gives the same logits, loss and gradients with and without
    activation checkpointing: the recompute restores the RNG state and draws each group's one mask
    again. Nothing stays in a group after the step (the recompute may stop before a group is done)."""
    dropout = [*FP32[:-2], "adapter.dropout=0.25"]
    checkpointed = _build(model_dir, cache_dir, process_group, [*dropout, "shard.activation_checkpointing=true"])
    plain = _build(model_dir, cache_dir, process_group, [*dropout, "shard.activation_checkpointing=false"])
    checkpointed.train(), plain.train()
    logits, loss, grads = _logits_loss_grads(checkpointed, seed=4)
    plain_logits, plain_loss, plain_grads = _logits_loss_grads(plain, seed=4)
    assert torch.equal(logits, plain_logits) and torch.equal(loss, plain_loss)
    assert all(torch.equal(grad, plain_grads[name]) for name, grad in grads.items())
    assert not torch.equal(loss, _logits_loss_grads(plain, seed=5)[1])  # the masks do change the loss
    assert all(group.input is None for group in _groups(checkpointed) + _groups(plain))


# Every family with groups (llama is the shared test model): q/k/v, and gate/up where the MLP is a
# gated one; Phi-3's linears are fused already; Mixtral's experts each read their own tokens.
FAMILIES = {
    "qwen3": ({"head_dim": 16, "tie_word_embeddings": True}, 2),
    "gemma2": ({"head_dim": 16, "tie_word_embeddings": True}, 2),
    "gemma3_text": ({"head_dim": 16, "tie_word_embeddings": True}, 2),
    "phi3": ({}, 0),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, 1),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_feeds_its_groups_one_tensor(family, tmp_path, cache_dir, process_group, monkeypatch):
    """One A product per group and layer in a forward (a group whose modules got different tensors
    would compute more), and logits bit for bit those of peft's path."""
    config, groups_per_layer = FAMILIES[family]
    model_dir = write_test_model(tmp_path / family, model_type=family, dtype=torch.float32, **config)
    fused = _build(model_dir, cache_dir, process_group, FP32)
    peft = _build(model_dir, cache_dir, process_group, FP32 + UNFUSED)
    assert len(_groups(fused)) == 2 * groups_per_layer
    computed = []
    compute = SharedInput._compute
    monkeypatch.setattr(SharedInput, "_compute", lambda group, x: computed.append(group) or compute(group, x))
    with torch.no_grad():
        logits = fused(input_ids=PROBE, use_cache=False).logits
        assert torch.equal(logits, peft(input_ids=PROBE, use_cache=False).logits)
    assert len(computed) == len(set(map(id, computed))) == 2 * groups_per_layer
    assert all(group.input is None for group in _groups(fused))
