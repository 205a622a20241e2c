"""The process group: one process per GPU (or CPU worker), joined under torchrun, and the few
collectives on Python scalars that the launcher's checks and the training loop need."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fsdpqlora.compat import attempt_store
from fsdpqlora.config import LaunchConfig
from fsdpqlora.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def worker_device(launch: LaunchConfig, local_rank: int, visible_gpus: int) -> torch.device:
    """The device of the worker with this local rank: its own GPU (cuda:LOCAL_RANK) when the workers
    use GPUs (launch.device), else the CPU. Two workers on one GPU are refused: NCCL does not run two
    ranks on one device."""
    if not launch.uses_cuda(visible_gpus):
        return torch.device("cpu")
    if local_rank >= visible_gpus:
        raise ConfigError(
            f"launch.device={launch.device.value!r}: worker {local_rank} of this node has no GPU of its own "
            f"({visible_gpus} visible, one per worker); start at most {visible_gpus} workers per node, "
            "or run the workers on CPU with launch.device=cpu"
        )
    return torch.device("cuda", local_rank)


def init_distributed(launch: LaunchConfig | None = None, timeout_minutes: int = 30) -> Dist:
    """Join the torchrun process group: nccl on CUDA, gloo on CPU (launch.device; by default CUDA
    wherever a GPU is visible). A plain `python` run is a group of one, so the same code path serves both."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = worker_device(launch or LaunchConfig(), local_rank, torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # With CPU offload, the adapter's gather (saving it) runs on CPU tensors.
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = attempt_store(world_size, timeout)
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank, world_size=world_size)
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    return _all_reduce(value, device, dist.ReduceOp.SUM)


def all_reduce_max(value: float | int, device: torch.device) -> float:
    return _all_reduce(value, device, dist.ReduceOp.MAX)


def _all_reduce(value: float | int, device: torch.device, op) -> float:
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.item()


def on_rank0(fn):
    """Run fn() on rank 0 only (building a cached asset, a download) and hand its result to every
    rank. A UserError raised there is raised on every rank, so none is left waiting."""
    from fsdpqlora.errors import UserError

    outcome: list = [None, None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = fn()
        except UserError as exc:
            outcome[1] = exc
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        outcome[1].agreed = True  # every rank raises it; rank 0 prints it
        raise outcome[1]
    return outcome[0]


def agree(d: Dist, sums: list, maxes: list) -> list[float]:
    """Sums and maxima over ranks of a few scalars (numbers or 0-d tensors), in one all-gather:
    an all-reduce takes a single operation, and one collective per step is cheaper than one per
    value. Every rank adds the gathered values in rank order, so all get the same sums."""
    local = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=d.device) for v in [*sums, *maxes]])
    gathered = [torch.empty_like(local) for _ in range(d.world_size)]
    dist.all_gather(gathered, local)
    table = torch.stack(gathered)
    n = len(sums)
    return table[:, :n].sum(dim=0).tolist() + table[:, n:].amax(dim=0).tolist()
