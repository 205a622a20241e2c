"""The planner's estimates against measurement on this machine.

    .venv/bin/python benchmarks/planner.py                 # CPU: 2 gloo workers
    .venv/bin/python benchmarks/planner.py --cuda          # one GPU: peak CUDA memory of real steps

A synthetic checkpoint of the Llama architecture (the `tiny` preset's shapes, random bf16
weights) is written once; then tests/integration/plan_worker.py builds the model as training does (meta
skeleton, 4-bit, LoRA, FSDP2, weights streamed in), takes real optimizer steps on random token
batches, and reports each rank's bytes from the live tensors and its peak memory:

- sharded state per rank (packed 4-bit weights, quantization state, other frozen weights, adapter
  weights, optimizer state after a step) under full_shard r=8 and no_shard r=16, against the
  planner's per-rank figures: these must be equal;
- CPU: peak host RSS per worker after 3 steps at two sequence lengths, against the planner's host
  RAM per worker (its per-node total / workers), as a ratio;
- --cuda (one GPU, one worker): peak CUDA memory allocated (torch.cuda.max_memory_allocated) at
  the same settings against the planner's per-GPU total without its CUDA-context and
  fragmentation allowance, which max_memory_allocated does not see.

Results are printed and written to benchmarks/results/planner-<tag>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from report import describe_machine, save_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2**30
SEQ_LENS = (256, 1024)
BYTES_VARIANTS = {
    "full_shard r=8": ["shard=full_shard", "adapter.r=8"],
    "no_shard r=16": ["shard=no_shard", "adapter.r=16"],
}
KINDS = ("packed", "quant_state", "frozen", "adapter", "optimizer")


def run_worker(workers: int, model_dir: Path, work: Path, args: list[str]) -> list[dict]:
    out = work / "out.json"
    base = [
        "model.name=bench",
        f"model.path={model_dir}",
        f"launch.cache_dir={work / 'cache'}",
        "train.micro_batch_size=4",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // workers)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               str(REPO / "tests/integration/plan_worker.py"), str(out), *args[:1], *base, *args[1:]]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def planner_breakdown(overrides: list[str], workers: int, cuda: bool):
    from fsdpqlora.config import compose_config
    from fsdpqlora.plan.arch import architecture, hf_config_of
    from fsdpqlora.plan.memory import Levers, estimate
    from fsdpqlora.plan.rig import rig_of

    rig = [
        f"rig.name={'one-gpu' if cuda else 'cpu-workers'}",
        f"launch.cpu_workers={workers}",
        "rig.host_memory_gib=1024",
    ]
    if cuda:
        rig += ["rig.gpus_per_node=1", "rig.gpu_memory_gib=1024", "rig.tflops=100"]
    cfg = compose_config([*overrides, *rig])
    return estimate(architecture(cfg, hf_config_of(cfg)), cfg, Levers.of(cfg), rig_of(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cuda", action="store_true", help="one GPU worker: peak CUDA memory against the per-GPU estimate"
    )
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    from fsdpqlora.assets import TINY_LLAMA
    from tests.helpers import write_test_model

    workers = 1 if args.cuda else 2
    report: dict = {"workers": workers, "model": dict(TINY_LLAMA, vocab_size=512)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = write_test_model(work / "model", **TINY_LLAMA)
        base = ["model.name=bench", f"model.path={model_dir}", "train.micro_batch_size=4"]

        print(f"sharded state per rank, bytes ({workers} workers, data.seq_len=128): estimate = measured?")
        rows = []
        for name, variant in BYTES_VARIANTS.items():
            measured = run_worker(workers, model_dir, work, ["--steps=1", "data.seq_len=128", *variant])[0]["per_rank"]
            per_rank = planner_breakdown([*base, "data.seq_len=128", *variant], workers, args.cuda).per_rank
            for rank, live in enumerate(measured):
                for kind in KINDS:
                    estimated = per_rank[kind][rank % len(per_rank[kind])]
                    rows.append(
                        {"config": name, "rank": rank, "kind": kind, "estimate": estimated, "measured": live[kind]}
                    )
                    print(
                        f"  {name:<16} rank {rank}  {kind:<12} {estimated:>12,} {live[kind]:>12,}  {'equal' if estimated == live[kind] else 'DIFFERENT'}"
                    )
        report["sharded_bytes"] = rows

        peak_kind = "peak_cuda" if args.cuda else "peak_rss"
        print(
            f"\npeak memory per worker after 3 steps ({'CUDA allocated' if args.cuda else 'host RSS'}), GiB: estimate, measured, measured/estimate"
        )
        peaks = []
        for seq_len in SEQ_LENS:
            overrides = [f"data.seq_len={seq_len}", "shard=full_shard"]
            measured = max(
                r[peak_kind] for r in run_worker(workers, model_dir, work, ["--steps=3", *overrides])[0]["per_rank"]
            )
            breakdown = planner_breakdown([*base, *overrides], workers, args.cuda)
            if args.cuda:
                estimated = breakdown.gpu_allocated
            else:
                estimated = breakdown.host_total / workers
            peaks.append({"seq_len": seq_len, "micro_batch_size": 4, "estimate_bytes": int(estimated), "measured_bytes": measured,
                          "ratio": measured / estimated, "breakdown": breakdown.gpu if args.cuda else breakdown.host})  # fmt: skip
            print(
                f"  data.seq_len={seq_len:<6} {estimated / GIB:8.3f} {measured / GIB:8.3f} {measured / estimated:8.2f}"
            )
        report[f"{peak_kind}"] = peaks

    machine = describe_machine()
    if not machine["cuda_used"]:
        report["note"] = (
            "CPU only: no GPU was lent to this session. Peak CUDA memory of real steps and the 70B one-rank "
            "emulation of a 2 x 24 GB rig are not measured yet (run with --cuda on a GPU machine)."
        )
    path = save_report("planner", report, machine, args.tag)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
