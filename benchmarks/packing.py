"""Packing against padded batches: padding fraction and training tokens/s, as ratios from one run.

    .venv/bin/python benchmarks/packing.py                  # about 5 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/packing.py --steps 30 --repeats 3 --tag my-box

Two data sets: the bundled one (pydoc_qa, data.seq_len=256: instruction pairs of similar lengths)
and a synthetic one with a long-tailed length distribution (log-normal answers of real text from
Python's docs, data.seq_len=512), each trained with data.batching=padded (the baseline: random
batches padded to their longest example), length_grouped and packed.

- padding fraction: exact, from the batches of a whole epoch (computed, not timed);
- tokens/s: real (non-padding) tokens per second of training, from real 2-worker QLoRA + FSDP2 runs
  of the tiny model (`torchrun -m fsdpqlora.train`, as benchmarks/throughput.py runs them), the
  median of the steady-state steps, and its ratio to the padded baseline measured in the same
  invocation, rounds interleaved.

Results are printed and written to benchmarks/results/packing-<tag>-<date>.json with a description
of the machine.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import throughput  # the training runner of the throughput benchmark (benchmarks/ is on the path)
from report import describe_machine, save_report

BATCHINGS = ["padded", "length_grouped", "packed"]  # the first is the baseline


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows whose answers have log-normal lengths (median about 50 words, a few hundred at
    the tail), cut from the running text of Python's docs so the model sees real language."""
    from fsdpqlora.assets import _pydoc_sections

    words = " ".join(body for _, _, body in _pydoc_sections()).split()
    rng = random.Random(seed)
    rows, at = [], 0
    for i in range(n):
        count = min(380, max(3, int(rng.lognormvariate(np.log(50), 0.9))))
        if at + count > len(words):
            at = 0
        rows.append({"instruction": f"Continue passage {i} of the Python documentation.", "input": "", "output": " ".join(words[at : at + count])})
        at += count
    return rows


def data_sets(work_dir: Path) -> dict[str, list[str]]:
    path = work_dir / "long_tailed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(1500)))
    return {
        "pydoc_qa (bundled), seq_len 256": ["data=pydoc_qa", "data.seq_len=256", "data.eval_fraction=0"],
        "long-tailed (synthetic), seq_len 512": ["data=alpaca_json", f"data.path={throughput.hydra_path(path)}", "data.seq_len=512"],
    }


def padding_and_lengths(overrides: list[str], args) -> dict:
    """The exact padding fraction of an epoch for each batching, and the example lengths."""
    from transformers import AutoTokenizer

    from fsdpqlora.assets import tiny_model_path
    from fsdpqlora.config import compose_config
    from fsdpqlora.data import TokenizedSet, build_batches, pad_id_of, prepare

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path(args.cache_dir))
    result = {}
    for batching in BATCHINGS:
        cfg = compose_config([f"launch.cache_dir={throughput.hydra_path(args.cache_dir)}", f"data.batching={batching}", *overrides, *args.overrides])
        prepared = prepare(cfg, tokenizer, show_progress=False)
        train = build_batches(cfg, prepared, 0, args.nproc, pad_id_of(tokenizer)).train
        result[batching] = {"padding": train.epoch_padding(), "steps_per_epoch": train.steps_per_epoch}
    lengths = TokenizedSet.load(prepared.train_dir).lengths
    result["example_tokens"] = {
        "count": int(len(lengths)),
        **{f"p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90, 99)},
        "max": int(lengths.max()),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    args = throughput.parse_args(argv, __doc__, repeats=2)

    machine = describe_machine(workers=args.nproc, omp_num_threads=throughput.omp_threads(args.nproc))
    print(f"[benchmark] packing vs padded: {args.repeats} rounds x {args.steps} steps, {machine['cpu_cores']} cores ({machine['cpu_model']})", flush=True)
    with tempfile.TemporaryDirectory(prefix="fsdpqlora-packing-") as tmp:
        work_dir = Path(tmp)
        sets = data_sets(work_dir)
        padding = {name: padding_and_lengths(overrides, args) for name, overrides in sets.items()}
        groups = {
            name: [throughput.Measurement(f"{name}: {b}", [*overrides, f"data.batching={b}"]) for b in BATCHINGS]
            for name, overrides in sets.items()
        }
        everything = [m for group in groups.values() for m in group]
        for round_no in range(args.repeats):
            for m in everything if round_no % 2 == 0 else everything[::-1]:
                run = throughput.run_once(m, work_dir, args)
                m.runs.append(run)
                print(
                    f"[benchmark] round {round_no + 1}/{args.repeats}  {m.name:<55} "
                    f"{statistics.median(run.tokens_per_s[throughput.WARMUP_STEPS:]):7.0f} tokens/s  other load {run.other_cpu_cores:.2f} cores",
                    flush=True,
                )
    for group in groups.values():
        for m in group:
            throughput.summarise(m)
        throughput.add_ratios(group)

    print()
    for name, group in groups.items():
        print(f"{name}: example tokens {padding[name]['example_tokens']}")
        for batching, m in zip(BATCHINGS, group, strict=True):
            p = padding[name][batching]
            print(
                f"  {batching:<15} padding {p['padding']:6.1%}  {p['steps_per_epoch']:4d} steps/epoch  "
                f"{m.tokens_per_s:7.0f} tokens/s  x{m.ratio_vs_baseline:.2f} vs padded  (run spread {m.spread:.0%})"
            )
    if throughput.busiest_run(everything) > throughput.BUSY_MACHINE_CORES:
        print(
            f"\n[benchmark] warning: other processes used up to {throughput.busiest_run(everything):.2f} cores during a run; "
            "absolute numbers are skewed; the ratios come from interleaved runs of the same invocation"
        )
    if not args.no_save:
        report = {
            "settings": {"model": "tiny", "steps": args.steps, "repeats": args.repeats, "extra_overrides": args.overrides},
            "definitions": {
                "padding": "padding tokens / all token slots over every global batch of an epoch (exact)",
                "tokens_per_s": "real (non-padding) tokens per second of training: median of the per-step values, warm-up steps left out",
                "ratio_vs_baseline": "tokens_per_s / that of data.batching=padded on the same data set, same invocation",
                "other_cpu_cores": f"CPU time others took during a run, in cores; above {throughput.BUSY_MACHINE_CORES} the machine was shared",
            },
            "data_sets": {
                name: {"overrides": sets[name], **padding[name], "runs": [asdict(m) for m in groups[name]]} for name in sets
            },
        }
        print(f"\n[benchmark] results: {save_report('packing', report, machine, args.tag)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
