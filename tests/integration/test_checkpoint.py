"""Never lose a run: checkpoints, exact resume after SIGKILL or SIGTERM, partial checkpoints ignored,
incompatible resumes refused, non-finite losses stopped or skipped (gloo, 2 ranks)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fsdpqlora.train.preemption import REQUEUE_EXIT_CODE
from tests.helpers import REPO, base_overrides

pytestmark = pytest.mark.distributed

STEPS = 8
# Dropout on, so that an exact continuation also needs every rank's random state restored.
CHECKPOINTED = ["train.max_steps=8", "train.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep=2", "adapter.dropout=0.1"]


def torchrun(run_dir: Path, overrides: list[str], max_restarts: int = 0, nproc: int = 2) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", "-m", "fsdpqlora.train", f"launch.run_dir={run_dir}", *overrides]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}: {finish(process)[1][-3000:]}")


def workers_of(process: subprocess.Popen) -> list[int]:
    """The worker processes torchrun started (its children)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == process.pid:
            children.append(int(stat.parent.name))
    return children


def assert_same_adapter(run_dir: Path, reference: Path) -> None:
    ours, ref = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, reference))
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


@pytest.fixture(scope="session")
def overrides(model_dir, cache_dir):
    return [*base_overrides(model_dir, cache_dir), *CHECKPOINTED]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, overrides) -> Path:
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out = finish(torchrun(run_dir, overrides))
    assert code == 0, out[-4000:]
    return run_dir


