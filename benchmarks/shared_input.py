"""One decoder layer's forward + backward with the shared-input LoRA products (adapter.fused_shared_inputs,
fsdpqlora/model/shared_input.py) against peft's per-module path, at LoRA dropout 0.05 and 0.

    .venv/bin/python benchmarks/shared_input.py                     # about 2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/shared_input.py --hidden 2048 --tokens 2048 --rounds 5

A synthetic one-layer Llama checkpoint (random bf16 weights) is written to a temporary directory and
built as training builds it (4-bit base, LoRA r 16 on every linear, no activation checkpointing, fp32
compute as CPU workers run, or the model's bf16 with --bf16). The timed call is the decoder layer
alone: forward on random hidden states, backward from their sum. Configurations alternate within
each round, so a drift in machine speed favours none; the table gives each one's median over all
rounds, in wall-clock time and in this process's CPU time (steadier on a shared machine, with
OMP_NUM_THREADS=1), and the ratio of each to peft's path at the same dropout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fsdpqlora.config import compose_config  # noqa: E402
from fsdpqlora.model.build import build_model  # noqa: E402
from fsdpqlora.parallel.process_group import Dist  # noqa: E402

CONFIGS = [(fused, dropout) for dropout in (0.05, 0.0) for fused in (False, True)]


def write_checkpoint(out_dir: Path, hidden: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64, num_hidden_layers=1,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out_dir)
    return out_dir


def layer_step(model_dir: Path, fused: bool, dropout: float, args: argparse.Namespace):
    """A function that runs the decoder layer's forward and backward once."""
    precision = [] if args.bf16 else ["model.dtype=float32", "quant.compute_dtype=float32"]
    cfg = compose_config([
        "model.name=bench", f"model.path={model_dir}", "shard.activation_checkpointing=false", *precision,
        f"adapter.dropout={dropout}", f"adapter.fused_shared_inputs={fused}",
    ])  # fmt: skip
    model = build_model(cfg, Dist(0, 0, 1, torch.device("cpu")), model_dir, shard=False).model
    decoder = model.base_model.model.model
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    hidden = torch.randn(1, args.tokens, args.hidden, dtype=dtype, generator=torch.Generator().manual_seed(1))
    hidden.requires_grad_(True)
    position_embeddings = decoder.rotary_emb(hidden, torch.arange(args.tokens)[None])

    def step():
        decoder.layers[0](hidden, position_embeddings=position_embeddings).sum().backward()
        model.zero_grad(set_to_none=True)
        hidden.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024; a multiple of 256)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per forward (default 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the configurations (default 5)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps per configuration and round (default 5)")
    parser.add_argument("--bf16", action="store_true", help="bf16 compute (default fp32, as CPU workers run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(Path(tmp), args.hidden)
        steps = {config: layer_step(model_dir, *config, args) for config in CONFIGS}
    wall: dict[tuple[bool, float], list[float]] = {config: [] for config in CONFIGS}
    cpu: dict[tuple[bool, float], list[float]] = {config: [] for config in CONFIGS}
    for step in steps.values():
        step()  # warm-up: first-use allocations and kernel choices
    for round_index in range(args.rounds):
        for config in CONFIGS if round_index % 2 == 0 else CONFIGS[::-1]:
            for _ in range(args.iters):
                start, start_cpu = time.perf_counter(), time.process_time()
                steps[config]()
                wall[config].append(time.perf_counter() - start)
                cpu[config].append(time.process_time() - start_cpu)
    print(f"one decoder layer, hidden {args.hidden}, {args.tokens} tokens, LoRA r 16, {'bf16' if args.bf16 else 'fp32'}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds * args.iters} forward+backward")  # fmt: skip
    print(f"{'LoRA path':<26}{'dropout':>8}{'wall ms':>10}{'vs peft':>10}{'CPU ms':>10}{'vs peft':>10}")
    for fused, dropout in CONFIGS:
        path = "shared-input (default)" if fused else "peft per module"
        row = f"{path:<26}{dropout:>8}"
        for times in (wall, cpu):
            median, peft = statistics.median(times[(fused, dropout)]), statistics.median(times[(False, dropout)])
            row += f"{median * 1e3:>10.1f}{median / peft:>9.2f}x"
        print(row)


if __name__ == "__main__":
    main()
