"""Runs under torchrun: loads checkpoints into the sharded 4-bit + LoRA model and records what
tests/integration/test_loading.py compares against transformers: logits, every 4-bit layer's full packed bytes
and quantization state, this rank's local shards, the losses of a few training steps, and the
adapter they trained (saved as OUT_DIR/NAME-LOAD_MODE-adapter) with the logits it gives.

    torchrun --nproc-per-node 2 tests/integration/load_worker.py OUT_DIR CACHE_DIR NAME=MODEL_DIR:LOAD_MODE ...

Each rank writes OUT_DIR/rank<r>.pt. Every model is loaded in fp32 compute, so comparisons with the
reference are tight.
"""

from __future__ import annotations

import sys
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fsdpqlora.config import compose_config
from fsdpqlora.model import adapters
from fsdpqlora.model.build import build_model
from fsdpqlora.parallel.process_group import init_distributed
from fsdpqlora.train.optim import build_optimizer
from tests.helpers import PROBE, base_module_name

TRAIN_STEPS = 3


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


def load_and_probe(name: str, model_dir: Path, mode: str, cache_dir: str, out_dir: Path, d) -> dict:
    overrides = [
        f"model.name={name}", f"model.path={model_dir}", f"launch.cache_dir={cache_dir}", f"model.load_mode={mode}",
        "model.dtype=float32", "quant.compute_dtype=float32", "adapter.dropout=0", "train.lr=1e-2",
    ]  # fmt: skip
    cfg = compose_config(overrides)
    built = build_model(cfg, d, model_dir)
    model = built.model
    optimizer = build_optimizer(cfg, model)
    with torch.no_grad():
        logits = model(input_ids=PROBE.to(d.device), use_cache=False).logits.float().cpu()
    frozen_local = {base_module_name(n): _local(p) for n, p in model.named_parameters() if not p.requires_grad}
    packed, states = {}, {}
    for module_name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            full = weight.full_tensor() if isinstance(weight, DTensor) else weight  # a collective
            packed[base_module_name(module_name)] = full.detach().cpu().view(torch.uint8).flatten().clone()
            states[base_module_name(module_name)] = {
                k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in module.quant_state.as_dict(packed=True).items()
            }
    tied = model.base_model.model.lm_head.weight is model.base_model.model.get_input_embeddings().weight
    losses = []
    batch = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0)).to(d.device)
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        logits_after = model(input_ids=PROBE.to(d.device), use_cache=False).logits.float().cpu()
    state = adapters.gather_adapter_state(model)
    if d.is_main:
        adapters.save_adapter(model, state, out_dir / f"{name}-{mode}-adapter")
    return {
        "logits": logits,
        "logits_after": logits_after,
        "frozen_local": frozen_local,
        "packed": packed,
        "states": states,
        "tied_head": tied,
        "losses": losses,
        "bytes_read": built.load.bytes_read,
        "mode": built.load.mode,
    }


def main() -> None:
    out_dir, cache_dir, jobs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    d = init_distributed()
    results = {}
    for job in jobs:
        name, rest = job.split("=", 1)
        model_dir, mode = rest.rsplit(":", 1)
        results[f"{name}:{mode}"] = load_and_probe(name, Path(model_dir), mode, cache_dir, out_dir, d)
    torch.save(results, out_dir / f"rank{d.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
