"""The plots of runs (fsdpqlora/train/plots.py): drawn from metrics.jsonl, a line being written is
left out, one run's figure in plots/metrics.png, several runs over each other by `fsdpqlora plot`."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from fsdpqlora.train.plots import plot_run, read_metrics
from tests.helpers import run_launcher

TRAIN_COLOUR, SECOND_RUN_COLOUR = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1


def write_run(run_dir, steps=30, scale=1.0, partial_line=False):
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": scale * (3 - math.log(step)), "lr": 2e-4 * min(1, step / 5), "tokens_per_s": 900 + step,
                      "peak_mem_gib": 1.5, "grad_norm": 1.0, "padding": 0.02, "epoch": step / 30})  # fmt: skip
        if step % 10 == 0:
            lines.append({"step": step, "eval_loss": scale * (3.1 - math.log(step)), "eval_tokens": 500})
    text = "".join(json.dumps(record) + "\n" for record in lines)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 31, "lo' if partial_line else ""))
    return run_dir


def pixels_of(path, colour) -> int:
    image = np.asarray(Image.open(path).convert("RGB"))
    return int((image == colour).all(axis=-1).sum())


def test_one_run_is_drawn_from_its_metrics_into_plots(tmp_path):
    run = write_run(tmp_path / "run", partial_line=True)
    records = read_metrics(run)
    assert len(records) == 33 and records[-1]["step"] == 30  # the half-written line is left out
    path = plot_run(run)
    assert path == run / "plots" / "metrics.png"
    assert Image.open(path).size == (990, 675)
    assert pixels_of(path, TRAIN_COLOUR) > 1000 and pixels_of(path, SECOND_RUN_COLOUR) == 0
    assert not list((run / "plots").glob(".*")), "written whole, no temporary left"


def test_fsdpqlora_plot_overlays_runs_and_prints_the_path(tmp_path):
    first, second = write_run(tmp_path / "a" / "run"), write_run(tmp_path / "b" / "run", steps=20, scale=0.8)
    result = run_launcher("plot", str(first), str(second), "--out", str(tmp_path / "both.png"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'both.png'}\n"
    assert pixels_of(tmp_path / "both.png", TRAIN_COLOUR) > 300 and pixels_of(tmp_path / "both.png", SECOND_RUN_COLOUR) > 300

    result = run_launcher("plot", str(first), str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"fsdpqlora: error: {tmp_path}: no metrics.jsonl; give run directories (outputs/<run>)\n"
