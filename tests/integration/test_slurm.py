"""A real SLURM cluster of one host (Debian's slurm-wlm and munge, started here on localhost):
`fsdpqlora submit` writes and submits the project's job script, the job trains and writes its
adapter; a job told to stop before its time limit checkpoints, requeues itself, resumes and ends
with the same adapter as the uninterrupted job; sbatch --test-only accepts the generated script.

Skipped, saying why, where SLURM cannot run (not root, slurm-wlm not installed); .ci/run installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsdpqlora.launcher.slurm import TEMPLATES, template
from tests.helpers import REPO, base_overrides, run_launcher
from tests.integration.test_checkpoint import assert_same_adapter, losses

DAEMONS = ("munged", "slurmctld", "slurmd")
JOB = ["train.max_steps=6", "train.log_every=1", "checkpoint.every_steps=2", "adapter.dropout=0.1",
       "launch.cpu_workers=2", "slurm.gpus_per_node=0", "slurm.cpus_per_task=2", "slurm.time=10:00", "slurm.signal_seconds=0"]  # fmt: skip


def test_the_templates_are_the_generated_scripts():
    for name in TEMPLATES:
        assert (REPO / "slurm" / name).read_text() == template(name), f"slurm/{name}: run python -m fsdpqlora.launcher.slurm slurm/"


def slurm_conf(root: Path) -> str:
    host = socket.gethostname().split(".")[0]
    memory = int(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 1024 * 0.8)
    return f"""ClusterName=fsdpqlora-test
