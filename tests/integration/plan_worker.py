"""Runs under torchrun: builds the model as training does for each configuration given, takes one
optimizer step, and records each rank's bytes of sharded state from the live tensors (local shards
of DTensors), for tests/integration/test_planner.py and benchmarks/planner.py to hold against the planner.

    torchrun --nproc-per-node 2 tests/integration/plan_worker.py OUT_FILE [--steps=N] OVERRIDE ... [-- OVERRIDE ...]...

Each `--`-separated group is added to the first group's overrides for one configuration. It also
records each rank's peak host RSS (and peak CUDA memory on a GPU) after N steps (1 by default): with
one configuration per run, what benchmarks/planner.py holds against the planner's host estimate.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fsdpqlora.config import compose_config
from fsdpqlora.model.build import build_model
from fsdpqlora.parallel.process_group import init_distributed
from fsdpqlora.train.optim import build_optimizer, build_scheduler
from fsdpqlora.train.step import target_tokens, train_step


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def quant_state_bytes(layer: bnb.nn.Linear4bit) -> int:
    state = layer.quant_state
    tensors = [state.absmax, state.code, state.offset]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(local_bytes(t) for t in tensors if t is not None)


def measure(model, optimizer) -> dict[str, int]:
    """This rank's bytes of each kind of sharded state, as the planner names them."""
    packed = {id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    counts = {"packed": 0, "frozen": 0, "adapter": 0, "optimizer": 0, "quant_state": 0}
    for param in model.parameters():
        kind = "adapter" if param.requires_grad else "packed" if id(param) in packed else "frozen"
        counts[kind] += local_bytes(param)
    counts["quant_state"] = sum(quant_state_bytes(m) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    for state in optimizer.state.values():
        counts["optimizer"] += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return counts


def main() -> None:
    out_file = Path(sys.argv[1])
    args = sys.argv[2:]
    steps = 1
    if args and args[0].startswith("--steps="):
        steps = int(args.pop(0).split("=", 1)[1])
    groups, group = [], []
    for arg in args:
        if arg == "--":
            groups.append(group)
            group = []
        else:
            group.append(arg)
    groups.append(group)
    base, variants = groups[0], groups[1:] or [[]]
    d = init_distributed()
    results = []
    for variant in variants:
        cfg = compose_config([*base, *variant])
        model = build_model(cfg, d, Path(cfg.model.path)).model
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer)
        torch.manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len))
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        for _ in range(steps):
            # every rank draws the same batch (the same seed)
            train_step(model, optimizer, scheduler, [batch], target_tokens(batch["labels"]) * d.world_size, cfg, d)
        counts = measure(model, optimizer)
        counts["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if d.device.type == "cuda":
            counts["peak_cuda"] = torch.cuda.max_memory_allocated(d.device)
        per_rank = [None] * d.world_size
        dist.all_gather_object(per_rank, counts)
        results.append({"overrides": [*base, *variant], "per_rank": per_rank})
        del model, optimizer, scheduler
    if d.is_main:
        out_file.write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
