"""Processes, device mesh and FSDP2 sharding.

Strategy names users know map onto FSDP2 (DESIGN.md section 3): full_shard reshards after forward,
shard_grad_op keeps the gathered parameters until backward, hybrid_shard shards inside a group and
replicates across groups (a 2-D mesh), no_shard replicates everywhere (a 2-D mesh with shard size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

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


def init_distributed(timeout_minutes: int = 30) -> Dist:
    """Join the torchrun process group: nccl on CUDA, gloo on CPU. A plain `python` run is a group
    of one, so the same code path serves both."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # With CPU offload, gradient-norm and adapter-gather collectives run on CPU tensors.
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = timedelta(minutes=timeout_minutes)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = _attempt_store(world_size, timeout)
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank, world_size=world_size)
    return Dist(dist.get_rank(), local_rank, dist.get_world_size(), device)


def _attempt_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """torchrun's workers share its agent's key-value store. After a restart (--max-restarts) the
    previous attempt's keys are still in it, and gloo then tries to connect to the dead workers'
    addresses they hold; so each attempt gets a key prefix of its own. None outside torchrun, and
    where the agent gives every attempt a store of its own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    as the launcher does: across nodes the restart counts of plain torchrun's agents can differ)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"fsdpqlora/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mesh(cfg: DictConfig, d: Dist) -> DeviceMesh:
    """A 1-D ("shard",) mesh for full_shard / shard_grad_op; a 2-D ("replicate", "shard") mesh for
    hybrid_shard and no_shard."""
    strategy = cfg.shard.strategy
    if strategy in ("full_shard", "shard_grad_op"):
        return init_device_mesh(d.device.type, (d.world_size,), mesh_dim_names=("shard",))
    if strategy == "no_shard":
        shard_size = 1
    else:
        shard_size = cfg.shard.hybrid_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    if d.world_size % shard_size:
        raise ConfigError(
            f"shard.hybrid_shard_size={shard_size}: must divide the world size {d.world_size}"
        )
    return init_device_mesh(
        d.device.type, (d.world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
    )


def shard_model(model: nn.Module, layers: nn.ModuleList, mesh: DeviceMesh, cfg: DictConfig) -> None:
    """fully_shard every decoder layer, then the root (embeddings, final norm, head)."""
    from fsdpqlora.quant import to_dtype

    mp_policy = MixedPrecisionPolicy(param_dtype=to_dtype(cfg.quant.compute_dtype), reduce_dtype=torch.float32)
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.shard.cpu_offload else OffloadPolicy()
    )
    reshard = cfg.shard.strategy != "shard_grad_op"
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)


@torch.no_grad()
def copy_into_shard(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor `full` into `target`, a sharded DTensor parameter
    (or a plain tensor, for unsharded runs and buffers). Every rank passes the same full tensor;
    no communication happens."""
    if isinstance(target, DTensor):
        local = full
        mesh = target.device_mesh
        coordinate = mesh.get_coordinate()
        for mesh_dim, placement in enumerate(target.placements):
            if isinstance(placement, Shard):
                # FSDP2's chunking: torch.chunk, ranks past the last chunk hold an empty shard.
                chunks = torch.chunk(local, mesh.size(mesh_dim), dim=placement.dim)
                index = coordinate[mesh_dim]
                local = chunks[index] if index < len(chunks) else local.narrow(placement.dim, 0, 0)
        target_local = target.to_local()
        if target_local.shape != local.shape:  # copy_ would broadcast silently
            raise RuntimeError(f"shard shape {tuple(local.shape)} != local parameter shape {tuple(target_local.shape)}")
        target_local.copy_(local)
    else:
        target.copy_(full)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded DTensor; a plain tensor as it is."""
    return param.to_local() if isinstance(param, DTensor) else param


def local_rows(target: torch.Tensor) -> tuple[int, int] | None:
    """[start, stop) of the rows of `target` this rank holds, for a DTensor sharded by rows over one
    mesh dimension (FSDP2's layout: torch.chunk, ranks past the last chunk hold none); None for a
    plain tensor or any other layout."""
    if not isinstance(target, DTensor):
        return None
    shards = [(mesh_dim, p) for mesh_dim, p in enumerate(target.placements) if isinstance(p, Shard)]
    if len(shards) != 1 or shards[0][1].dim != 0:
        return None
    mesh_dim = shards[0][0]
    rows = target.shape[0]
    chunk = -(-rows // target.device_mesh.size(mesh_dim))
    start = min(rows, target.device_mesh.get_coordinate()[mesh_dim] * chunk)
    return start, min(rows, start + chunk)


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
        raise outcome[1]
    return outcome[0]
