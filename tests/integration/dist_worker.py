"""Runs under torchrun (or plain python for the single-process reference) and records what the
distributed tests compare: logits before training, losses of the first steps (on the default
batching: packed rows), evaluation losses before and after, which adapter parameters got
gradients, per-rank packed bytes, and the saved adapter beside the live one.

    python tests/integration/dist_worker.py OUT_FILE [--no-shard] OVERRIDE ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fsdpqlora.config import compose_config
from fsdpqlora.data import load_data
from fsdpqlora.model import adapters
from fsdpqlora.model.build import build_model
from fsdpqlora.model.skeleton import count_quantized_bytes
from fsdpqlora.parallel.process_group import init_distributed
from fsdpqlora.train.evaluate import evaluation_loss
from fsdpqlora.train.step import summed_loss, train_step
from tests.helpers import PROBE

STEPS = 3


def main() -> None:
    out_file = Path(sys.argv[1])
    shard = False if "--no-shard" in sys.argv else None  # None: as training builds it
    cfg = compose_config([a for a in sys.argv[2:] if a != "--no-shard"])
    d = init_distributed()
    model_dir = Path(cfg.model.path)

    from transformers import AutoTokenizer

    data = load_data(cfg, d, AutoTokenizer.from_pretrained(model_dir))

    model = build_model(cfg, d, model_dir, shard=shard).model
    optimizer = torch.optim.AdamW([p for _, p in adapters.lora_parameters(model)], lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    local_bytes, total_bytes = count_quantized_bytes(model)

    probe = PROBE
    with torch.no_grad():
        logits_before = model(input_ids=probe.to(d.device), use_cache=False).logits.float().cpu()

    eval_losses = [evaluation_loss(model, data.eval, d)["eval_loss"]]
    losses, grads_after_first_step = [], {}
    for step in range(STEPS):
        micro_batches = data.train.next_step()
        if step == 1:
            # Backward only, to look at the gradients the second step will use.
            for batch in micro_batches:
                loss = summed_loss(model, batch, d.device)
                loss.backward()
            for name, p in adapters.lora_parameters(model):
                grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                grads_after_first_step[name] = None if grad is None else float(grad.abs().sum())
            optimizer.zero_grad(set_to_none=True)
        losses.append(train_step(model, optimizer, scheduler, micro_batches, data.train.last_step.targets, cfg, d).loss)

    eval_losses.append(evaluation_loss(model, data.eval, d)["eval_loss"])
    with torch.no_grad():
        logits_after = model(input_ids=probe.to(d.device), use_cache=False).logits.float().cpu()
    live = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            live[name] = (p.full_tensor() if isinstance(p, DTensor) else p.detach()).cpu().clone()
    saved = adapters.gather_adapter_state(model)
    per_rank_bytes = [None] * d.world_size
    dist.all_gather_object(per_rank_bytes, local_bytes)
    if d.is_main:
        adapters.save_adapter(model, saved, out_file.parent / f"{out_file.stem}-adapter")
        torch.save(
            {
                "world_size": d.world_size,
                "logits_before": logits_before,
                "logits_after": logits_after,
                "probe": probe,
                "losses": losses,
                "eval_losses": eval_losses,
                "packed": "position_ids" in micro_batches[0],
                "grads_after_first_step": grads_after_first_step,
                "per_rank_bytes": per_rank_bytes,
                "total_bytes": total_bytes,
                "live_adapter": live,
                "saved_adapter": saved,
            },
            out_file,
        )
    # Every rank waits for rank 0's writes before the group goes: a rank that tears the gloo group
    # down while a peer still uses it can abort the peer.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
