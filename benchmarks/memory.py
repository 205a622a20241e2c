"""What the chunked loss, the embedding's and head's own FSDP units and one rank without FSDP save,
measured on this machine beside the planner's figure for the same run.

    .venv/bin/python benchmarks/memory.py            # CPU: 2 gloo workers (and 1 for the one-rank rows)

A synthetic Llama checkpoint with Llama 3's vocabulary (128,256 entries) and a few small layers is
written once; for each variant, one torchrun launch builds the model as training does (meta
skeleton, 4-bit, LoRA, FSDP2, weights streamed in; fp32 compute, as CPU workers run), takes a few
real optimizer steps on random token batches, and reports each worker's peak host RSS. Variants:

- the loss in chunks (train.loss_chunk_tokens, the default) or from the whole logits (=0);
- the FSDP units of today (each decoder layer, the embedding, the head, the root with the final
  norm, not resharded after forward) or the old ones (embedding, final norm and head in the root,
  resharded after forward: reproduced here by `old_shard_model`, the code this change replaced);
- one rank: the plain module (the default) or wrapped in FSDP2 as before (build_model(shard=True));
- the input embedding whole in each worker's host memory (shard.embedding_on_host=true): on a GPU it
  leaves the GPU; on CPU workers, whose device is host memory, each worker holds the whole table
  instead of its half, which the planner counts as the table in host RAM.

The planner models today's units and one rank without FSDP only: rows with the old units or with
FSDP on one rank have no planner figure. Results are printed, with the ratio measured / planner,
and written to benchmarks/results/memory-<tag>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from report import describe_machine, save_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2**30
SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
VOCAB = 128_256
STEPS = 3
COMMON = ["precision=fp32", "adapter.dropout=0", "data.seq_len=512", "train.micro_batch_size=2", "adapter.r=8"]
# name: (workers, overrides, worker flags)
VARIANTS = {
    "2 ranks, chunked loss, new units": (2, [], []),
    "2 ranks, whole logits, new units": (2, ["train.loss_chunk_tokens=0"], []),
    "2 ranks, chunked loss, old units": (2, [], ["--old-units"]),
    "2 ranks, whole logits, old units (before)": (2, ["train.loss_chunk_tokens=0"], ["--old-units"]),
    "2 ranks, chunked loss, embedding on host": (2, ["shard.embedding_on_host=true"], []),
    "1 rank, chunked loss, no FSDP": (1, [], []),
    "1 rank, chunked loss, FSDP": (1, [], ["--fsdp"]),
    "1 rank, whole logits, FSDP, old units (before)": (1, ["train.loss_chunk_tokens=0"], ["--fsdp", "--old-units"]),
}


def old_shard_model(model, layers, mesh, cfg) -> None:
    """The units before this change: every decoder layer, then the root with the embedding, the
    final norm and the head, all resharded after forward (but under shard_grad_op)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from fsdpqlora.model.quant import to_dtype

    mp_policy = MixedPrecisionPolicy(param_dtype=to_dtype(cfg.quant.compute_dtype), reduce_dtype=torch.float32)
    reshard = cfg.shard.strategy != "shard_grad_op"
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=OffloadPolicy(), reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=OffloadPolicy(), reshard_after_forward=reshard)


def worker(out_file: Path, flags: list[str], overrides: list[str]) -> None:
    """Under torchrun: build, take STEPS steps, report each rank's peak RSS."""
    import torch
    import torch.distributed as dist

    from fsdpqlora.config import compose_config
    from fsdpqlora.model import build
    from fsdpqlora.parallel.process_group import init_distributed
    from fsdpqlora.train.optim import build_optimizer, build_scheduler
    from fsdpqlora.train.step import target_tokens, train_step

    if "--old-units" in flags:
        build.shard_model = old_shard_model
    d = init_distributed()
    cfg = compose_config(overrides)
    model = build.build_model(cfg, d, Path(cfg.model.path), shard=True if "--fsdp" in flags else None).model
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    generator = torch.Generator().manual_seed(d.rank)
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=generator)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        train_step(model, optimizer, scheduler, [batch], target_tokens(batch["labels"]) * d.world_size, cfg, d)
    peaks = [None] * d.world_size
    dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if d.is_main:
        out_file.write_text(json.dumps(peaks))
    dist.barrier()
    dist.destroy_process_group()


def write_model(out: Path) -> Path:
    """A random Llama with Llama 3's vocabulary, saved as the hub ships it (bf16 safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fsdpqlora.assets import train_tokenizer

    tokenizer = train_tokenizer(out, vocab_size=512)  # not measured; any will do
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPE)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def planner_per_worker(overrides: list[str], workers: int) -> int:
    """The planner's host RAM per worker for this run on CPU workers of this machine."""
    from fsdpqlora.config import compose_config
    from fsdpqlora.plan.arch import architecture, hf_config_of
    from fsdpqlora.plan.memory import Levers, estimate
    from fsdpqlora.plan.rig import rig_of

    cfg = compose_config([*overrides, "rig.name=cpu-workers", f"launch.cpu_workers={workers}", "rig.host_memory_gib=1024"])
    return estimate(architecture(cfg, hf_config_of(cfg)), cfg, Levers.of(cfg), rig_of(cfg)).host_total // workers


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        flags = [a for a in sys.argv[3:] if a in ("--old-units", "--fsdp")]
        worker(Path(sys.argv[2]), flags, [a for a in sys.argv[3:] if a not in flags])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run only the variants whose name contains one of these")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = write_model(work / "model")
        base = ["model.name=bench", f"model.path={model_dir}", f"launch.cache_dir={work / 'cache'}", *COMMON]
        print(f"peak host RSS per worker after {STEPS} steps, GiB: measured, planner, measured/planner")
        for name, (workers, overrides, flags) in VARIANTS.items():
            if args.only and not any(part in name for part in args.only):
                continue
            out = work / "out.json"
            env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // workers)))
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
                       str(Path(__file__).resolve()), "--worker", str(out), *flags, *base, *overrides]  # fmt: skip
            subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            measured = max(json.loads(out.read_text()))
            planned = None if flags else planner_per_worker([*base, *overrides], workers)
            rows.append({"variant": name, "workers": workers, "overrides": overrides, "flags": flags,
                         "measured_bytes": measured, "planner_bytes": planned,
                         "ratio": None if planned is None else measured / planned})  # fmt: skip
            figure = "       -        -" if planned is None else f"{planned / GIB:8.3f} {measured / planned:8.2f}"
            print(f"  {name:<48} {measured / GIB:8.3f} {figure}", flush=True)
    report = {"model": dict(SHAPE, vocab_size=VOCAB), "common": COMMON, "steps": STEPS, "rows": rows}
    path = save_report("memory", report, describe_machine(), args.tag)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
