"""The whole path as a user runs it: launcher -> torchrun workers -> training -> PEFT adapter."""

from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
import sys

import pytest
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fsdpqlora.config import load_config_file
from tests.helpers import REPO, base_overrides, run_torchrun

pytestmark = pytest.mark.distributed


def _metrics(run_dir, kind="loss"):
    """The training records (kind "loss") or the evaluation ones ("eval_loss") of metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind in r]


def test_launcher_trains_and_writes_a_peft_adapter(model_dir, cache_dir, tmp_path):
    overrides = [
        *base_overrides(model_dir, cache_dir),
        f"launch.output_root={tmp_path}/out",
        "train.max_steps=12",
        "train.lr=5e-3",
        "adapter.r=8",
        "generate.max_new_tokens=8",
        "data.eval_fraction=0.1",
        "train.eval_every=6",
        "generate.eval_samples=1",
        "logger=tensorboard",
        "logger.plots=true",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "fsdpqlora.launcher.cli", *overrides], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (run_dir,) = (tmp_path / "out").iterdir()
    assert f"run directory: {run_dir}" in result.stdout
    assert "starting 2 workers" in result.stdout
    assert "[fsdpqlora] run length: 12 steps (train.max_steps=12: " in result.stdout and "data.seq_len=128, about " in result.stdout
    assert "peak memory per rank (host RSS): rank 0:" in result.stdout
    assert f"[fsdpqlora] loaded {model_dir} in " in result.stdout and "every_rank)" in result.stdout
    assert "[fsdpqlora] peak host RSS per rank after loading: " in result.stdout
    assert f"adapter: {run_dir / 'adapter'}" in result.stdout
    assert "answer (base + saved adapter, greedy):" in result.stdout

    cfg = load_config_file(run_dir / "config.yaml")
    assert cfg.adapter.r == 8 and cfg.launch.run_dir == str(run_dir)
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    first, last = sum(m["loss"] for m in metrics[:3]) / 3, sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < first - 0.05, (first, last)
    assert all(m["tokens_per_s"] > 0 and m["peak_mem_gib"] > 0 and 0 <= m["padding"] < 0.5 for m in metrics)
    evaluations = _metrics(run_dir, "eval_loss")
    assert [m["step"] for m in evaluations] == [6, 12]
    assert evaluations[1]["eval_loss"] < evaluations[0]["eval_loss"] and evaluations[0]["eval_tokens"] > 0
    assert "[fsdpqlora] batches (packed):" in result.stdout and "examples for evaluation" in result.stdout
    assert f"eval loss {evaluations[0]['eval_loss']:.4f} -> {evaluations[1]['eval_loss']:.4f}" in result.stdout

    adapter = run_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in adapter.iterdir()}
    assert AutoTokenizer.from_pretrained(adapter).get_vocab() == AutoTokenizer.from_pretrained(model_dir).get_vocab()
    config = LoraConfig.from_pretrained(adapter)
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (
        8, 32, sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    )  # fmt: skip
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len(weights) == 28
    assert weights["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (8, 192)
    assert not list(tmp_path.glob("out/*/.adapter*")), "no temporary adapter directory left behind"

    # What the run directory keeps of the run: the command, the console, the pictures, TensorBoard.
    command = (run_dir / "command.txt").read_text().splitlines()
    assert len(command) == 2 and command[1] == f"cd {shlex.quote(str(tmp_path))} && fsdpqlora {shlex.join(overrides)}"
    log = (run_dir / "train.log").read_text()
    for line in ("[fsdpqlora] plan: ", f"[fsdpqlora] run directory: {run_dir}", "[fsdpqlora] batches (packed):",
                 "step    12  loss ", "step     6  eval loss ", "step     6  sample 1/1 (greedy, 8 tokens at most)\n  prompt:   ",
                 "[fsdpqlora] the evaluation example's answer: ", "[fsdpqlora] run finished"):  # fmt: skip
        assert line in log, line
    assert log.index("starting 2 workers") < log.index("step     1  loss") < log.index("run finished")
    assert "tokenizing" not in log and "\r" not in log, "no progress bars"
    assert log.count("\n  answer:   ") == 2  # a sample at each of the two evaluations
    assert (run_dir / "plots" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 13))
    assert [value for _, value in scalars["eval/eval_loss"]] == pytest.approx([m["eval_loss"] for m in evaluations])


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """The scalars of TensorBoard event files (TFRecords: length, its CRC, an Event, the Event's CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_torchrun_ranks_share_one_run_directory(model_dir, cache_dir, tmp_path):
    out = tmp_path / "out"
    overrides = [*base_overrides(model_dir, cache_dir), f"launch.output_root={out}", "train.max_steps=2", "logger=wandb"]
    run_torchrun(2, ["-m", "fsdpqlora.train", *overrides], timeout=300)
    (run_dir,) = out.iterdir()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert len(_metrics(run_dir)) == 2
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run recorded"
    # No launcher: rank 0 records how torchrun started the workers, and keeps the console's lines.
    command = (run_dir / "command.txt").read_text().splitlines()
    assert command[1].endswith(f" && torchrun --nproc-per-node 2 -m fsdpqlora.train {shlex.join(overrides)}")
    assert "[fsdpqlora] done: 2 steps" in (run_dir / "train.log").read_text()