SlurmctldHost={host}
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# No cgroups in a container: processes tracked through /proc, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
# Schedule every 2 s instead of every 60 s, so that a test job starts when the node is free.
SchedulerParameters=sched_interval=2
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd on this host; yields the environment that reaches them."""
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root (slurmd runs jobs as their user); .ci/run runs as root")
    if missing := [d for d in (*DAEMONS, "sbatch") if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge (.ci/run does)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root))
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=f"{os.environ['PATH']}:/usr/sbin")
    pid_files = [root / "munge" / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]
    m = root / "munge"
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                    f"--log-file={m}/munged.log", f"--seed-file={m}/seed"], env=env, check=True)  # fmt: skip
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    try:
        deadline = time.monotonic() + 60
        while "idle" not in (state := subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout):
            if time.monotonic() > deadline:
                pytest.fail(f"the test cluster's node never became idle ({state!r}): {(root / 'slurmd.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in reversed(pid_files):
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text()), 15)
                except (ProcessLookupError, ValueError):
                    pass


def job_state(job_id: str, env) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, env, log: Path, until=lambda state: state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) -> dict:
    deadline = time.monotonic() + 240
    held_since = None
    while time.monotonic() < deadline:
        state = job_state(job_id, env)
        if until(state):
            return state
        if state.get("Reason") == "BeginTime":
            # slurmctld holds a requeued job for two minutes (a real cluster's job waits them too);
            # the test lets it go after two seconds: slurmd refuses a job credential made in the
            # same second as the revocation of the job's previous one ("Job credential revoked",
            # the job then fails with exit 1), which releasing it at once can hit.
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since >= 2:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: {job_state(job_id, env)}\n{log.read_text()[-4000:] if log.is_file() else 'no log'}")


def submit(args: list[str], env) -> str:
    result = subprocess.run([sys.executable, "-m", "fsdpqlora.launcher.cli", "submit", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()[-1]


@pytest.fixture(scope="session")
def job_env(slurm):
    return dict(slurm, FSDPQLORA_VENV=sys.prefix, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="session")
def finished_job(tmp_path_factory, job_env, model_dir, cache_dir) -> Path:
    """An uninterrupted job: the run directory it trained into."""
    out = tmp_path_factory.mktemp("jobs")
    job_id = submit([*base_overrides(model_dir, cache_dir), *JOB, f"launch.output_root={out}"], job_env)
    log = out / f"slurm-{job_id}.out"
    state = wait_for_job(job_id, job_env, log)
    assert state["JobState"] == "COMPLETED", log.read_text()[-4000:]
    return out / f"slurm-{job_id}"


def test_a_submitted_job_trains_and_writes_its_adapter(finished_job):
    log = finished_job.parent / f"{finished_job.name}.out"
    assert (finished_job / "job.sbatch").is_file()
    assert (finished_job / "adapter" / "adapter_model.safetensors").is_file()
    assert [step for step, _ in losses(finished_job)] == [1, 2, 3, 4, 5, 6]
    assert "[fsdpqlora] run finished" in log.read_text()


def test_a_job_told_to_stop_checkpoints_requeues_and_resumes_exactly(tmp_path, job_env, model_dir, cache_dir, finished_job):
    """SIGUSR1 to the batch script (what --signal=B:USR1@N sends before the time limit): the job
    checkpoints, exits 75, requeues itself, and the requeued job resumes to the same adapter."""
    job_id = submit([*base_overrides(model_dir, cache_dir), *JOB, f"launch.output_root={tmp_path}"], job_env)
    run_dir, log = tmp_path / f"slurm-{job_id}", tmp_path / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 2):
        assert time.monotonic() < deadline, log.read_text()[-4000:] if log.is_file() else "no log"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=job_env, check=True)
    state = wait_for_job(job_id, job_env, log, until=lambda s: s["JobState"] == "COMPLETED" and s.get("Restarts") == "1")
    text = log.read_text()
    assert "SIGUSR1: stopped after step" in text and f"requeuing job {job_id}" in text, text[-4000:]
    stopped = int(re.search(r"SIGUSR1: stopped after step (\d+)", text)[1])
    assert 2 <= stopped < 6 and f"resumed from {run_dir / 'checkpoints' / f'step-{stopped:08d}'} at step {stopped}" in text
    assert state["Restarts"] == "1"
    assert losses(run_dir) == losses(finished_job)
    assert_same_adapter(run_dir, finished_job)


def test_sbatch_test_only_accepts_the_generated_script(tmp_path, job_env, model_dir, cache_dir):
    result = subprocess.run([sys.executable, "-m", "fsdpqlora.launcher.cli", "submit", "--dry-run",
                             *base_overrides(model_dir, cache_dir), *JOB, "slurm.signal_seconds=60", f"launch.output_root={tmp_path}"],
                            env=job_env, cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --signal=B:USR1@60" in result.stdout and "#SBATCH --requeue" in result.stdout
    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout)
    checked = subprocess.run(["sbatch", "--test-only", str(script)], env=job_env, cwd=REPO, capture_output=True, text=True)
    assert checked.returncode == 0 and "to start at" in checked.stderr, checked.stderr


def test_submit_checks_every_sweep_point_before_queuing_any(tmp_path, model_dir, cache_dir):
    """No cluster needed: --dry-run prints one script per point; one bad point refuses them all."""
    command = [sys.executable, "-m", "fsdpqlora.launcher.cli", "submit", "--dry-run", "-m", *base_overrides(model_dir, cache_dir),
               f"launch.output_root={tmp_path}", "slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.partition=gpu",
               'slurm.extra_args=["--qos=high"]', "train.lr=1e-4,2e-4"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("#!/usr/bin/env bash") == 2
    for line in ("#SBATCH --nodes=2", "#SBATCH --gres=gpu:4", "#SBATCH --partition=gpu", "#SBATCH --qos=high",
                 f"#SBATCH --output={tmp_path}/slurm-%j.out", f'run_dir="{tmp_path}/slurm-${{SLURM_JOB_ID}}"'):  # fmt: skip
        assert line in result.stdout
    assert "train.lr=0.0001\n" in result.stdout and "train.lr=0.0002\n" in result.stdout
    assert not list(tmp_path.iterdir()), "a dry run creates nothing"

    result = subprocess.run([*command[:-1], "train.lr=1e-4,-1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert "fsdpqlora: error: train.lr=-1.0: must be positive" in result.stderr


def test_a_dry_run_plans_the_requested_nodes_and_downloads_nothing(tmp_path, monkeypatch):
    """A hub model on a rig preset: the GPUs per node are the rig's, the plan is for the job's 2
    nodes of 8 GPUs of 80 GiB (not this machine), and nothing is fetched (a download fails the test)."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError(f"submit --dry-run downloaded {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    result = run_launcher("submit", "--dry-run", "model=llama-3.1-8b", "rig=8x80gb", "slurm.nodes=2", "data.seq_len=2048",
                          f"launch.output_root={tmp_path}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2\n" in result.stdout and "#SBATCH --gres=gpu:8\n" in result.stdout
    plan = [line for line in result.stderr.splitlines() if line.startswith("[fsdpqlora] plan")]
    assert len(plan) == 1 and plan[0].startswith("[fsdpqlora] plan for 2 nodes of 8 GPUs: ") and " of 80.0 GiB per GPU, " in plan[0]
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.sbatch")), "no model fetched, no job"


def test_gpus_per_node_unset_without_a_rig_is_refused_and_a_cpu_job_warned(tmp_path, model_dir, cache_dir):
    result = run_launcher("submit", "--dry-run", *base_overrides(model_dir, cache_dir), "slurm.nodes=2", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("fsdpqlora: error: slurm.gpus_per_node is not set: give the GPUs per node")
    result = run_launcher("submit", "--dry-run", *base_overrides(model_dir, cache_dir), "slurm.gpus_per_node=0", cwd=tmp_path)
    assert result.returncode == 0 and "--gres" not in result.stdout
    assert "[fsdpqlora] warning: slurm.gpus_per_node=0: a CPU job (no --gres line), 2 CPU workers per node" in result.stderr
    assert "[fsdpqlora] plan for 1 node of 2 CPU workers: needs " in result.stderr  # the job's node, not this one
