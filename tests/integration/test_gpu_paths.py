"""The paths that differ on a GPU, checked where CPU workers can check them: the fp16 gradient
scaler over FSDP2's DTensor gradients, merge's quantizer against the bytes training loaded, and
benchmarks/gpu.py's CPU mode (every item at tiny shapes, the bf16-storage canary among them), which
keeps the GPU acceptance run from rotting between GPU machines."""

from __future__ import annotations

import json
import subprocess
import sys

import bitsandbytes as bnb
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fsdpqlora.config import Config, DType, QuantConfig, compose_config, save_run_config
from fsdpqlora.export import merge
from fsdpqlora.export.locate import locate
from fsdpqlora.model import adapters
from fsdpqlora.model.build import build_model
from fsdpqlora.train.step import build_grad_scaler
from tests.helpers import REPO, base_module_name


def test_fp16_scaler_skips_an_overflowed_step_on_every_rank_and_lowers_the_scale(process_group):
    scaler = build_grad_scaler(Config(quant=QuantConfig(compute_dtype=DType.float16)), process_group)
    assert isinstance(scaler, torch.amp.GradScaler)
    assert build_grad_scaler(Config(), process_group) is None  # bf16 needs no scaling
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step(poisoned: bool) -> None:
        scaler.scale(model(torch.randn(2, 8)).square().sum()).backward()
        assert isinstance(model.weight.grad, DTensor)  # the overflow check reduces over the mesh
        if poisoned:
            model.weight.grad.to_local()[0, 0] = float("inf")
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    start_scale = scaler.get_scale()
    before = model.weight.full_tensor().clone()
    step(poisoned=True)
    assert torch.equal(model.weight.full_tensor(), before), "an overflowed step must not touch the weights"
    assert scaler.get_scale() == start_scale * 0.5
    assert optimizer.state[model.weight] == {}, "nor the optimizer's moments"
    step(poisoned=False)
    assert not torch.equal(model.weight.full_tensor(), before)
    assert scaler.get_scale() == start_scale * 0.5  # grows only after 2,000 good steps


def test_merge_reads_exactly_the_4bit_weights_training_loaded(process_group, model_dir, tmp_path):
    """Training quantizes on its device as it loads; merge quantizes again, on the CPU. With a zero
    adapter, merge's fp32 output is its dequantized weight: equal, bit for bit, to the dequantized
    bytes of the sharded model (benchmarks/gpu.py compares the CPU's and the GPU's bytes)."""
    run_dir = tmp_path / "run"
    cfg = compose_config([f"model.path={model_dir}", "model.name=test", f"launch.cache_dir={tmp_path}/cache", "adapter.r=4"])
    model = build_model(cfg, process_group, model_dir).model
    loaded = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            packed = module.weight.full_tensor() if isinstance(module.weight, DTensor) else module.weight
            dequantized = bnb.functional.dequantize_4bit(packed.view(torch.uint8), module.quant_state)
            loaded[base_module_name(name) + ".weight"] = dequantized.float()
    save_run_config(cfg, run_dir)
    state = adapters.gather_adapter_state(model)
    assert all(not v.any() for k, v in state.items() if "lora_B" in k), "a fresh adapter changes nothing"
    adapters.save_adapter(model, state, run_dir / "adapter")
    merge.merge(locate(run_dir, need_adapter=True), tmp_path / "merged", "float32", show_progress=False)
    merged = {}
    for file in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(load_file(file))
    assert len(loaded) == 14  # 7 linears in each of 2 layers
    for name, weight in loaded.items():
        assert torch.equal(merged[name], weight), name


def test_gpu_benchmark_runs_every_item_in_its_cpu_mode(tmp_path):
    out = tmp_path / "gpu.json"
    command = [sys.executable, str(REPO / "benchmarks/gpu.py"), "--cpu", "--work", str(tmp_path), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    items = json.loads(out.read_text())["items"]
    assert list(items) == ["kernels", "canary", "llama8b", "rig70b", "processes", "levers"]
    assert all(item["ok"] for item in items.values()), items
    kernels, canary = items["kernels"], items["canary"]
    assert kernels["quantizer_bytes_equal"] and kernels["dequantize_max_abs_error"] == 0.0
    # Armed: real packed bytes hold NaN patterns a CUDA bf16/fp16 copy would rewrite; on CPU, and for
    # uint8 storage anywhere, FSDP2's all-gather hands back every byte.
    assert canary["bfloat16"]["noncanonical_nan_words_in"] > 0 and canary["float16"]["noncanonical_nan_words_in"] > 0
    assert canary["bfloat16"]["bytes_changed"] == canary["float16"]["bytes_changed"] == canary["uint8"]["bytes_changed"] == 0
    assert items["processes"]["max_loss_difference"] < 1e-4
    assert set(items["levers"]) >= {"activation_offload_off", "activation_offload_on", "fp16_scaler"}
    assert items["llama8b"]["tokens_per_s"] > 0 and items["llama8b"]["planner_gib"] > 0
    assert "[gpu.py] levers: ok" in result.stdout
