"""DoRA (QDoRA) against its closed form, computed by hand from the NF4-dequantized base weight:

    y = m * (W + s*B@A) x / ||W + s*B@A||_row

at initialization (m = ||W||_row, B = 0: the base layer's output) and after a training step that
made B non-zero. The model is FSDP2-sharded (a group of one), so the magnitude is initialized from
all-gathered weights and the forward runs on gathered parameters.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from fsdpqlora.config import compose_config
from fsdpqlora.model.build import build_model
from fsdpqlora.train.optim import build_optimizer
from fsdpqlora.train.step import summed_loss
from tests.helpers import FP32, PROBE, base_module_name, base_overrides


def _dora_outputs(model, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer output, closed form, magnitude, row norms of W) over one forward pass of PROBE."""
    seen = {}

    def closed_form(module, args, output):
        x = args[0]
        base = module.get_base_layer()
        weight = bnb.functional.dequantize_4bit(base.weight.data.contiguous(), base.quant_state).float()
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        m = module.lora_magnitude_vector["default"].weight
        v = weight + module.scaling["default"] * b @ a
        seen["out"] = output.detach().clone()
        seen["expected"] = (m * (x @ v.T) / torch.linalg.norm(v, dim=1)).detach().clone()
        seen["m"], seen["w_norm"] = m.detach().clone(), torch.linalg.norm(weight, dim=1)
        seen["b_abs"] = float(b.abs().sum())

    handle = layer.register_forward_hook(closed_form)
    with torch.no_grad():
        model(input_ids=PROBE, use_cache=False)
    handle.remove()
    return seen


def test_dora_output_equals_the_closed_form(model_dir, cache_dir, process_group):
    cfg = compose_config([*base_overrides(model_dir, cache_dir), *FP32, "adapter.method=dora", "train.lr=1e-2"])
    model = build_model(cfg, process_group, model_dir).model
    optimizer = build_optimizer(cfg, model)
    wanted = ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj")
    layers = [m for name, m in model.named_modules() if base_module_name(name) in wanted and hasattr(m, "lora_A")]
    assert len(layers) == 2
    for layer in layers:
        seen = _dora_outputs(model, layer)
        assert seen["b_abs"] == 0.0
        torch.testing.assert_close(seen["m"], seen["w_norm"], rtol=1e-6, atol=0)
        torch.testing.assert_close(seen["out"], seen["expected"], rtol=1e-4, atol=1e-5)

    batch = {"input_ids": PROBE, "attention_mask": torch.ones_like(PROBE), "labels": PROBE}
    summed_loss(model, batch, process_group.device).backward()
    optimizer.step()
    for layer in layers:
        seen = _dora_outputs(model, layer)
        assert seen["b_abs"] > 0.0
        assert (seen["m"] - seen["w_norm"]).abs().max() > 1e-4  # the magnitude trained too
        torch.testing.assert_close(seen["out"], seen["expected"], rtol=1e-4, atol=1e-5)
