"""Streaming a checkpoint into the sharded 4-bit model: tensor by tensor, each rank keeping only its
shards, so host memory stays a small multiple of the largest tensor whatever the model's size.

Two ways to get the bytes (`model.load_mode`):
- every_rank: each rank reads the files itself. On one machine the ranks share the page cache, so
  the disk is read once and nothing crosses the interconnect; the default on a single node. Of a
  tensor kept in 16 bits (embedding, head, norms) each rank reads only the rows it keeps.
- rank0_broadcast: rank 0 reads and broadcasts each tensor; the default across nodes, where one
  reader of a shared file system beats one per GPU. (The other ranks still read config.json and
  the few-kilobyte safetensors headers.)
Either way every rank then quantizes the full tensor on its own device (bitsandbytes is
deterministic, so the quantization state, which every rank needs whole, is identical everywhere)
and keeps its shard of the packed bytes. A pre-quantized checkpoint's packed bytes and state are
taken as they are.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fsdpqlora.compat import set_quant_state
from fsdpqlora.config import Config
from fsdpqlora.errors import ModelFilesError
from fsdpqlora.memory import peak_host_rss_gib
from fsdpqlora.parallel.fsdp import copy_into_shard, local_rows
from fsdpqlora.parallel.process_group import Dist
from fsdpqlora.weights.files import TensorEntry, stream_tensors
from fsdpqlora.weights.host_memory import HostMemory
from fsdpqlora.weights.units import Unit, check_finite, check_shape, quantized_weight


@dataclass
class LoadStats:
    seconds: float = 0.0
    bytes_read: int = 0
    tensors: int = 0
    mode: str = ""


def summary(stats: LoadStats, total_seconds: float, d: Dist, model_dir: Path) -> str:
    """The loading summary (a collective: call on every rank; rank 0 prints it)."""
    per_rank = [None] * d.world_size
    device_peak = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
    dist.all_gather_object(per_rank, (peak_host_rss_gib(), device_peak))
    line = (
        f"[fsdpqlora] loaded {model_dir} in {total_seconds:.1f}s ({stats.seconds:.1f}s reading and quantizing "
        f"{stats.tensors} tensors, {stats.bytes_read / 2**30:.2f} GiB, {stats.mode})\n"
        "[fsdpqlora] peak host RSS per rank after loading: " + ", ".join(f"{rss:.2f} GiB" for rss, _ in per_rank)
    )
    if device_peak is not None:
        line += "\n[fsdpqlora] peak GPU memory per rank after loading: " + ", ".join(
            f"{g:.2f} GiB" for _, g in per_rank
        )
    return line


def resolve_mode(cfg: Config, d: Dist) -> str:
    if cfg.model.load_mode != "auto":
        return cfg.model.load_mode
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    return "every_rank" if local_world == d.world_size else "rank0_broadcast"


@torch.no_grad()
def load_weights(units: list[Unit], cfg: Config, d: Dist, mode: str, show_progress: bool) -> LoadStats:
    """Fill every unit's (sharded, materialized) tensor from the checkpoint."""
    with HostMemory() as host_memory:
        return _load_weights(units, cfg, d, mode, show_progress, host_memory)


def _load_weights(units: list[Unit], cfg: Config, d: Dist, mode: str, show_progress: bool, host_memory: HostMemory) -> LoadStats:
    start = time.perf_counter()
    stats = LoadStats(mode=mode)
    if mode == "every_rank":
        for unit in units:
            _own_rows_only(unit)
    flat = [entry for unit in units for entry in unit.entries]
    total_bytes = sum(e.nbytes for e in flat)
    stream = (
        _received(flat, cfg, d) if mode == "rank0_broadcast" else stream_tensors(flat, cfg.model.load_workers)
    )
    with tqdm(total=total_bytes, desc="load", unit="B", unit_scale=True, unit_divisor=1024,
              disable=not show_progress, dynamic_ncols=True) as bar:  # fmt: skip
        for unit in units:
            tensors = {}
            for _ in unit.entries:
                entry, tensor = next(stream)
                tensors[entry.name] = tensor
                stats.bytes_read += entry.nbytes
                bar.update(entry.nbytes)
            _fill(unit, tensors, cfg, d.device)
            stats.tensors += len(tensors)
            del tensors
            host_memory.release()
    stats.seconds = time.perf_counter() - start
    return stats


def _own_rows_only(unit: Unit) -> None:
    """Make a 16-bit tensor sharded by rows read only this rank's rows, a contiguous byte range of
    the file. The embedding and the head, a model's largest tensors (2 GiB each in Llama-3.1-70B),
    then cost each rank 1/world of their size in reads and host memory. 4-bit weights are read
    whole: their quantization state depends on every value."""
    target = getattr(unit.module, unit.attr)
    rows = local_rows(target)
    if unit.is_4bit or len(unit.entries) != 1 or rows is None:
        return
    entry = unit.entries[0]
    check_shape(entry.path, entry.name, entry.shape, tuple(target.shape))
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
    start, stop = rows
    unit.rows = rows
    unit.entries = [
        dataclasses.replace(
            entry,
            shape=(stop - start, *entry.shape[1:]),
            offset=entry.offset + start * row_bytes,
            nbytes=(stop - start) * row_bytes,
        )
    ]


def _received(entries: list[TensorEntry], cfg: Config, d: Dist):
    """Rank 0 reads each tensor and broadcasts it; the others receive it into a fresh buffer. Rank
    0 first broadcasts whether the read worked, so a bad file ends every rank with the same error
    instead of leaving the others waiting for a tensor that never comes."""
    # Over NCCL the bytes travel between GPUs; over gloo, between host buffers.
    device = d.device if dist.get_backend() != "gloo" else torch.device("cpu")
    reads = stream_tensors(entries, cfg.model.load_workers) if d.is_main else None
    for entry in entries:
        status = [None]
        if d.is_main:
            try:
                _, tensor = next(reads)
                tensor = tensor.to(device)
            except ModelFilesError as exc:
                status = [str(exc)]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise ModelFilesError(status[0])
        if not d.is_main:
            tensor = torch.empty(entry.shape, dtype=entry.dtype, device=device)
        # Broadcast raw bytes: every dtype travels, and bf16 NaN patterns stay untouched.
        dist.broadcast(tensor.view(-1).view(torch.uint8), src=0)
        yield entry, tensor


def _fill(unit: Unit, tensors: dict[str, torch.Tensor], cfg: Config, device: torch.device) -> None:
    target = getattr(unit.module, unit.attr)
    main_name = unit.entries[0].name
    main = tensors[main_name]
    path = unit.entries[0].path
    if unit.rows is not None:  # this rank's rows only, their shape checked before reading
        if main.is_floating_point():
            check_finite(path, main_name, main)
        local = target.to_local()
        if local.shape != main.shape:  # copy_ would broadcast silently
            raise RuntimeError(f"{main_name}: rows {unit.rows} read as {tuple(main.shape)}, shard is {tuple(local.shape)}")
        local.copy_(main.to(target.dtype))
        return
    if unit.is_4bit:
        packed, quant_state = quantized_weight(unit, tensors, cfg, device)
    else:
        check_shape(path, main_name, tuple(main.shape), tuple(target.shape))
        if main.is_floating_point():
            check_finite(path, main_name, main)
        copy_into_shard(target, main.to(target.dtype))
        return
    set_quant_state(unit.module, quant_state)
    copy_into_shard(target, packed)


