"""Training throughput of the real pipeline, one sharding configuration against another.

    .venv/bin/python benchmarks/throughput.py                  # about 3 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/throughput.py --steps 40 --repeats 3 --tag my-box
    .venv/bin/python benchmarks/throughput.py --first 1 --baseline-tree ../old   # this code against another checkout

Each configuration is a real QLoRA + FSDP2 training run: torchrun starts the workers
(`-m fsdpqlora.train`) on the built-in `tiny` model, and the numbers are read back from the run
directory's metrics.jsonl. Every configuration is measured in the same invocation, on the same
machine, and reported as a ratio against the baseline measured alongside it, because absolute
tokens/s on a shared box moves from one hour to the next while ratios hold far better.

With --baseline-tree, each configuration also runs on the code of another source tree (a git
worktree of an earlier commit, say), interleaved with this one's runs, so a change is measured
against the code before it on the same machine in the same minutes; ratios are then against the
first configuration on that tree.

Results are printed as a table and written to benchmarks/results/throughput-<tag>-<date>.json with
a description of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from report import children_cpu_seconds, describe_machine, machine_busy_seconds, save_report

# The first steps pay for one-off work (allocator growth, gloo connections, kernel selection for new
# shapes), so steady-state throughput starts after them.
WARMUP_STEPS = 3

# Above this many cores' worth of CPU time taken by other processes during a run, its numbers
# measure the neighbours as much as the configuration.
BUSY_MACHINE_CORES = 0.25

# (name, overrides). The first entry is the baseline: full_shard with every layer checkpointed (the
# defaults before checkpointing was chosen by need). Then what each lever buys: checkpointing fewer
# layers (the tiny model has 4: every 4th is one), none, and the replicated base of no_shard.
CONFIGS: list[tuple[str, list[str]]] = [
    ("full_shard, checkpoint every layer (baseline)", ["shard=full_shard", "shard.checkpoint_every=1"]),
    ("full_shard, every 2nd layer", ["shard=full_shard", "shard.checkpoint_every=2"]),
    ("full_shard, every 4th layer", ["shard=full_shard", "shard.checkpoint_every=4"]),
    ("full_shard, no checkpointing", ["shard=full_shard", "shard.activation_checkpointing=false"]),
    ("shard_grad_op, every layer", ["shard=shard_grad_op", "shard.checkpoint_every=1"]),
    ("no_shard (replicated), every layer", ["shard=no_shard", "shard.checkpoint_every=1"]),
    ("no_shard (replicated), no checkpointing", ["shard=no_shard", "shard.activation_checkpointing=false"]),
]


@dataclass
class Run:
    """One torchrun invocation of one configuration."""

    tokens_per_s: list[float]  # per step, as the worker logged it
    peak_mem_gib: float  # max over steps of peak_mem_gib (itself the max over ranks)
    wall_s: float  # the whole invocation: start-up, model load, training, adapter save
    other_cpu_cores: float  # CPU time others (processes, VM guests) took during the run, in cores
    exit_code: int  # torchrun's; nonzero only for a crash after training finished


@dataclass
class Measurement:
    name: str
    overrides: list[str]
    tree: str | None = None  # another source tree whose code runs this configuration (--baseline-tree)
    runs: list[Run] = field(default_factory=list)
    tokens_per_s: float = 0.0  # median of the steady-state steps of all runs
    spread: float = 0.0  # (max - min) of the per-run medians, relative to tokens_per_s
    peak_mem_gib: float = 0.0  # max over runs
    ratio_vs_baseline: float = 1.0
    mem_ratio_vs_baseline: float = 1.0


def parse_args(argv: list[str] | None, doc: str = __doc__, repeats: int = 3) -> argparse.Namespace:
    """The command line of this benchmark, and of the others that run training the same way."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"runs per configuration, interleaved (default {repeats})")
    add_common_arguments(parser, workers="torchrun workers")
    parser.add_argument("--first", type=int, default=0, help="measure only the first N configurations (default: all)")
    parser.add_argument("--baseline-tree", default=None,
                        help="also run each configuration on the code of this source tree (e.g. a worktree of an earlier commit)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides applied to every configuration")
    args = parser.parse_args(argv)
    check_steps(parser, args.steps)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def add_common_arguments(parser: argparse.ArgumentParser, workers: str) -> None:
    """The options every benchmark that trains the tiny model shares."""
    parser.add_argument("--nproc", type=int, default=2, help=f"{workers} (default 2)")
    parser.add_argument("--cache-dir", default="~/.cache/fsdpqlora", help="where the tiny model and data are cached")
    parser.add_argument("--tag", default=None, help="machine tag in the results file name (default: hostname + cores)")
    parser.add_argument("--no-save", action="store_true", help="print only; write no results file")


