"""What users do to runs, for real (the launcher, 2 CPU workers, a run directory on a small tmpfs):
a second command on a live run's directory, Ctrl-C, a refused resume that must change nothing, a
full disk, and the launcher killed outright (its workers stop, holding the run directory until then)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsdpqlora.errors import ConfigError
from fsdpqlora.rundir import check_not_locked
from fsdpqlora.train.preemption import REQUEUE_EXIT_CODE
from tests.helpers import REPO, base_overrides, run_launcher
from tests.integration.test_checkpoint import finish, losses, wait_for_step, workers_of

pytestmark = pytest.mark.distributed

# No planned checkpoint: every one here is a stop's (each run is stopped long before its end).
# Dropout on, as a resume must restore it.
OVERRIDES = ["train.max_steps=500", "train.log_every=1", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
             "adapter.dropout=0.1"]  # fmt: skip


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def launcher(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "fsdpqlora.launcher.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def latest_step(run_dir: Path) -> int:
    latest = (run_dir / "checkpoints" / "latest").read_text()
    return json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())["step"]


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "fsdpqlora: error:" in line]


def test_a_second_command_ctrl_c_a_refused_resume_a_full_disk_and_a_killed_launcher(tmp_path, model_dir, cache_dir):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("a small file system to fill needs root, to mount a tmpfs (mount refused)")
    try:
        run_in(mount / "run", [*base_overrides(model_dir, cache_dir), *OVERRIDES])
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def run_in(run_dir: Path, overrides: list[str]) -> None:
    args = [*overrides, f"launch.run_dir={run_dir}", "launch.cpu_workers=2"]
    config_file = run_dir / "config.yaml"

    # A second command on a live run's directory is refused, naming the launcher, and changes nothing.
    first = launcher(args)
    wait_for_step(run_dir, 2, first)
    recorded = config_file.read_bytes()
    refused = run_launcher(*args, "train.lr=1")
    assert refused.returncode == 2, refused.stderr
    assert error_lines(refused.stderr) == [
        f"fsdpqlora: error: launch.run_dir={run_dir}: a live run (pid {first.pid} on {os.uname().nodename}) is "
        "using this run directory; wait for it to end (or stop it: SIGTERM saves a checkpoint), or choose another launch.run_dir"
    ]
    assert config_file.read_bytes() == recorded

    # Ctrl-C: a checkpoint (the first of this run), exit 75, no traceback, no crash report, and the
    # command that resumes.
    first.send_signal(signal.SIGINT)
    code, out = finish(first)
    assert code == REQUEUE_EXIT_CODE, out[-4000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "failed (exitcode" not in out, out[-4000:]
    assert "Ctrl-C: the workers save a checkpoint after this step" in out and "SIGINT: stopped after step" in out
    stopped = latest_step(run_dir)
    assert stopped >= 2 and losses(run_dir)[-1][0] == stopped and not (run_dir / "adapter").exists()
    printed = re.search(r"resume it from its last checkpoint with: (.*)", out).group(1)
    assert shlex.split(printed) == ["fsdpqlora", *overrides, "launch.cpu_workers=2", f"launch.run_dir={run_dir}"]
    resume_args = shlex.split(printed)[1:]

    # A refused resume changes nothing, and following its advice works (checked in-process in
    # tests/unit/test_run_dir.py); checkpoint.resume=never points back to auto, not in a loop.
    for extra, message in (("adapter.r=8", "to continue this run, keep adapter.r=16"),
                           ("checkpoint.resume=never", "or continue this one with checkpoint.resume=auto")):  # fmt: skip
        refused = run_launcher(*resume_args, extra)
        assert refused.returncode == 2 and len(error_lines(refused.stderr)) == 1 and message in refused.stderr, refused.stderr
        assert config_file.read_bytes() == recorded

    # The disk filled to less than a checkpoint: the launcher warns, and resumes.
    free = shutil.disk_usage(run_dir).free
    (run_dir.parent / "filler").write_bytes(bytes(free - 256 * 1024))
    second = launcher(resume_args)
    wait_for_step(run_dir, stopped + 1, second)

    # The launcher killed outright: the kernel sends its workers SIGTERM and they stop, holding the
    # run directory until they have. Their checkpoint does not fit: one line names the path and the
    # space, the partial checkpoint is removed, and the previous one stays the latest.
    workers = workers_of(second)
    os.kill(second.pid, signal.SIGKILL)
    with pytest.raises(ConfigError, match="a live run"):
        check_not_locked(run_dir)
    _, out = finish(second)
    # The launcher's output ends when the workers close it, a moment before they have exited.
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in workers if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive
    assert re.search(rf"\[fsdpqlora\] warning: {re.escape(str(run_dir))} has [\d,]+ bytes free and a checkpoint needs "
                     r"about [\d,]+: checkpoints will fail", out), out[-4000:]  # fmt: skip
    assert f"[fsdpqlora] resumed from {run_dir / 'checkpoints'}" in out
    [line] = error_lines(out)
    assert re.fullmatch(rf"fsdpqlora: error: the checkpoint {re.escape(str(run_dir))}/checkpoints/step-\d+ could not be written "
                        r"\(.*\): its file system has [\d,]+ bytes free and a checkpoint needs about [\d,]+; free some space "
                        rf"or choose a launch.run_dir elsewhere. Last complete checkpoint: {re.escape(str(run_dir))}/checkpoints/"
                        rf"step-{stopped:08d}", line), line  # fmt: skip
    assert "Traceback" not in out, out[-4000:]
    assert latest_step(run_dir) == stopped and not list((run_dir / "checkpoints").glob(".partial-*"))


def test_a_full_disk_at_the_final_adapter_is_one_line_naming_the_checkpoint_that_holds_it(tmp_path, model_dir, cache_dir,
                                                                                           process_group):  # fmt: skip
    """The run's last write, the adapter beside the checkpoints: on a full disk every rank raises the
    same one-line error (path, space, the checkpoint holding the same adapter), nothing half-written."""
    from fsdpqlora.config import compose_config
    from fsdpqlora.model.build import build_model
    from fsdpqlora.train.checkpoint import CheckpointWriteError, write_final_adapter

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("a small file system to fill needs root, to mount a tmpfs (mount refused)")
    try:
        model = build_model(compose_config(base_overrides(model_dir, cache_dir)), process_group, model_dir, shard=False).model
        checkpoint = tmp_path / "checkpoints" / "step-00000010"
        with pytest.raises(CheckpointWriteError) as error:
            write_final_adapter(model, mount / "adapter", checkpoint, process_group)
        message = str(error.value)
        assert message.startswith(f"the adapter {mount / 'adapter'} could not be written (SafetensorError: ")
        assert "bytes free and the adapter needs about " in message and message.endswith(f"is in {checkpoint / 'adapter'}")
        assert "\n" not in message
        assert sorted(p.name for p in mount.iterdir()) == [], "no partial adapter left behind"
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)
