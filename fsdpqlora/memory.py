"""What a process holds: its peak host RSS (also since a reset), and peak memory on its device."""

from __future__ import annotations

import resource

import torch


def peak_host_rss_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_host_rss() -> float:
    """Reset the kernel's record of this process's peak RSS (VmHWM) to its current RSS, which is
    returned (GiB), so that a later peak is that of the work since, not of the whole process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the whole process
        pass
    return _proc_status_gib("VmRSS")


def peak_host_rss_since_reset_gib() -> float:
    """Peak RSS since `reset_peak_host_rss` (the whole process's where /proc is missing)."""
    return _proc_status_gib("VmHWM") or peak_host_rss_gib()


def _proc_status_gib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return 0.0


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_host_rss_gib()