def check_steps(parser: argparse.ArgumentParser, steps: int) -> None:
    if steps <= WARMUP_STEPS:
        parser.error(f"--steps must be larger than the {WARMUP_STEPS} warm-up steps it leaves out")


def omp_threads(nproc: int) -> int:
    # The same share of the cores the `fsdpqlora` launcher gives each worker, so the benchmark
    # measures what a user's run gets (torchrun alone would pin every worker to one thread).
    return max(1, (os.cpu_count() or 1) // nproc)


def hydra_path(path: str | Path) -> str:
    """An absolute path, quoted for a Hydra override: Hydra's grammar refuses `~`, spaces and
    most punctuation in an unquoted value."""
    return "'" + str(Path(path).expanduser().resolve()).replace("'", "\\'") + "'"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if "loss" in r]  # training steps, not evaluation records


def worker_command(run_dir: Path, steps: int, args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """torchrun starting our workers as a user would, for `steps` steps logged one by one."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        "-m", "fsdpqlora.train",
        f"launch.run_dir={hydra_path(run_dir)}",
        f"launch.cache_dir={hydra_path(args.cache_dir)}",
        f"train.max_steps={steps}",
        "train.log_every=1",  # one metrics line per step, so the median is over steps
        "generate.max_new_tokens=0",  # the sample generation at the end is not training
        *overrides,
    ]  # fmt: skip


def run_training(overrides: list[str], run_dir: Path, args: argparse.Namespace, tree: str | None = None) -> Run:
    """One torchrun invocation of the worker (on the code of `tree` when given); exits with its log
    when training did not finish."""
    command = worker_command(run_dir, args.steps, args, [*overrides, *args.overrides])
    env = dict(os.environ, OMP_NUM_THREADS=str(omp_threads(args.nproc)))
    if tree is not None:  # `-m` imports from the working directory first
        env["PYTHONPATH"] = str(Path(tree).resolve())
    busy, ours, started = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - started
    other = (machine_busy_seconds() - busy) - (children_cpu_seconds() - ours)
    records = read_metrics(run_dir)
    # A worker that crashes while shutting down, after its last step and the adapter were written,
    # has still measured everything; only a run that did not finish training is lost.
    if len(records) != args.steps or "[fsdpqlora] done:" not in result.stdout:
        sys.exit(
            f"benchmark: training failed (exit code {result.returncode}): {' '.join(command)}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    run = Run(
        tokens_per_s=[r["tokens_per_s"] for r in records],
        peak_mem_gib=max(r["peak_mem_gib"] for r in records),
        wall_s=wall,
        other_cpu_cores=max(0.0, other) / wall,
        exit_code=result.returncode,
    )
    if result.returncode != 0:
        print(
            f"[benchmark] warning: a worker crashed on shutdown after training finished (torchrun exit code "
            f"{result.returncode}); its measurements are kept",
            flush=True,
        )
    return run


def run_once(m: Measurement, work_dir: Path, args: argparse.Namespace) -> Run:
    # A fresh run directory every time: the worker's logger appends to an existing metrics.jsonl.
    return run_training(m.overrides, Path(tempfile.mkdtemp(prefix="run-", dir=work_dir)), args, m.tree)


def summarise(m: Measurement) -> None:
    steady = [run.tokens_per_s[WARMUP_STEPS:] for run in m.runs]
    m.tokens_per_s = statistics.median([rate for run in steady for rate in run])
    per_run = [statistics.median(run) for run in steady]
    m.spread = (max(per_run) - min(per_run)) / m.tokens_per_s
    m.peak_mem_gib = max(run.peak_mem_gib for run in m.runs)


def add_ratios(measurements: list[Measurement]) -> None:
    baseline = measurements[0]
    for m in measurements:
        m.ratio_vs_baseline = m.tokens_per_s / baseline.tokens_per_s
        m.mem_ratio_vs_baseline = m.peak_mem_gib / baseline.peak_mem_gib


def planned(args: argparse.Namespace) -> list[Measurement]:
    """The configurations to measure; with --baseline-tree each runs on that tree's code first."""
    measurements = []
    for name, overrides in CONFIGS[: args.first] if args.first else CONFIGS:
        if args.baseline_tree:
            measurements.append(Measurement(f"{name} @ {args.baseline_tree}", overrides, args.baseline_tree))
        measurements.append(Measurement(name, overrides))
    return measurements


def measure_all(measurements: list[Measurement], args: argparse.Namespace) -> list[Measurement]:
    with tempfile.TemporaryDirectory(prefix="fsdpqlora-bench-") as work_dir:
        for round_no in range(args.repeats):
            # Every other round runs in reverse order, so a slow drift in the machine's speed
            # (thermal, neighbours) does not favour the configurations that happen to run first.
            order = measurements if round_no % 2 == 0 else measurements[::-1]
            for m in order:
                run = run_once(m, Path(work_dir), args)
                m.runs.append(run)
                steady = statistics.median(run.tokens_per_s[WARMUP_STEPS:])
                print(
                    f"[benchmark] round {round_no + 1}/{args.repeats}  {m.name:<26} {steady:7.0f} tokens/s  "
                    f"peak {run.peak_mem_gib:.2f} GiB  {run.wall_s:4.0f}s  other load {run.other_cpu_cores:.2f} cores",
                    flush=True,
                )
    for m in measurements:
        summarise(m)
    add_ratios(measurements)
    return measurements


def format_table(measurements: list[Measurement], memory_kind: str) -> str:
    header = ("config", "tokens/s", "run spread", "vs baseline", f"peak {memory_kind} GiB")
    rows = [
        (
            m.name,
            f"{m.tokens_per_s:.0f}",
            f"{m.spread:.0%}",
            f"{m.ratio_vs_baseline:.2f}x",
            f"{m.peak_mem_gib:.2f}",
        )
        for m in measurements
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        # The name column reads best left-aligned, the numbers right-aligned.
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def tree_commit(tree: str) -> str | None:
    """The git commit a source tree is at (and "+changes" when it has uncommitted ones), for the record."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", tree, *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    return (commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")) or None


def busiest_run(measurements: list[Measurement]) -> float:
    return max(run.other_cpu_cores for m in measurements for run in m.runs)


def save_results(measurements: list[Measurement], machine: dict, args: argparse.Namespace) -> Path:
    report = {
        "settings": {
            "model": "tiny",
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup_steps_excluded": WARMUP_STEPS,
            "extra_overrides": args.overrides,
            "baseline_tree": args.baseline_tree,
            "baseline_commit": tree_commit(args.baseline_tree) if args.baseline_tree else None,
        },
        "definitions": {
            "tokens_per_s": "median of the per-step tokens_per_s of every run, first warm-up steps of each left out",
            "spread": "(max - min) of the per-run medians, relative to tokens_per_s",
            "peak_mem_gib": "max of peak_mem_gib, the max over ranks (host RSS on CPU, CUDA memory allocated on GPU)",
            "other_cpu_cores": "CPU time other processes (and, on a VM, other guests) took during a run, in cores; above "
            f"{BUSY_MACHINE_CORES} the machine was shared",
        },
        "baseline": measurements[0].name,
        "results": [asdict(m) for m in measurements],
    }
    return save_report("throughput", report, machine, args.tag)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = describe_machine(workers=args.nproc, omp_num_threads=omp_threads(args.nproc))
    measurements = planned(args)
    print(
        f"[benchmark] {len(measurements)} configurations x {args.repeats} runs x {args.steps} steps, {args.nproc} workers, "
        f"{machine['cpu_cores']} cores ({machine['cpu_model']}), torch {machine['torch']}",
        flush=True,
    )
    measure_all(measurements, args)
    print("\n" + format_table(measurements, "CUDA" if machine["cuda_used"] else "host RSS"))
    if busiest_run(measurements) > BUSY_MACHINE_CORES:
        print(
            f"\n[benchmark] warning: other processes used up to {busiest_run(measurements):.2f} cores during a run; "
            "the numbers are skewed, run again on an idle machine"
        )
    if not args.no_save:
        print(f"\n[benchmark] results: {save_results(measurements, machine, args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