def test_checkpoints_are_complete_and_only_the_last_are_kept(reference):
    checkpoints = reference / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000006", "step-00000008"]
    assert (checkpoints / "latest").read_text() == "step-00000008"
    last = checkpoints / "step-00000008"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2 and meta["config"]["adapter"]["r"] == 16
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert (last / "state" / ".metadata").is_file()
    # The adapter of the last checkpoint is the run's final adapter, in PEFT format.
    assert sorted(p.name for p in (last / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    final, saved = (load_file(d / "adapter_model.safetensors") for d in (reference / "adapter", last / "adapter"))
    assert all(torch.equal(final[k], saved[k]) for k in final)
    assert not list(checkpoints.glob(".partial-*"))


def test_sigkill_of_a_worker_restarts_the_group_and_continues_exactly(tmp_path, overrides, reference):
    """A worker killed outright at a random step: torchrun restarts the group, which resumes from
    the last checkpoint; losses and the final adapter equal the uninterrupted run's, bit for bit."""
    run_dir = tmp_path / "run"
    process = torchrun(run_dir, overrides, max_restarts=1)
    kill_at = random.randint(3, STEPS - 2)
    wait_for_step(run_dir, kill_at, process)
    os.kill(random.choice(workers_of(process)), signal.SIGKILL)
    code, out = finish(process)
    assert code == 0, f"killed after step {kill_at}:\n{out[-4000:]}"
    assert "[fsdpqlora] resumed from " in out
    assert losses(run_dir) == losses(reference), f"killed after step {kill_at}"
    assert_same_adapter(run_dir, reference)


def test_resume_on_another_number_of_workers(reference, tmp_path, overrides):
    """A requeued job may get fewer GPUs: the sharded state is resharded on load, and the same
    global batch (1 worker x 2 accumulation steps for 2 x 1) continues the same data."""
    run_dir = shutil.copytree(reference, tmp_path / "run")
    code, out = finish(torchrun(run_dir, [*overrides, "train.max_steps=10", "train.grad_accum_steps=2"], nproc=1))
    assert code == 0, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000008'} at step 8" in out
    assert "warning: changed since that checkpoint" not in out
    assert [step for step, _ in losses(run_dir)] == list(range(1, 11))


def test_partial_checkpoints_are_never_used_and_are_removed(reference, tmp_path, process_group, overrides):
    from fsdpqlora.config import compose_config
    from fsdpqlora.train.checkpoint import Checkpointer

    run_dir = shutil.copytree(reference, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    # A crash while writing step 10 (before meta.json, the last file) and a pointer that was never
    # updated, or points at nothing.
    shutil.copytree(checkpoints / "step-00000008", checkpoints / ".partial-step-00000010")
    (checkpoints / ".partial-step-00000010" / "meta.json").unlink()
    shutil.copytree(checkpoints / "step-00000008" / "state", checkpoints / "step-00000012" / "state")
    (checkpoints / "latest").write_text("step-00000014")
    checkpointer = Checkpointer(compose_config(overrides), run_dir, process_group)
    assert checkpointer.latest() == checkpoints / "step-00000008"
    checkpointer.remove_partial()
    assert not (checkpoints / ".partial-step-00000010").exists()


def test_a_checkpoint_of_another_adapter_is_refused_naming_the_key(reference, overrides):
    from fsdpqlora.config import compose_config
    from fsdpqlora.errors import ConfigError
    from fsdpqlora.train.checkpoint import check_resumable

    path = reference / "checkpoints" / "step-00000008"
    saved = json.loads((path / "meta.json").read_text())["config"]
    with pytest.raises(ConfigError, match=r"adapter.r=8: the checkpoint .* was trained with adapter.r=16, so its state cannot be resumed"):
        check_resumable(saved, compose_config([*overrides, "adapter.r=8"]), path)
    # Safe changes pass; the ones that change the trajectory are named for a warning.
    changed = check_resumable(saved, compose_config([*overrides, "train.lr=1e-3", "train.max_steps=20", "logger=wandb"]), path)
    assert changed == ["train.lr"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_loss_stops_or_is_skipped(reference, tmp_path, overrides, policy):
    """Resumed with an absurd learning rate, the adapter blows up after one step and the loss turns
    NaN: `stop` names the step and the last good checkpoint, `skip` leaves such steps out."""
    run_dir = shutil.copytree(reference, tmp_path / "run")
    code, out = finish(torchrun(run_dir, [*overrides, "train.max_steps=12", "train.lr=1e30", f"checkpoint.on_nonfinite={policy}"]))
    if policy == "stop":
        assert code != 0
        assert "fsdpqlora: error: step 10: the loss (nan) or the gradient norm" in out, out[-3000:]
        assert f"Last good checkpoint: {run_dir / 'checkpoints' / 'step-00000008'}" in out
        assert (run_dir / "checkpoints" / "latest").read_text() == "step-00000008"
    else:
        assert code == 0, out[-3000:]
        assert "[fsdpqlora] 3 steps skipped: loss or gradient not finite" in out
        assert "skipped: loss nan" in out


def run_then_resume_at_step_2(tmp_path: Path, overrides: list[str]) -> tuple[Path, Path]:
    """Train to the end in one run directory, then resume a second one holding only the first's
    step-2 checkpoint; returns both run directories, each run checked to have finished."""
    uninterrupted = tmp_path / "uninterrupted"
    code, out = finish(torchrun(uninterrupted, overrides))
    assert code == 0, out[-3000:]
    step2 = uninterrupted / "checkpoints" / "step-00000002"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, resumed / "checkpoints" / step2.name)
    code, out = finish(torchrun(resumed, overrides))
    assert code == 0, out[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / step2.name} at step 2" in out
    return uninterrupted, resumed


def test_bitsandbytes_optimizer_and_fp16_scaler_resume_exactly_on_the_same_layout(tmp_path, overrides):
    """bitsandbytes' 8-bit state is per shard: each rank saves its own, the resume continues
    bit for bit (fp16's loss scale restored too), and a resume on another number of workers is
    refused with the key named."""
    eight_bit = [*overrides, "train.optimizer=adamw_8bit", "precision=fp16", "train.max_steps=4", "checkpoint.keep=0"]
    uninterrupted, resumed = run_then_resume_at_step_2(tmp_path, eight_bit)
    step2 = uninterrupted / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in (step2 / "optim").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert json.loads((step2 / "meta.json").read_text())["grad_scaler"]["scale"] > 0
    assert_same_adapter(resumed, uninterrupted)

    code, out = finish(torchrun(resumed, [*eight_bit, "train.max_steps=6", "train.grad_accum_steps=2"], nproc=1))
    assert code != 0
    assert "train.optimizer='adamw_8bit': the checkpoint" in out and "holds its state per shard of 2 workers" in out


def test_no_shard_resumes_exactly(tmp_path, overrides):
    """no_shard's replicated copies (plain tensors on every rank, no FSDP) checkpoint one copy of the
    adapter and optimizer state; a run resumed from one continues bit for bit, every rank's dropout
    masks included, to the same final adapter."""
    replicated = [*overrides, "shard=no_shard", "train.max_steps=4", "checkpoint.keep=0"]
    uninterrupted, resumed = run_then_resume_at_step_2(tmp_path, replicated)
    assert losses(resumed) == losses(uninterrupted)[2:]
    assert_same_adapter(resumed, uninterrupted)


def launcher(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """The `fsdpqlora` launcher (its own elastic agent, 2 CPU workers)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "fsdpqlora.launcher.cli", f"launch.run_dir={run_dir}", "launch.cpu_workers=2", *overrides]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_stop_signal_to_the_launcher_checkpoints_exits_75_and_is_not_restarted(tmp_path, overrides, reference, sig):
    """What SLURM's --signal and scancel do to the batch script, which forwards it to the launcher:
    the launcher forwards it to every worker, they finish the step, save a complete checkpoint and
    exit 75, the launcher restarts nothing (max_restarts is 3) and exits 75, with no final adapter;
    the same command then continues exactly. (SIGUSR1, the same handler, runs through SLURM in
    tests/integration/test_slurm.py.)"""
    run_dir = tmp_path / "run"
    process = launcher(run_dir, overrides)
    wait_for_step(run_dir, 3, process)
    process.send_signal(sig)
    code, out = finish(process)
    assert code == REQUEUE_EXIT_CODE, out[-4000:]
    assert f"{sig.name}: stopped after step" in out and "restart 1 of" not in out
    latest = (run_dir / "checkpoints" / "latest").read_text()
    step = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())["step"]
    assert 3 <= step < STEPS and losses(run_dir)[-1][0] == step
    assert not (run_dir / "adapter").exists(), "an unfinished run hands back no final adapter"

    code, out = finish(launcher(run_dir, overrides))
    assert code == 0, out[-4000:]
    assert f"[fsdpqlora] resumed from {run_dir / 'checkpoints' / latest} at step {step}" in out
    assert losses(run_dir) == losses(reference)
    assert_same_adapter(run_dir, reference)


def test_the_launcher_restarts_a_killed_worker_but_not_a_diverged_run(reference, tmp_path, overrides):
    """A worker killed outright is restarted (resuming exactly); a worker that exits 2 (here: the
    loss became NaN, checkpoint.on_nonfinite=stop) is not: a restart would only fail again."""
    run_dir = tmp_path / "run"
    process = launcher(run_dir, overrides)
    wait_for_step(run_dir, 5, process)
    os.kill(workers_of(process)[0], signal.SIGKILL)
    code, out = finish(process)
    assert code == 0, out[-4000:]
    assert "signal SIGKILL" not in out and "restart 1 of 3, resuming from the last checkpoint" in out
    assert losses(run_dir) == losses(reference)
    assert_same_adapter(run_dir, reference)

    code, out = finish(launcher(run_dir, [*overrides, "train.max_steps=12", "train.lr=1e30"]))
    assert code == 2, out[-4000:]
    assert "fsdpqlora: error: step 10: the loss (nan)" in out and "restart 1 of" not in out
    assert "[fsdpqlora] run failed (exit code 2)" in out
