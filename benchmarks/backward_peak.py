"""How much memory backward adds on top of what forward kept, against the planner's per-layer model.

    .venv/bin/python benchmarks/backward_peak.py          # about 2 minutes on 2 CPU cores

The planner (fsdpqlora/plan/memory.py) models what one token keeps in one decoder layer for
backward, and adds one peak for backward itself: with checkpointing, a layer recomputed (its
activations again) and the gradients flowing through it; without, only those gradients. This
measures both on the real model build (4-bit base, LoRA through peft, the chunked loss, one process,
fp32 compute on the CPU): the bytes held by live allocations are read from glibc (`mallinfo2`, used
chunks plus mmapped blocks) before and after every operator torch dispatches, so the peak is exact
to the operator, not sampled, and does not depend on the allocator returning memory to the system.

For each shape: the bytes forward keeps per decoder layer without checkpointing, over the
planner's figure for that layer; and the backward peak beyond what forward kept, with and without
checkpointing, in units of the planner's one-layer activations once the largest 4-bit weight
(which bitsandbytes dequantizes whole for each product) is taken off: the shares the planner's
RECOMPUTE_PEAK and GRADIENTS_PEAK stand for; and that peak over the planner's whole term for it.
The vocabulary is small so that the loss does not set the peak. Results are printed and written to
benchmarks/results/backward_peak-<tag>-<date>.json with the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
from pathlib import Path

from report import describe_machine, save_report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MIB = 2**20
# (hidden, intermediate, layers, tokens): Llama's ratio of MLP to hidden width (3.5), two sizes.
SHAPES = [(1024, 3584, 4, 2048), (1024, 3584, 4, 4096), (2048, 7168, 2, 1024)]
DROPOUTS = (0.0, 0.05)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]  # fmt: skip


def allocated_bytes_reader():
    """A function returning the bytes in live heap and mmapped allocations (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        sys.exit("benchmarks/backward_peak.py: needs glibc >= 2.33 (mallinfo2) to read live allocations")

    def allocated() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return allocated


def measure(model_dir: Path, work: Path, tokens: int, dropout: float, checkpointing: bool) -> dict:
    """One forward and backward of a micro-batch of `tokens` tokens (after a warm-up one): the bytes
    forward kept and the peak during backward, both above what was allocated before forward."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from fsdpqlora.config import compose_config
    from fsdpqlora.model.build import build_model
    from fsdpqlora.parallel.process_group import init_distributed
    from fsdpqlora.train.step import summed_loss

    allocated = allocated_bytes_reader()

    class PeakAllocated(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.peak = max(self.peak, allocated())
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, allocated())
            return out

    cfg = compose_config(overrides(model_dir, work, tokens, dropout, checkpointing))
    d = init_distributed(cfg.launch)
    model = build_model(cfg, d, model_dir).model
    ids = torch.randint(3, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    summed_loss(model, batch, d.device).backward()  # first-use buffers, and the gradients' own storage
    gc.collect()
    before = allocated()
    with PeakAllocated() as mode:
        loss = summed_loss(model, batch, d.device)
        kept = allocated() - before
        mode.peak = 0
        loss.backward()
    return {"forward_kept": kept, "backward_peak_over_kept": mode.peak - before - kept}


def overrides(model_dir: Path, work: Path, tokens: int, dropout: float, checkpointing: bool) -> list[str]:
    every = ["shard.checkpoint_every=1"] if checkpointing else ["shard.activation_checkpointing=false"]
    return [f"model.path={model_dir}", "model.name=bench", f"launch.cache_dir={work / 'cache'}", "precision=fp32",
            f"data.seq_len={tokens}", "train.micro_batch_size=1", f"adapter.dropout={dropout}", *every]  # fmt: skip


def planner_figures(model_dir: Path, work: Path, tokens: int, dropout: float) -> dict[str, int]:
    """The planner's activations of one decoder layer for `tokens` tokens, its dequantized weight, and
    its backward peak term with and without checkpointing."""
    from fsdpqlora.config import compose_config
    from fsdpqlora.plan.arch import architecture, hf_config_of
    from fsdpqlora.plan.memory import activation_bytes_per_token, backward_peak_bytes

    cfg = compose_config(overrides(model_dir, work, tokens, dropout, False))
    arch = architecture(cfg, hf_config_of(cfg))
    layer = tokens * activation_bytes_per_token(arch, cfg)
    peaks = {checkpointed: backward_peak_bytes(arch, cfg, tokens, checkpointed) for checkpointed in (True, False)}
    weight = backward_peak_bytes(arch, cfg, 0, False)  # no tokens: the dequantized weight alone
    return {"layer": layer, "dequantized_weight": weight, "peak_checkpointed": peaks[True], "peak_not_checkpointed": peaks[False]}


def one_run(args: list[str]) -> None:
    """In a fresh process (one model build each, nothing left over from the previous one)."""
    import json

    model_dir, work, tokens, dropout, checkpointing = Path(args[0]), Path(args[1]), int(args[2]), float(args[3]), args[4] == "1"
    print(json.dumps(measure(model_dir, work, tokens, dropout, checkpointing)))


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        one_run(sys.argv[2:])
        return
    import json
    import os
    import subprocess

    from tests.helpers import write_test_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()
    rows = []
    print("per decoder layer: forward kept (measured / planner); backward's peak beyond what forward kept, less the "
          "dequantized weight, in the planner's layers (its shares: RECOMPUTE_PEAK / GRADIENTS_PEAK), and the whole "
          "peak measured / planned")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for hidden, intermediate, layers, tokens in SHAPES:
            model_dir = write_test_model(work / f"model-{hidden}-{layers}", hidden_size=hidden, intermediate_size=intermediate,
                                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=max(4096, tokens))  # fmt: skip
            for dropout in DROPOUTS:
                planned = planner_figures(model_dir, work, tokens, dropout)
                layer, weight = planned["layer"], planned["dequantized_weight"]
                runs = {}
                for checkpointing in (False, True):
                    command = [sys.executable, __file__, "--one", str(model_dir), str(work), str(tokens), str(dropout), str(int(checkpointing))]
                    result = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, check=True)
                    runs[checkpointing] = json.loads(result.stdout.strip().splitlines()[-1])
                row = {
                    "hidden": hidden, "intermediate": intermediate, "layers": layers, "tokens": tokens, "dropout": dropout,
                    "planner": planned,
                    "kept_per_layer_over_planner": runs[False]["forward_kept"] / layers / layer,
                    "share_checkpointed": (runs[True]["backward_peak_over_kept"] - weight) / layer,
                    "share_not_checkpointed": (runs[False]["backward_peak_over_kept"] - weight) / layer,
                    "peak_over_planner_checkpointed": runs[True]["backward_peak_over_kept"] / planned["peak_checkpointed"],
                    "peak_over_planner_not_checkpointed": runs[False]["backward_peak_over_kept"] / planned["peak_not_checkpointed"],
                    "runs": {"checkpointed": runs[True], "not_checkpointed": runs[False]},
                }  # fmt: skip
                rows.append(row)
                print(f"  H {hidden:>5} I {intermediate:>5} x{layers}, {tokens:>5} tokens, dropout {dropout:<4}: "
                      f"layer {layer / MIB:6.1f} MiB, weight {weight / MIB:5.1f} MiB planned; kept "
                      f"{row['kept_per_layer_over_planner']:.2f}x; shares {row['share_checkpointed']:.2f} checkpointed, "
                      f"{row['share_not_checkpointed']:.2f} not; peak / planned {row['peak_over_planner_checkpointed']:.2f}, "
                      f"{row['peak_over_planner_not_checkpointed']:.2f}", flush=True)  # fmt: skip
    path = save_report("backward_peak", {"shapes": SHAPES, "rows": rows}, describe_machine(), args.tag)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
