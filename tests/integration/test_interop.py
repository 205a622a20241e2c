"""Our bytes and adapters against the Hugging Face stack: transformers + BitsAndBytesConfig, peft."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fsdpqlora.compat import exact_4bit_kernels
from fsdpqlora.config import compose_config
from fsdpqlora.export.generate import bnb_config
from fsdpqlora.model.build import build_model
from tests.helpers import FP32, base_module_name, base_overrides


def _transformers_4bit(model_dir, cfg):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb_config(cfg), dtype=getattr(torch, cfg.model.dtype), device_map="cpu"
    )
    # On AVX512-BF16 CPUs bitsandbytes' eval path computes in lower precision (logits differ by ~0.04
    # here); the dequantize-and-matmul path is the exact reference.
    exact_4bit_kernels(model)
    return model


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantized_bytes_and_state_equal_transformers(model_dir, cache_dir, process_group, dtype):
    overrides = [*base_overrides(model_dir, cache_dir), f"model.dtype={dtype}", f"quant.compute_dtype={dtype}"]
    cfg = compose_config(overrides)
    ours = build_model(cfg, process_group, model_dir, shard=False).model
    reference = _transformers_4bit(model_dir, cfg)
    ours_layers = {base_module_name(name): m for name, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    ref_layers = {name: m for name, m in reference.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert ours_layers.keys() == ref_layers.keys() and len(ref_layers) == 14
    for name, ref in ref_layers.items():
        mine = ours_layers[name]
        assert mine.weight.dtype == ref.weight.dtype == torch.uint8
        assert torch.equal(mine.weight.data.view(-1), ref.weight.data.view(-1)), name
        ours_state = mine.quant_state.as_dict(packed=True)
        ref_state = ref.weight.quant_state.as_dict(packed=True)
        assert ours_state.keys() == ref_state.keys()
        for key, value in ref_state.items():
            assert torch.equal(ours_state[key], value), f"{name}: {key}"


def test_saved_adapter_reloads_in_peft_with_same_logits(runs, model_dir, cache_dir):
    """The adapter trained with 2 FSDP ranks, loaded by peft onto a transformers 4-bit base, gives
    the logits our trained model gave."""
    cfg = compose_config([*base_overrides(model_dir, cache_dir), *FP32])
    base = _transformers_4bit(model_dir, cfg)
    model = PeftModel.from_pretrained(base, runs["dir"] / "full_shard-adapter")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=runs["full_shard"]["probe"]).logits.float()
    trained = runs["full_shard"]["logits_after"]
    # The adapter did change the output: this comparison is not base against base.
    assert (trained - runs["full_shard"]["logits_before"]).abs().max() > 1e-2
    torch.testing.assert_close(logits, trained, rtol=0, atol=1e-5)


def test_lora_gradients_survive_an_eval_forward(model_dir, cache_dir, process_group):
    """Trap A (README, "Two traps that silently break training"): on AVX512-BF16 CPUs an eval-mode
    no-grad forward through Linear4bit repacks its weight in place into a layout whose kernel has no
    autograd, so the LoRA gradients below it become None while the loss still falls;
    compat.exact_4bit_kernels turns that path off on every Linear4bit. After such a forward, and
    after the first optimizer step, every LoRA parameter must still receive a non-zero gradient."""
    cfg = compose_config([*base_overrides(model_dir, cache_dir), "adapter.dropout=0"])
    model = build_model(cfg, process_group, model_dir, shard=False).model
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_checkpoint_recompute_uses_the_forward_dropout_masks(model_dir, cache_dir, process_group):
    """With LoRA dropout on, activation checkpointing must give the gradients of the plain forward:
    its recompute has to draw the same dropout masks."""
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = {}
    for checkpointing in (True, False):
        overrides = [*base_overrides(model_dir, cache_dir), "adapter.dropout=0.3", f"shard.activation_checkpointing={checkpointing}"]
        model = build_model(compose_config(overrides), process_group, model_dir, shard=False).model
        with torch.no_grad():  # B != 0, so the dropout on the LoRA path reaches the output
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        torch.manual_seed(123)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads[checkpointing] = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)
