"""What `fsdpqlora submit` asks SLURM for and plans for (fsdpqlora/launcher/slurm.py job_gpus,
fsdpqlora/plan/rig.py job_rig): the GPUs per node from slurm.gpus_per_node or the named rig, never a
CPU job by accident, and the plan on the job's nodes rather than the login node."""

from __future__ import annotations

import pytest

from fsdpqlora.config import compose_config
from fsdpqlora.errors import ConfigError
from fsdpqlora.launcher.slurm import job_gpus, sbatch_options
from fsdpqlora.logs import configure_logging
from fsdpqlora.plan.rig import job_rig


def test_gpus_per_node_comes_from_the_rig_when_unset():
    cfg = compose_config(["rig=8x80gb", "slurm.nodes=2"])
    assert job_gpus(cfg) == 8
    rig = job_rig(cfg, 8)
    assert (rig.nodes, rig.gpus_per_node, rig.gpu_memory_gib, rig.workers) == (2, 8, 80, 16)
    assert job_gpus(compose_config(["rig=8x80gb", "slurm.gpus_per_node=4"])) == 4  # given wins


def test_without_a_rig_gpus_per_node_is_required():
    with pytest.raises(ConfigError, match=r"^slurm.gpus_per_node is not set: give the GPUs per node \(slurm.gpus_per_node=4\), "
                                          r"or name the nodes' rig \(rig=8x80gb"):  # fmt: skip
        job_gpus(compose_config(["slurm.nodes=2"]))


def test_a_cpu_job_only_when_asked_and_with_a_warning(capsys):
    configure_logging()
    cfg = compose_config(["slurm.gpus_per_node=0", "launch.cpu_workers=3"])
    assert job_gpus(cfg) == 0
    assert capsys.readouterr().out == (
        "[fsdpqlora] warning: slurm.gpus_per_node=0: a CPU job (no --gres line), 3 CPU workers per node "
        "(launch.cpu_workers); a GPU job needs slurm.gpus_per_node or a GPU rig\n"
    )
    assert not [o for o in sbatch_options(cfg) if o.startswith("--gres")]
    rig = job_rig(cfg, 0)
    assert (rig.gpus_per_node, rig.workers, rig.host_memory_gib) == (0, 3, 0)  # the job's nodes' memory: unknown
