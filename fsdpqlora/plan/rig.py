"""The machine a plan is for: a preset (conf/rig/) or this machine, measured."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fsdpqlora.config import Config, RigConfig
from fsdpqlora.logs import plural

# Dense bf16 tensor-core peak (TFLOP/s), host link and peer link (GB/s per GPU) of GPUs a
# measured rig may have, matched by a substring of torch's device name. Others get UNKNOWN_GPU.
KNOWN_GPUS = {
    "H200": (989.0, 50.0, 400.0),
    "H100": (989.0, 50.0, 400.0),
    "A100": (312.0, 25.0, 240.0),
    "L40S": (362.0, 25.0, 10.0),
    "A6000": (155.0, 25.0, 10.0),
    "4090": (165.0, 25.0, 10.0),
    "3090": (71.0, 25.0, 10.0),
}
UNKNOWN_GPU = (100.0, 25.0, 10.0)
# One CPU worker's matrix throughput (a few cores, bf16 emulated): only ranks plans on CPU machines.
CPU_WORKER_TFLOPS = 0.05


@dataclass(frozen=True)
class Rig:
    name: str
    nodes: int
    gpus_per_node: int  # 0: CPU workers only
    cpu_workers: int
    gpu_memory_gib: float
    host_memory_gib: float
    tflops: float
    pcie_gbps: float
    interconnect_gbps: float
    internode_gbps: float

    @property
    def workers(self) -> int:
        return self.nodes * (self.gpus_per_node or self.cpu_workers)

    def describe(self) -> str:
        if self.gpus_per_node:
            gpus = f"{self.nodes * self.gpus_per_node} x {self.gpu_memory_gib:.0f} GiB GPU"
        else:
            gpus = plural(self.workers, "CPU worker")
        nodes = f" on {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.name}: {gpus}{nodes}, {self.host_memory_gib:.0f} GiB host RAM per node, {self.tflops:g} TFLOP/s per worker"


def rig_of(cfg: Config, workers: int | None = None) -> Rig:
    """The configured rig, or this machine's when rig.name=auto (with `workers` processes per node
    when the launcher has decided how many)."""
    r = cfg.rig
    if r.name != "auto":
        return Rig(r.name, r.nodes, r.gpus_per_node, cfg.launch.cpu_workers, r.gpu_memory_gib, r.host_memory_gib,
                   r.tflops or UNKNOWN_GPU[0], r.pcie_gbps, r.interconnect_gbps, r.internode_gbps)  # fmt: skip
    return measure(cfg, workers)


def measure(cfg: Config, workers: int | None = None, nodes: int | None = None) -> Rig:
    import torch

    # A figure given with rig=auto replaces the measured one (e.g. to leave room for other jobs); a
    # preset's figures describe another machine and do not.
    r = cfg.rig if cfg.rig.name == "auto" else RigConfig()
    host_gib = r.host_memory_gib or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = torch.cuda.device_count()
    gpus = gpus if cfg.launch.uses_cuda(gpus) else 0  # launch.device=cpu: the workers leave the GPUs alone
    if not gpus:
        return Rig("this machine", 1, 0, workers or cfg.launch.cpu_workers, 0.0, host_gib,
                   r.tflops or CPU_WORKER_TFLOPS, 0.0, r.interconnect_gbps, r.internode_gbps)  # fmt: skip
    props = torch.cuda.get_device_properties(0)
    name = props.name
    tflops, pcie, peer = next((v for key, v in KNOWN_GPUS.items() if key in name), UNKNOWN_GPU)
    return Rig(
        f"this machine ({name})",
        nodes or r.nodes,
        workers or gpus,
        cfg.launch.cpu_workers,
        r.gpu_memory_gib or props.total_memory / 2**30,
        host_gib,
        r.tflops or tflops,
        pcie,
        peer,
        r.internode_gbps,
    )


def job_rig(cfg: Config, gpus_per_node: int) -> Rig:
    """The nodes a SLURM job asks for (slurm.nodes of `gpus_per_node` GPUs, or of CPU workers), with
    the memory and speeds of the named rig; with rig=auto only the figures given as rig.* count (the
    login node is not the machine the job runs on), and memory not given is 0: unknown."""
    r = cfg.rig
    name = "the job's nodes" if r.name == "auto" else f"{r.name} nodes"
    tflops = r.tflops or (UNKNOWN_GPU[0] if gpus_per_node else CPU_WORKER_TFLOPS)
    return Rig(name, cfg.slurm.nodes, gpus_per_node, cfg.launch.cpu_workers, r.gpu_memory_gib, r.host_memory_gib,
               tflops, r.pcie_gbps, r.interconnect_gbps, r.internode_gbps)  # fmt: skip
