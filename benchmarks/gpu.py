"""The acceptance run for a GPU machine: what CPU workers cannot show (the CUDA NF4 kernels, FSDP2's
CUDA copies, CUDA memory against the planner, NCCL), in one command sized for about 9 minutes on one
H100/H200 without a network.

    .venv/bin/python benchmarks/gpu.py                  # on the GPU: results/gpu-<host>-1gpu-<date>.json
    .venv/bin/python benchmarks/gpu.py --cpu --out F    # tiny shapes, fp32, gloo, a minute at most: the
                                                        # test suite runs it (tests/integration/test_gpu_paths.py)

Items, each recorded with its figures or with the error that ended it (the others still run):

1. kernels: bitsandbytes' NF4 dequantization against a table-lookup reference, its 4-bit matmul
   (one token: the inference kernel; a batch with backward: training's path) against a matmul with
   the reference weight, and the quantizer's bytes on the CPU against those on the GPU (training
   quantizes on the GPU, `fsdpqlora merge` on the CPU).
2. canary: packed bytes stored as bfloat16, float16 and uint8 through FSDP2's all-gather: unchanged?
   (pytorch issue 159333 / bitsandbytes issue 1945; fsdpqlora refuses 16-bit storage on CUDA.)
3. llama8b: a Llama-3.1-8B-config model with random weights (written to local disk first), one
   process, micro-batch 2, 2,048 tokens: tokens/s, MFU (6N, and the planner's FLOPs per token),
   peak memory allocated and reserved against `fsdpqlora plan`'s estimate for the same run.
4. rig70b: rank 0 of a Llama-3.1-70B-config run on the 2x24GB rig with the planner's proposed
   settings, emulated on one GPU: torch's fake process group (world 2, collectives do nothing) and
   torch.cuda.set_per_process_memory_fraction capping the GPU at 24 GiB. Only a few decoder layers
   are built; the full model's peak is the measured one plus the planner's terms for the layers not
   built (said so in the record): does it fit, and by how much.
5. processes: two processes on the one GPU (sharing it through gloo: NCCL refuses two ranks on one
   device) against one process with twice the gradient accumulation, the same global batches:
   losses and the saved adapter.
6. levers: activation offload on and off, fp16 with the gradient scaler, paged_adamw_8bit (CUDA
   only): each trains (finite losses, the last below the first).

The CPU mode runs every item at tiny shapes (the 8B and 70B architectures shrunk to a test size)
so that the program cannot rot; its figures say nothing about a GPU and go only where --out says.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from report import describe_machine, save_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2**30
ITEMS = ("kernels", "canary", "llama8b", "rig70b", "processes", "levers")

# The CPU mode's shapes (those of the test suite's model): every linear a multiple of the 64-element block.
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=512)  # fmt: skip
# Items 5 and 6 on a GPU: small enough to take seconds, large enough for real kernels.
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
RIG70B_LAYERS = 4  # decoder layers built of the 70B model's 80


class Mode:
    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = torch.device("cpu" if cpu else "cuda")
        self.dtype = torch.float32 if cpu else torch.bfloat16
        self.precision = ["model.dtype=float32", "quant.compute_dtype=float32"] if cpu else []
        self.seq_len = 128 if cpu else 2048
        self.steps = 3 if cpu else 12
        self.max_examples = 64 if cpu else 2000  # tokenized once per tokenizer; enough rows for every run


# --- a random checkpoint of a real architecture ----------------------------------------------


def write_random_checkpoint(architecture: str, out_dir: Path, device: torch.device, **config) -> int:
    """conf/architectures/<architecture>.json (changed by `config`) as a hub checkpoint with random
    bf16 weights (norms 1), shards of at most 2 GB with an index, and a small tokenizer. Written once
    per directory; returns the parameter count without the input embedding (the N of 6N)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdpqlora.assets import train_tokenizer

    hf = {**json.loads((REPO / "conf/architectures" / f"{architecture}.json").read_text()), **config}
    hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    hf_config.dtype = "bfloat16"
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(hf_config).state_dict().items()}
    n = sum(torch.Size(s).numel() for name, s in shapes.items() if "embed_tokens" not in name)
    if (out_dir / "model.safetensors.index.json").exists():
        return n
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out_dir, vocab_size=min(512, hf_config.vocab_size))
    hf_config.bos_token_id, hf_config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    hf_config.pad_token_id = tokenizer.pad_token_id
    hf_config.save_pretrained(out_dir)
    generator = torch.Generator(device).manual_seed(0)
    files: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        if sizes[-1] and sizes[-1] + tensor.nbytes > 2 * 10**9:
            files.append({})
            sizes.append(0)
        files[-1][name] = tensor
        sizes[-1] += tensor.nbytes
    weight_map = {}
    for i, tensors in enumerate(files):
        file = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return n


