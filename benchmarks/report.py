"""What every benchmark records beside its numbers: the machine it ran on, and where results go."""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
from datetime import datetime
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    # Read from the installed metadata: importing bitsandbytes just for its version is slow and noisy.
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(**extra) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": package_version("bitsandbytes"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        # The workers run on CUDA (nccl) whenever they see a GPU, and on CPU (gloo) otherwise.
        "cuda_used": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        **extra,
    }


def machine_tag(machine: dict) -> str:
    device = f"{len(machine['gpus'])}gpu" if machine["cuda_used"] else f"{machine['cpu_cores']}cpu"
    return f"{machine['hostname']}-{device}"


def machine_busy_seconds() -> float:
    """CPU seconds the machine has spent busy so far, every process together, plus those a
    hypervisor gave to other guests (steal), which a VM's benchmark loses just the same
    (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    # Counts torchrun and, through it, its workers: each waits for its children before exiting.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def save_report(benchmark: str, report: dict, machine: dict, tag: str | None) -> Path:
    """Write benchmarks/results/<benchmark>-<tag>-<date>.json (tag: hostname and device by default)."""
    now = datetime.now()
    path = RESULTS_DIR / f"{benchmark}-{tag or machine_tag(machine)}-{now:%Y-%m-%d}.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    full = {"benchmark": benchmark, "date": now.isoformat(timespec="seconds"), "machine": machine, **report}
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path
