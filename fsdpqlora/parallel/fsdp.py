"""Processes, device mesh and FSDP2 sharding.

FSDP2's fully_shard has no sharding-strategy enum: the strategy names users know from FSDP1 map onto
its mesh and its reshard_after_forward. full_shard reshards after forward; shard_grad_op keeps the
gathered parameters until backward (reshard_after_forward=False, which is why the optimizer is built
right after sharding, before any forward: see train/optim.py); hybrid_shard shards inside a group and
replicates across groups (a 2-D mesh). no_shard is not FSDP: every rank holds a plain copy and only
the adapter's gradients are averaged (fsdpqlora/parallel/replicate.py), except with
shard.cpu_offload, whose host-memory offload is FSDP2's: then a 2-D mesh with shard groups of one.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from fsdpqlora.config import Config, ShardConfig, ShardStrategy
from fsdpqlora.parallel.process_group import Dist


def build_mesh(shard: ShardConfig, d: Dist) -> DeviceMesh:
    """A 1-D ("shard",) mesh for full_shard / shard_grad_op; a 2-D ("replicate", "shard") mesh for
    hybrid_shard and for no_shard with shard.cpu_offload (shard groups of one)."""
    group = shard.shard_group_size(d.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size)))
    if shard.strategy in (ShardStrategy.full_shard, ShardStrategy.shard_grad_op):
        return init_device_mesh(d.device.type, (d.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(d.device.type, (d.world_size // group, group), mesh_dim_names=("replicate", "shard"))


def shard_model(model: nn.Module, layers: nn.ModuleList, mesh: DeviceMesh, cfg: Config) -> None:
    """fully_shard every decoder layer, the embedding (unless it stays in host memory), the head,
    then the root (the final norm).

    The embedding is used once, at the start of forward (frozen, and nothing before it needs a
    gradient), and the head once, at its end: the chunked loss gathers it for all chunks and takes
    the hidden states' gradient there (fsdpqlora/model/loss.py), and the old whole-logits path only
    for forward and the logits' backward. So both are resharded after forward under every strategy,
    and neither stays whole for the step. A head tied to the embedding is one tensor, needed at both
    ends: it stays with the root. The root is left to FSDP2's rule for it, not resharded after
    forward: backward starts with the final norm (and a tied head), right after forward ends, so
    freeing it there would only add an all-gather."""
    from fsdpqlora.model.quant import to_dtype

    mp_policy = MixedPrecisionPolicy(param_dtype=to_dtype(cfg.quant.compute_dtype), reduce_dtype=torch.float32)
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cfg.shard.cpu_offload else OffloadPolicy()
    )
    policies = {"mesh": mesh, "mp_policy": mp_policy, "offload_policy": offload}
    reshard = cfg.shard.strategy != "shard_grad_op"
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard, **policies)
    causal_lm = model.get_base_model()
    embedding, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    if head.weight is not embedding.weight:
        if not cfg.shard.embedding_on_host:
            fully_shard(embedding, reshard_after_forward=True, **policies)
        fully_shard(head, reshard_after_forward=True, **policies)
    # shard.embedding_on_host: the table stays whole in host memory (fsdpqlora/model/host_embedding.py)
    ignored = {embedding.weight} if cfg.shard.embedding_on_host else None
    fully_shard(model, ignored_params=ignored, **policies)


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
    return row_range(target.shape[0], target.device_mesh.size(mesh_dim), target.device_mesh.get_coordinate()[mesh_dim])


def row_range(rows: int, shards: int, index: int) -> tuple[int, int]:
    """[start, stop) of the rows that shard `index` of `shards` holds when `rows` rows are split as
    torch.chunk splits them (FSDP2's layout): chunks of ceil(rows / shards) rows, the last one
    shorter, and shards past the last chunk empty."""
    chunk = -(-rows // shards)
    start = min(rows, index * chunk)
    return start, min(rows, start + chunk)