def checkpoint(mode: Mode, work: Path, architecture: str, **config) -> tuple[Path, int]:
    """The random checkpoint of an item and its N (see write_random_checkpoint). The CPU mode's items
    share one at the test shapes (one tokenizer, one tokenized cache): it checks the program only."""
    if mode.cpu:
        architecture, config = "llama-3.1-8b", TINY
    name = "-".join([architecture, *(f"{k}{v}" for k, v in sorted(config.items()))])
    model_dir = work / ("tiny-llama" if mode.cpu else name)
    return model_dir, write_random_checkpoint(architecture, model_dir, mode.device, **config)


# --- 1. kernels ------------------------------------------------------------------------------


def nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape: tuple) -> torch.Tensor:
    """NF4 dequantization by table lookup, in fp32: two 4-bit codes per byte (the first in the high
    nibble), each block of `blocksize` values scaled by its absmax."""
    from bitsandbytes.functional import get_4bit_type

    table = get_4bit_type("nf4", device="cpu").float()
    codes = packed.cpu().view(torch.uint8).flatten().long()
    indices = torch.stack([codes >> 4, codes & 15], dim=-1).flatten()
    scales = absmax.cpu().float().repeat_interleave(blocksize)[: indices.numel()]
    return (table[indices] * scales).reshape(shape)


