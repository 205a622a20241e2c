"""Pictures of runs, drawn from their metrics.jsonl: the loss (train and evaluation), learning rate,
tokens/s and peak memory against the step. The trainer redraws <run>/plots/metrics.png at each
evaluation and at the end; `fsdpqlora plot RUN [RUN ...]` draws one or several runs over each other.

matplotlib through its object API (Figure, no pyplot): no GUI backend, no global state, PNG by Agg.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fsdpqlora.errors import ConfigError, exit_on_user_error

# (panel title, [(metrics.jsonl key, line label)]) in reading order: left to right, top to bottom.
PANELS = [
    ("loss (mean per target token)", [("loss", "train"), ("eval_loss", "eval")]),
    ("learning rate", [("lr", "")]),
    ("tokens/s (all workers, training time)", [("tokens_per_s", "")]),
    ("peak memory, GiB (max over ranks)", [("peak_mem_gib", "")]),
]


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl; a line being written (incomplete) is left out."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def draw(runs: dict[str, list[dict]], path: Path) -> Path:
    """One 2x2 figure of the PANELS, a colour per run, written to `path` whole (a reader never
    finds half a PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).flat
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        for (name, records), colour in zip(runs.items(), colours, strict=True):
            for key, label in keys:
                steps, values = series(records, key)
                if not steps:
                    continue
                evaluation = key.startswith("eval_")
                marker = "o" if evaluation or len(steps) == 1 else None
                legend = " ".join(part for part in (name if len(runs) > 1 else "", label) if part)
                ax.plot(steps, values, color=colour, linestyle="--" if evaluation else "-", marker=marker, markersize=4,
                        label=legend)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))
    # The colours of the runs are the same in every panel: one legend, on the loss.
    fig.axes[0].legend(fontsize=8)
    if len(runs) == 1:
        fig.suptitle(next(iter(runs)), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    os.replace(tmp, path)
    return path


def plot_run(run_dir: Path) -> Path:
    """<run_dir>/plots/metrics.png, redrawn from metrics.jsonl."""
    return draw({run_dir.name: read_metrics(run_dir)}, run_dir / "plots" / "metrics.png")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fsdpqlora plot",
        description="Draw the loss, learning rate, tokens/s and memory of runs (their metrics.jsonl) against the step; "
        "several runs are drawn over each other. Prints the PNG's path.",
    )
    parser.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default: <run>/plots/metrics.png for one run, "
                        "runs.png here for several)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        paths = [Path(run) for run in args.runs]
        for run in paths:
            if not (run / "metrics.jsonl").is_file():
                raise ConfigError(f"{run}: no metrics.jsonl; give run directories (outputs/<run>)")
        names = [run.name for run in paths]
        if len(set(names)) < len(names):  # runs of the same name in different places
            names = [f"{run.parent.name}/{run.name}" for run in paths]
        if len(set(names)) < len(names):
            names = [str(run) for run in paths]
        runs = {name: read_metrics(run) for name, run in zip(names, paths, strict=True)}
        if args.out:
            out = Path(args.out)
        else:
            out = Path(args.runs[0]) / "plots" / "metrics.png" if len(runs) == 1 else Path("runs.png")
        print(draw(runs, out).resolve())
    return 0
