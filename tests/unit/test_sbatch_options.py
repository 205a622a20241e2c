"""The #SBATCH options `fsdpqlora submit` writes (fsdpqlora/launcher/slurm.py sbatch_options):
one launcher task per node, GPUs, partition and account only when set, the warning signal to the
batch script, requeue with an appended log, and the user's extra options last."""

from __future__ import annotations

from fsdpqlora.config import config_from
from fsdpqlora.launcher.slurm import sbatch_options


def slurm(**settings):
    defaults = dict(nodes=1, gpus_per_node=0, cpus_per_task=16, time="24:00:00", partition="", account="",
                    job_name="fsdpqlora", signal_seconds=300, extra_args=[])  # fmt: skip
    return config_from({"slurm": {**defaults, **settings}})


def test_a_cpu_job_on_one_node():
    assert sbatch_options(slurm()) == [
        "--job-name=fsdpqlora",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=16",
        "--time=24:00:00",
        "--signal=B:USR1@300",
        "--requeue",
        "--open-mode=append",
    ]


def test_a_gpu_job_with_partition_account_and_extra_options():
    cfg = slurm(nodes=4, gpus_per_node=8, cpus_per_task=64, time="2-00:00:00", partition="gpu", account="ml",
                job_name="llama70b", signal_seconds=600, extra_args=["--qos=high", "--constraint=a100"])  # fmt: skip
    assert sbatch_options(cfg) == [
        "--job-name=llama70b",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "--time=2-00:00:00",
        "--gres=gpu:8",
        "--partition=gpu",
        "--account=ml",
        "--signal=B:USR1@600",
        "--requeue",
        "--open-mode=append",
        "--qos=high",
        "--constraint=a100",
    ]


def test_no_warning_signal_when_signal_seconds_is_0():
    options = sbatch_options(slurm(signal_seconds=0))
    assert not [o for o in options if o.startswith("--signal")]
    assert options[-2:] == ["--requeue", "--open-mode=append"]
