"""What a run directory must survive, decided in-process: one live run per directory (a lock that a
killed holder does not leave stuck), resume decisions made from meta.json alone with advice that
works when followed, a read-only directory refused before anything is written, the free-space
warning and the planner's checkpoint size, the command that resumes, Ctrl-C twice, one error line
per run rather than per rank, and `generate` on a stopped run pointing at its newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fsdpqlora.config import Config, to_dict
from fsdpqlora.errors import ConfigError, UserError, exit_on_user_error
from fsdpqlora.launcher.cli import resume_command
from fsdpqlora.rundir import LOCK_FILE, check_not_locked, check_writable, lock_run_dir, short_of_space
from fsdpqlora.train.checkpoint import resume_point
from fsdpqlora.train.preemption import StopRequests
from tests.helpers import REPO


def test_a_locked_run_directory_is_refused_naming_the_holder_and_a_joining_worker_shares_it(tmp_path):
    run_dir = tmp_path / "run"
    check_not_locked(run_dir)
    assert not run_dir.exists(), "a check writes nothing"
    lock = lock_run_dir(run_dir)
    pid, host = (run_dir / LOCK_FILE).read_text().split()
    assert int(pid) == os.getpid()
    expected = f"launch.run_dir={run_dir}: a live run (pid {pid} on {host}) is using this run directory"
    for attempt in (lambda: check_not_locked(run_dir), lambda: lock_run_dir(run_dir)):
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
            attempt()
    worker = lock_run_dir(run_dir, joining=True)  # the launcher's rank-0 worker
    lock.release()
    with pytest.raises(ConfigError, match="a live run"):  # the worker alone still holds the run
        check_not_locked(run_dir)
    worker.release()
    lock_run_dir(run_dir).release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fsdpqlora.rundir import lock_run_dir; "
         "lock = lock_run_dir(__import__('pathlib').Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()", str(run_dir)],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on"):
            check_not_locked(run_dir)
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(run_dir).release()


def write_checkpoint(run_dir: Path, step: int, cfg: Config) -> Path:
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "config": to_dict(cfg)}))
    return path


def test_resume_decisions_come_from_meta_json_and_their_advice_works_when_followed(tmp_path):
    cfg = Config()
    run_dir = tmp_path / "run"
    assert resume_point(cfg, run_dir) is None
    write_checkpoint(run_dir, 10, cfg)
    newest = write_checkpoint(run_dir, 20, cfg)
    (run_dir / "checkpoints" / ".partial-step-00000030").mkdir()
    assert resume_point(cfg, run_dir) == newest

    other_r = replace(cfg, adapter=replace(cfg.adapter, r=8))
    with pytest.raises(ConfigError) as refused:
        resume_point(other_r, run_dir)
    assert str(refused.value) == (
        f"adapter.r=8: the checkpoint {newest} was trained with adapter.r=16, so its state cannot be resumed; "
        "to train with adapter.r=8, choose another launch.run_dir; to continue this run, keep adapter.r=16"
    )
    never = replace(cfg, checkpoint=replace(cfg.checkpoint, resume="never"))
    with pytest.raises(ConfigError) as refused:
        resume_point(never, run_dir)
    assert "choose another launch.run_dir for a new run, or continue this one with checkpoint.resume=auto" in str(refused.value)
    # Each piece of advice, followed: another directory starts afresh, the same settings resume.
    assert resume_point(other_r, tmp_path / "another") is None
    assert resume_point(never, tmp_path / "another") is None
    assert resume_point(never, run_dir, restarted=True) == newest  # the run's own checkpoints, after a crash

    by_path = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=str(run_dir / "checkpoints" / ".partial-step-00000030")))
    with pytest.raises(ConfigError, match="not a complete checkpoint directory"):
        resume_point(by_path, tmp_path / "another")


def test_a_read_only_run_directory_is_refused_before_anything_is_written(tmp_path):
    source, mount = tmp_path / "source", tmp_path / "read-only"
    source.mkdir()
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(mount)], capture_output=True).returncode != 0:
        pytest.skip("a read-only bind mount needs root (mount refused)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True, capture_output=True)
        with pytest.raises(ConfigError) as refused:
            check_writable(mount / "outputs" / "run")
        assert str(refused.value) == (
            f"launch.run_dir={mount / 'outputs' / 'run'}: {mount} is on a read-only file system; "
            "choose a launch.run_dir that can be written"
        )
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    check_writable(mount / "outputs" / "run")


def test_the_free_space_warning_and_the_planned_checkpoint_size(tmp_path):
    from transformers import LlamaConfig

    from fsdpqlora.plan.arch import architecture
    from fsdpqlora.plan.memory import checkpoint_bytes

    assert short_of_space(tmp_path / "run", 1) is None
    warning = short_of_space(tmp_path / "run", 2**60)
    assert warning.startswith(f"warning: {tmp_path} has ") and f"a checkpoint needs about {2**60:,}" in warning
    # The tests' tiny Llama (tests/helpers.py TEST_LLAMA), LoRA r=16 on every linear in float32:
    # per layer A is 16 x 576 inputs and B 640 outputs x 16, two layers.
    hf_config = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512)  # fmt: skip
    cfg = Config()
    cfg = replace(cfg, model=replace(cfg.model, name="test-llama"), adapter=replace(cfg.adapter, dtype="float32"))
    adapter = 2 * 16 * (576 + 640) * 4
    # The adapter twice, AdamW's two moments (and a float32 step for each of the 28 tensors), a MiB of the rest.
    assert checkpoint_bytes(architecture(cfg, hf_config), "adamw") == 2 * adapter + 2 * adapter + 4 * 28 + 2**20


def test_the_resume_command_names_the_run_directory_and_resumes_whatever_resume_said():
    argv = ["model=tiny", "train.lr=2e-4", "launch.run_dir=old", "checkpoint.resume=never", 'data.prompt_template="Q: {q}"']
    assert resume_command(argv, Path("/runs/a b")) == (
        "fsdpqlora model=tiny train.lr=2e-4 'data.prompt_template=\"Q: {q}\"' 'launch.run_dir=/runs/a b'"
    )


def test_ctrl_c_is_a_stop_request_and_twice_stops_at_once():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        stop = StopRequests()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_an_error_every_rank_raised_is_printed_by_rank_0_only(monkeypatch, capsys):
    for rank, agreed, printed in (("0", True, True), ("1", True, False), ("1", False, True)):
        monkeypatch.setenv("RANK", rank)
        error = UserError("the problem")
        error.agreed = agreed
        with pytest.raises(SystemExit) as exited, exit_on_user_error():
            raise error
        assert exited.value.code == 2
        assert capsys.readouterr().err == ("fsdpqlora: error: the problem\n" if printed else "")


def test_generate_on_a_stopped_run_names_its_newest_checkpoint(tmp_path):
    from fsdpqlora.errors import ModelFilesError
    from fsdpqlora.export.locate import locate

    run_dir = tmp_path / "run"
    for step in (5, 12):
        write_checkpoint(run_dir, step, Config())
    with pytest.raises(ModelFilesError) as refused:
        locate(run_dir, need_adapter=True)
    assert str(refused.value) == (
        f"{run_dir}: the run has not finished, so it has no adapter/ yet; its newest checkpoint holds the adapter so far: "
        f"{run_dir / 'checkpoints' / 'step-00000012'}"
    )


def test_ctrl_c_while_the_launcher_checks_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path):
    """Before any worker starts (model files, data, the plan), Ctrl-C ends the launcher with one
    line, no traceback, and no run directory."""
    from fsdpqlora.launcher import cli

    def interrupted(overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "prepare_run", interrupted)
    assert cli.main([f"launch.output_root={tmp_path}/out"]) == 128 + signal.SIGINT
    assert capsys.readouterr().err == "fsdpqlora: interrupted before any worker started; nothing was written\n"
    assert not (tmp_path / "out").exists()
