"""Trains several configurations in one process group (one torchrun launch for a whole matrix of
memory levers) and records, per configuration, what tests/integration/test_levers.py compares: logits before
training and after its steps, the losses of those steps, which adapter parameters got a gradient,
per-rank packed bytes, the embedding's layout, how many bytes activation offloading moved, and whether the model is FSDP's.

    python tests/integration/lever_worker.py OUT_FILE RUNS_JSON [--no-shard] [--save-adapter=NAME ...]

RUNS_JSON maps a run name to its overrides (each run: a fresh model, optimizer and data); the
adapter of each run NAME is saved in PEFT format beside OUT_FILE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fsdpqlora.config import compose_config
from fsdpqlora.data import load_data
from fsdpqlora.model import adapters
from fsdpqlora.model.build import build_model
from fsdpqlora.model.skeleton import count_quantized_bytes
from fsdpqlora.parallel.fsdp import local_tensor
from fsdpqlora.parallel.process_group import init_distributed
from fsdpqlora.train.optim import build_optimizer
from fsdpqlora.train.step import build_grad_scaler, summed_loss, train_step
from tests.helpers import PROBE

STEPS = 2


def run_one(overrides: list[str], d, shard: bool | None, tokenizer, adapter_dir: Path | None) -> dict:
    cfg = compose_config(overrides)
    torch.manual_seed(cfg.train.seed)  # as the Trainer does: each run's dropout masks from its seed
    data = load_data(cfg, d, tokenizer)
    built = build_model(cfg, d, Path(cfg.model.path), shard=shard)
    model = built.model
    optimizer = build_optimizer(cfg, model)  # right after sharding (trap B)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = build_grad_scaler(cfg, d)
    local_bytes, total_bytes = count_quantized_bytes(model)
    with torch.no_grad():
        logits = model(input_ids=PROBE.to(d.device), use_cache=False).logits.float().cpu()

    losses, grads = [], {}
    for step in range(STEPS):
        micro_batches = data.train.next_step()
        if step == 1:  # backward only: the gradients the second step uses (B is non-zero by then)
            for batch in micro_batches:
                summed_loss(model, batch, d.device).backward()
            for name, p in adapters.lora_parameters(model):
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads[name] = None if grad is None else float(grad.abs().sum())
            optimizer.zero_grad(set_to_none=True)
        result = train_step(model, optimizer, scheduler, micro_batches, data.train.last_step.targets, cfg, d, scaler)
        losses.append(result.loss)
    with torch.no_grad():
        logits_after = model(input_ids=PROBE.to(d.device), use_cache=False).logits.float().cpu()
    if adapter_dir is not None:
        saved = adapters.gather_adapter_state(model)
        if d.is_main:
            adapters.save_adapter(model, saved, adapter_dir)
    per_rank_bytes = [None] * d.world_size
    dist.all_gather_object(per_rank_bytes, local_bytes)
    offload = built.activation_offload
    embedding = model.get_input_embeddings().weight
    return {
        "fsdp": isinstance(model, FSDPModule),
        # sharded (a DTensor), where it lives, and this rank's shape of it
        "embedding": (isinstance(embedding, DTensor), embedding.device.type, tuple(local_tensor(embedding).shape)),
        "logits_before": logits,
        "losses": losses,
        "grads": grads,
        "per_rank_bytes": per_rank_bytes,
        "total_bytes": total_bytes,
        "offloaded_bytes": None if offload is None else offload.packed_bytes,
        "logits_after": logits_after,
    }


def main() -> None:
    out_file, runs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    shard = False if "--no-shard" in sys.argv else None  # None: as training builds it
    save = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--save-adapter=")]
    d = init_distributed()
    from transformers import AutoTokenizer

    tokenizer = None
    results = {}
    for name, overrides in runs.items():
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(compose_config(overrides).model.path)
        adapter_dir = out_file.parent / f"{out_file.stem}-{name}-adapter" if name in save else None
        results[name] = run_one(overrides, d, shard, tokenizer, adapter_dir)
    if d.is_main:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