def item_kernels(mode: Mode) -> dict:
    import bitsandbytes as bnb

    from fsdpqlora.config import QuantConfig
    from fsdpqlora.model.quant import quantize

    out_features, in_features = (256, 512) if mode.cpu else (4096, 14336)
    torch.manual_seed(0)
    weight = (torch.randn(out_features, in_features) * 0.02).to(torch.bfloat16)
    record: dict = {"shape": [out_features, in_features]}
    # The quantizer's bytes where merge runs (CPU) against where training runs (the GPU), with the
    # default settings (double quantization: the absmax is itself quantized).
    qcfg = QuantConfig()
    cpu_packed, cpu_state = quantize(weight, qcfg, torch.device("cpu"))
    dev_packed, dev_state = quantize(weight, qcfg, mode.device)
    cpu_dict, dev_dict = cpu_state.as_dict(packed=True), dev_state.as_dict(packed=True)
    record["quantizer_bytes_equal"] = torch.equal(cpu_packed, dev_packed.cpu())
    record["quantizer_packed_bytes_differing"] = int((cpu_packed != dev_packed.cpu()).sum())
    record["quantizer_state_equal"] = cpu_dict.keys() == dev_dict.keys() and all(
        torch.equal(v, dev_dict[k].cpu()) if isinstance(v, torch.Tensor) else v == dev_dict[k] for k, v in cpu_dict.items()
    )
    # Dequantization and the 4-bit matmul against the reference, without double quantization so
    # that the reference reads the absmax as it is.
    packed, state = quantize(weight, QuantConfig(double_quant=False), mode.device)
    reference = nf4_reference(packed, state.absmax, state.blocksize, (out_features, in_features))
    state.dtype = torch.float32  # the output's dtype: fp32, as the reference computes
    dequantized = bnb.functional.dequantize_4bit(packed, state).cpu()
    record["dequantize_max_abs_error"] = float((dequantized - reference).abs().max())
    ref_weight = reference.to(mode.device, mode.dtype)
    state.dtype = mode.dtype
    with torch.no_grad():
        token = torch.randn(1, 1, in_features, device=mode.device, dtype=mode.dtype)
        record["matmul_one_token_rel_error"] = _rel_error(bnb.matmul_4bit(token, packed.t(), quant_state=state), token @ ref_weight.t())
    batch = torch.randn(2, 64, in_features, device=mode.device, dtype=mode.dtype, requires_grad=True)
    out = bnb.matmul_4bit(batch, packed.t(), quant_state=state)
    out.float().square().sum().backward()
    grad = batch.grad.clone()
    batch.grad = None
    ref_out = batch @ ref_weight.t()
    ref_out.float().square().sum().backward()
    record["matmul_batch_rel_error"] = _rel_error(out, ref_out)
    record["matmul_backward_rel_error"] = _rel_error(grad, batch.grad)
    tolerance = 0.0 if mode.cpu else 2e-2  # bf16 products on the GPU, fp32 on the CPU
    record["ok"] = (
        record["quantizer_bytes_equal"]
        and record["quantizer_state_equal"]
        and record["dequantize_max_abs_error"] < 1e-6
        and max(record[k] for k in ("matmul_one_token_rel_error", "matmul_batch_rel_error", "matmul_backward_rel_error"))
        <= max(tolerance, 1e-5)
    )
    return record


def _rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).abs().max() / reference.abs().max())


# --- 2. the bf16-storage canary ---------------------------------------------------------------


def noncanonical_nans(words: torch.Tensor) -> int:
    """16-bit words that are NaN patterns other than the one a CUDA bf16/fp16 copy writes."""
    as_float = words.view(torch.bfloat16 if words.dtype == torch.bfloat16 else torch.float16)
    canonical = torch.tensor([float("nan")], dtype=as_float.dtype).view(torch.int16)
    return int((torch.isnan(as_float) & (as_float.view(torch.int16) != canonical)).sum())


