"""The training runs of benchmarks/gpu.py, one after another in one process group (one torchrun
launch for several runs): each builds the model as training does (meta skeleton, 4-bit, LoRA,
FSDP2, weights streamed in), takes real optimizer steps (train_step) and records its losses, step
times, peak memory and, on rank 0, its adapter.

    torchrun --nproc-per-node N benchmarks/gpu_worker.py OUT_DIR RUNS_JSON

RUNS_JSON maps a run name to {"overrides": [...], "steps": N}; OUT_DIR/<name>.pt receives the
record and OUT_DIR/results.json every run's figures (or the error that ended the run).

With more workers than GPUs (two processes on one GPU) the workers share cuda:0 through gloo: NCCL
refuses two ranks on one device, and fsdpqlora's own workers refuse it too (launch.device).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsdpqlora.config import compose_config  # noqa: E402
from fsdpqlora.data import load_data  # noqa: E402
from fsdpqlora.memory import peak_memory_gib  # noqa: E402
from fsdpqlora.model import adapters  # noqa: E402
from fsdpqlora.model.build import build_model  # noqa: E402
from fsdpqlora.model.directory import check_tokenizer  # noqa: E402
from fsdpqlora.parallel.process_group import Dist, init_distributed, on_rank0  # noqa: E402
from fsdpqlora.preflight import preflight  # noqa: E402
from fsdpqlora.train.determinism import make_deterministic  # noqa: E402
from fsdpqlora.train.optim import build_optimizer, build_scheduler  # noqa: E402
from fsdpqlora.train.step import build_grad_scaler, train_step  # noqa: E402

GIB = 2**30


def join_group() -> Dist:
    """torchrun's group; two workers on one GPU share it through gloo; FSDPQLORA_BENCH_FAKE_WORLD=N:
    rank 0 of N alone, on torch's fake process group (collectives do nothing), with the GPU capped
    at FSDPQLORA_BENCH_GPU_GIB as the rig's GPUs are."""
    fake_world = int(os.environ.get("FSDPQLORA_BENCH_FAKE_WORLD", "0"))
    if fake_world:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            cap = float(os.environ["FSDPQLORA_BENCH_GPU_GIB"]) * GIB
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory, device)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=fake_world)
        return Dist(0, 0, fake_world, device)
    world, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count()
    if not gpus or world <= gpus:
        return init_distributed()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("gloo")
    return Dist(dist.get_rank(), local_rank, world, device)


def synchronize(d: Dist) -> None:
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)


def train(name: str, overrides: list[str], steps: int, d: Dist, out_dir: Path) -> dict:
    cfg = compose_config(overrides)
    if cfg.train.deterministic:
        make_deterministic()
    torch.manual_seed(cfg.train.seed)
    model_dir = on_rank0(lambda: preflight(cfg, d.device.type == "cuda").model_dir)
    data = load_data(cfg, d, check_tokenizer(model_dir))
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(d.device)
    started = time.perf_counter()
    built = build_model(cfg, d, model_dir)
    model = built.model
    optimizer = build_optimizer(cfg, model)  # right after sharding (trap B)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = build_grad_scaler(cfg, d)
    load_seconds = time.perf_counter() - started
    load_peak = peak_memory_gib(d.device)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    losses, seconds, tokens, finite, scales = [], [], [], [], []
    for _ in range(steps):
        micro_batches = data.train.next_step()
        synchronize(d)
        step_started = time.perf_counter()
        result = train_step(model, optimizer, scheduler, micro_batches, data.train.last_step.targets, cfg, d, scaler)
        synchronize(d)
        seconds.append(time.perf_counter() - step_started)
        losses.append(result.loss)
        tokens.append(result.tokens)
        finite.append(result.finite)
        scales.append(result.grad_scale)
    figures = {
        "losses": losses,
        "step_seconds": seconds,
        "tokens": tokens,
        "finite": finite,
        "grad_scales": scales,
        "load_seconds": load_seconds,
        "load_peak_gib": load_peak,
        "train_peak_allocated_gib": peak_memory_gib(d.device),
        "train_peak_reserved_gib": torch.cuda.max_memory_reserved(d.device) / GIB if d.device.type == "cuda" else None,
    }
    state = adapters.gather_adapter_state(model)
    if d.is_main:
        torch.save({k: v.float().cpu() for k, v in state.items()}, out_dir / f"{name}.adapter.pt")
    return figures


def main() -> None:
    out_dir, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    d = join_group()
    results = {}
    for name, run in runs.items():
        try:
            results[name] = {"ok": True, **train(name, run["overrides"], run["steps"], d, out_dir)}
        except Exception as exc:  # recorded: the other runs still tell what they can
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            if dist.get_world_size() > 1:
                break  # a failed collective leaves the group unusable
        finally:
            if d.device.type == "cuda":
                torch.cuda.empty_cache()
    if d.is_main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown (see fsdpqlora/train/__main__.py)