def storage_through_fsdp(storage: torch.dtype, packed_uint8: torch.Tensor, device: torch.device) -> dict:
    """Packed 4-bit bytes held as `storage` in one FSDP2 unit, all-gathered by FSDP2 (unshard) and
    compared with what went in. A 16-bit storage's unit holds only tensors of that dtype (the case
    where FSDP2 copies the buffers in that dtype); uint8 sits beside a bf16 norm, as in our layers."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    packed_uint8 = packed_uint8.flatten()
    stored = packed_uint8.view(storage).reshape(-1, 1).to(device)
    unit = nn.Module()
    unit.packed = nn.Parameter(stored.clone(), requires_grad=False)
    unit.norm = nn.Parameter(torch.ones(64, dtype=torch.bfloat16 if storage == torch.uint8 else storage, device=device), requires_grad=False)  # fmt: skip
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    param_dtype = torch.bfloat16 if storage == torch.uint8 else storage
    fully_shard(unit, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype))
    unit.unshard()
    gathered = unit.packed.detach().view(torch.uint8).flatten().cpu().clone()  # resharding frees the buffer
    unit.reshard()
    words = stored.cpu() if storage != torch.uint8 else None
    return {
        "noncanonical_nan_words_in": noncanonical_nans(words) if words is not None else 0,
        "bytes_changed": int((gathered != packed_uint8.cpu()).sum()),
    }


def item_canary(mode: Mode) -> dict:
    from fsdpqlora.config import QuantConfig
    from fsdpqlora.model.quant import quantize

    torch.manual_seed(0)
    shape = (512, 1024) if mode.cpu else (4096, 4096)
    packed, _ = quantize((torch.randn(shape) * 0.02).to(torch.bfloat16), QuantConfig(), mode.device)
    record = {dtype: storage_through_fsdp(getattr(torch, dtype), packed, mode.device) for dtype in ("bfloat16", "float16", "uint8")}
    record["ok"] = record["uint8"]["bytes_changed"] == 0 and all(record[d]["noncanonical_nan_words_in"] > 0 for d in ("bfloat16", "float16"))  # fmt: skip
    record["bf16_storage_safe_here"] = record["bfloat16"]["bytes_changed"] == 0
    record["fp16_storage_safe_here"] = record["float16"]["bytes_changed"] == 0
    return record


# --- training runs (items 3 to 6) -----------------------------------------------------------


FAKE_RIG = {"FSDPQLORA_BENCH_FAKE_WORLD": "2", "FSDPQLORA_BENCH_GPU_GIB": "24"}
# How the runs of one launch are started: workers and the environment they get.
LAUNCH_KINDS = {"one": (1, {}), "two": (2, {}), "fake": (1, FAKE_RIG)}


class Launches:
    """The training runs of items 3 to 6: benchmarks/gpu_worker.py, several runs per launch (torchrun
    with 1 or 2 workers, or one plain process on the fake process group). A run is a spec
    {"kind", "overrides", "steps"}; its record holds its figures or the error that ended it. On a GPU
    each item's runs are launched when the item asks (memory peaks of their own); the CPU mode
    launches every item's runs up front, one launch per kind, since imports dominate a tiny run."""

    def __init__(self, work: Path):
        self.work, self.records = work, {}

    def records_of(self, specs: dict[str, dict]) -> dict[str, dict]:
        by_kind: dict[str, dict] = {}
        for name, spec in specs.items():
            if name not in self.records:
                by_kind.setdefault(spec["kind"], {})[name] = spec
        for kind, runs in by_kind.items():
            try:
                self.records.update(self._launch(kind, runs))
            except Exception as exc:  # every run of the launch carries its error
                self.records.update({name: {"ok": False, "error": f"{type(exc).__name__}: {exc}"} for name in runs})
        return {name: self.records[name] for name in specs}

    def _launch(self, kind: str, runs: dict) -> dict:
        nproc, env = LAUNCH_KINDS[kind]
        out = self.work / f"launch-{kind}-{len(list(self.work.glob('launch-*')))}"
        out.mkdir(parents=True)
        (out / "runs.json").write_text(json.dumps(runs))
        worker = [str(REPO / "benchmarks/gpu_worker.py"), str(out), str(out / "runs.json")]
        if kind == "fake":
            command = [sys.executable, *worker]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker]
        # Not this process's group of one: torchrun (or the fake group) makes the workers' own.
        inherited = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        threads = str(max(1, (os.cpu_count() or 2) // nproc))
        result = subprocess.run(command, env={**inherited, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, **env},
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        if not (out / "results.json").exists():
            raise RuntimeError(f"worker launch failed (exit code {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        records = json.loads((out / "results.json").read_text())
        for name, record in records.items():
            record["adapter_file"] = str(out / f"{name}.adapter.pt")
        return records


def base_overrides(mode: Mode, model_dir: Path, work: Path, name: str) -> list[str]:
    return [
        f"model.name={name}",
        f"model.path={model_dir}",
        f"launch.cache_dir={work / 'cache'}",
        f"data.seq_len={mode.seq_len}",
        f"data.max_examples={mode.max_examples}",
        "adapter.dropout=0",
        "train.warmup_steps=0",
        *mode.precision,
    ]


def median_tokens_per_second(record: dict) -> float:
    rates = [t / s for t, s in zip(record["tokens"], record["step_seconds"], strict=True)][2:]  # the first two: warm-up
    return statistics.median(rates)


def planner_estimate(overrides: list[str], rig: list[str]):
    from fsdpqlora.config import compose_config
    from fsdpqlora.plan.arch import architecture, hf_config_of
    from fsdpqlora.plan.cost import flops_per_token
    from fsdpqlora.plan.memory import Levers, estimate
    from fsdpqlora.plan.rig import rig_of

    cfg = compose_config([*overrides, *rig])
    arch, levers, machine = architecture(cfg, hf_config_of(cfg)), Levers.of(cfg), rig_of(cfg)
    return estimate(arch, cfg, levers, machine), flops_per_token(arch, cfg, levers.checkpoint_every), machine


def runs_llama8b(mode: Mode, work: Path) -> dict:
    model_dir, n = checkpoint(mode, work, "llama-3.1-8b")
    overrides = [*base_overrides(mode, model_dir, work, "llama-3.1-8b-random"), "train.micro_batch_size=2"]
    return {"llama8b": {"kind": "one", "overrides": overrides, "steps": mode.steps, "parameters_6n": n}}


def item_llama8b(mode: Mode, work: Path, launches: Launches) -> dict:
    spec = runs_llama8b(mode, work)["llama8b"]
    overrides, n = spec["overrides"], spec["parameters_6n"]
    record = launches.records_of({"llama8b": spec})["llama8b"]
    if not record["ok"]:
        return record
    breakdown, flops, rig = planner_estimate(overrides, ["rig.name=auto"] + (["launch.cpu_workers=1"] if mode.cpu else []))
    tokens_per_s = median_tokens_per_second(record)
    peak_flops = rig.tflops * 1e12
    planned = (breakdown.host_total if mode.cpu else breakdown.gpu_allocated) / GIB
    measured = record["train_peak_allocated_gib"]
    return {
        "ok": all(record["finite"]),
        "parameters_6n": n,
        "tokens_per_s": tokens_per_s,
        "mfu_6n": tokens_per_s * 6 * n / peak_flops,
        "mfu_planner_flops": tokens_per_s * flops / peak_flops,
        "peak_tflops_assumed": rig.tflops,
        "planner_gib": planned,
        "planner_lines_gib": {k: v / GIB for k, v in (breakdown.host if mode.cpu else breakdown.gpu).items()},
        "measured_peak_allocated_gib": measured,
        "measured_peak_reserved_gib": record["train_peak_reserved_gib"],
        "planner_reserved_gib": None if mode.cpu else breakdown.gpu_reserved / GIB,
        "measured_over_planned": measured / planned if planned else None,
        "run": record,
    }


RIG70B_USER = ["model=llama-3.1-70b", "data.seq_len=2048", "train.micro_batch_size=2"]  # bf16, as a user runs it
RIG70B_RIG = ["rig=2x24gb"]


def runs_rig70b(mode: Mode, work: Path) -> dict:
    """Rank 0 of the planner's fastest configuration that fits (the real plan; the CPU mode runs it
    at the test shapes in fp32), a few decoder layers of the model built."""
    from fsdpqlora.config import compose_config
    from fsdpqlora.plan.arch import architecture, hf_config_of
    from fsdpqlora.plan.memory import Levers
    from fsdpqlora.plan.rig import rig_of
    from fsdpqlora.plan.search import changed_overrides, fastest_fitting

    cfg = compose_config([*RIG70B_USER, *RIG70B_RIG])
    plans = fastest_fitting(architecture(cfg, hf_config_of(cfg)), cfg, rig_of(cfg))
    if not plans:
        raise RuntimeError("the planner finds no configuration of the 70B model that fits 2 x 24 GiB")
    proposed = changed_overrides(Levers.of(cfg), plans[0].levers)
    if mode.cpu:  # paged optimizers page GPU memory: refused on CPU workers
        proposed = [o.replace("paged_", "") for o in proposed]
    layers = TINY["num_hidden_layers"] if mode.cpu else RIG70B_LAYERS
    model_dir, _ = checkpoint(mode, work, "llama-3.1-70b", num_hidden_layers=layers)
    overrides = [*base_overrides(mode, model_dir, work, "llama-3.1-70b-few-layers"), "train.micro_batch_size=2", *proposed]
    return {"rig70b": {"kind": "fake", "overrides": overrides, "steps": 3, "proposed": proposed, "layers": layers}}


def item_rig70b(mode: Mode, work: Path, launches: Launches) -> dict:
    spec = runs_rig70b(mode, work)["rig70b"]
    overrides, proposed, layers, rig, user = spec["overrides"], spec["proposed"], spec["layers"], RIG70B_RIG, RIG70B_USER
    record = launches.records_of({"rig70b": spec})["rig70b"]
    if not record["ok"]:
        return {**record, "proposed": proposed}
    # The planner's estimate for the layers built and for the whole model, on the same rig: the
    # difference is its terms for the layers not built, added to what was measured.
    few, _, _ = planner_estimate(overrides, rig)
    full_cfg = [*user, *proposed, f"launch.cache_dir={work / 'cache'}"]
    full, _, _ = planner_estimate(full_cfg, rig)
    key = "host_total" if mode.cpu else "gpu_reserved"
    measured = record["train_peak_reserved_gib"] if not mode.cpu else record["train_peak_allocated_gib"]
    scaled = measured + (getattr(full, key) - getattr(few, key)) / GIB
    return {
        "ok": all(record["finite"]),
        "proposed": proposed,
        "layers_built": layers,
        "scaled_by": "measured peak of the layers built + the planner's estimate for the 80 layers - its estimate for those built",
        "measured_peak_reserved_gib": measured,
        "planner_few_layers_gib": getattr(few, key) / GIB,
        "planner_full_gib": getattr(full, key) / GIB,
        "full_model_peak_gib": scaled,
        "fits_24_gib": scaled <= 24,
        "headroom_gib": 24 - scaled,
        "run": record,
    }


def small_model_overrides(mode: Mode, work: Path) -> list[str]:
    """Items 5 and 6: a small Llama with random weights, micro-batches of 2, a learning rate at which
    a few steps show the loss falling."""
    model_dir, _ = checkpoint(mode, work, "llama-3.1-8b", **SMALL)
    return [*base_overrides(mode, model_dir, work, "small-llama"), "train.micro_batch_size=2", "train.lr=1e-2"]


def runs_processes(mode: Mode, work: Path) -> dict:
    """Two processes against one with twice the accumulation: the same global batches."""
    base = small_model_overrides(mode, work)
    return {
        "one": {"kind": "one", "overrides": [*base, "train.grad_accum_steps=2"], "steps": mode.steps},
        "two": {"kind": "two", "overrides": base, "steps": mode.steps},
    }


def item_processes(mode: Mode, work: Path, launches: Launches) -> dict:
    records = launches.records_of(runs_processes(mode, work))
    one, two = records["one"], records["two"]
    if not (one["ok"] and two["ok"]):
        return {"ok": False, "one_process": one, "two_processes": two}
    adapter_one, adapter_two = torch.load(one["adapter_file"]), torch.load(two["adapter_file"])
    loss_diff = max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True))
    adapter_diff = max(float((adapter_one[k] - adapter_two[k]).abs().max()) for k in adapter_one)
    tolerance = 1e-4 if mode.cpu else 2e-2  # fp32 sums in another order; bf16 compute on the GPU
    return {
        "ok": adapter_one.keys() == adapter_two.keys() and loss_diff <= tolerance,
        "losses_one_process": one["losses"],
        "losses_two_processes": two["losses"],
        "max_loss_difference": loss_diff,
        "max_adapter_difference": adapter_diff,
    }


LEVERS = {
    "activation_offload_off": [],
    "activation_offload_on": ["shard.activation_offload=true"],
    "embedding_on_host": ["shard.embedding_on_host=true"],
    "fp16_scaler": ["model.dtype=float16", "quant.compute_dtype=float16"],
    "paged_adamw_8bit": ["train.optimizer=paged_adamw_8bit"],  # CUDA only
}


def runs_levers(mode: Mode, work: Path) -> dict:
    base = small_model_overrides(mode, work)
    levers = {k: v for k, v in LEVERS.items() if not (mode.cpu and k == "paged_adamw_8bit")}
    return {name: {"kind": "one", "overrides": [*base, *extra], "steps": mode.steps} for name, extra in levers.items()}


def item_levers(mode: Mode, work: Path, launches: Launches) -> dict:
    specs = runs_levers(mode, work)
    records = launches.records_of(specs)
    summary = {}
    for name, record in records.items():
        trains = record["ok"] and all(record["finite"]) and record["losses"][-1] < record["losses"][0]
        summary[name] = {"trains": trains, **{k: record.get(k) for k in ("losses", "grad_scales", "error", "train_peak_allocated_gib")}}
    return {"ok": all(s["trains"] for s in summary.values()) and records.keys() == specs.keys(), **summary}


ITEM_FUNCTIONS = {
    "kernels": lambda mode, work, launches: item_kernels(mode),
    "canary": lambda mode, work, launches: item_canary(mode),
    "llama8b": item_llama8b,
    "rig70b": item_rig70b,
    "processes": item_processes,
    "levers": item_levers,
}
RUNS = {"llama8b": runs_llama8b, "rig70b": runs_rig70b, "processes": runs_processes, "levers": runs_levers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes, fp32, gloo workers: checks the program, measures nothing")
    parser.add_argument("--items", default=",".join(ITEMS), help=f"comma-separated, of {', '.join(ITEMS)}")
    parser.add_argument("--work", help="where checkpoints and runs are written (default: a temporary directory)")
    parser.add_argument("--out", help="the result file (default on a GPU: benchmarks/results/gpu-<host>-<gpus>-<date>.json)")
    parser.add_argument("--tag", help="replaces <host>-<gpus> in the result file's name")
    args = parser.parse_args(argv)
    items = args.items.split(",")
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        parser.error(f"unknown items {unknown}; items: {', '.join(ITEMS)}")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; --cpu runs the program at tiny shapes on CPU")
    mode = Mode(args.cpu)

    from fsdpqlora.parallel.process_group import init_distributed

    init_distributed()  # a group of one, for the canary's FSDP2 unit (nccl on the GPU, gloo on CPU)
    results = {}
    with tempfile.TemporaryDirectory(prefix="fsdpqlora-gpu-") as tmp:
        work = Path(args.work or tmp)
        launches = Launches(work)
        if mode.cpu:
            try:
                launches.records_of({name: spec for item in items if item in RUNS for name, spec in RUNS[item](mode, work).items()})
            except Exception:  # each item meets the error again, and records it
                pass
        for item in items:
            started = time.perf_counter()
            try:
                results[item] = ITEM_FUNCTIONS[item](mode, work, launches)
            except Exception as exc:  # recorded; the other items still run
                results[item] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            results[item]["seconds"] = round(time.perf_counter() - started, 1)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next item's workers share the GPU with this process
            status = "ok" if results[item]["ok"] else f"FAILED: {results[item].get('error', 'see the record')}"
            print(f"[gpu.py] {item}: {status} ({results[item]['seconds']} s)", flush=True)
    report = {"mode": "cpu" if args.cpu else "cuda", "items": results}
    machine = describe_machine()
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "gpu", "machine": machine, **report}, indent=2) + "\n")
        print(f"[gpu.py] written to {args.out}")
    elif not args.cpu:
        print(f"[gpu.py] written to {save_report('gpu', report, machine, args.tag)}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # gloo's threads can abort the interpreter's teardown (see fsdpqlora/train/__main__.py)
