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

import ctypes
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from bitsandbytes.functional import QuantState
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from fsdpqlora import quant, weights
from fsdpqlora.distributed import Dist, copy_into_shard, local_rows
from fsdpqlora.errors import ModelFilesError
from fsdpqlora.families import Family, module_name_of
from fsdpqlora.metrics import peak_host_rss_gib

# Tensors a 4-bit layer's weight carries in a checkpoint saved by transformers with bitsandbytes.
QUANT_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                        "quant_state.bitsandbytes__fp4")  # fmt: skip


@dataclass
class Unit:
    """One parameter or buffer of the model and the checkpoint tensors that fill it."""

    module: nn.Module
    attr: str
    entries: list[weights.TensorEntry] = field(default_factory=list)
    # Set when only this rank's rows [start, stop) of a 16-bit tensor are read (see _own_rows_only).
    rows: tuple[int, int] | None = None

    @property
    def is_4bit(self) -> bool:
        return isinstance(self.module, bnb.nn.Linear4bit) and self.attr == "weight"


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


def resolve_mode(cfg: DictConfig, d: Dist) -> str:
    if cfg.model.load_mode != "auto":
        return cfg.model.load_mode
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    return "every_rank" if local_world == d.world_size else "rank0_broadcast"


def plan_units(
    entries: list[weights.TensorEntry], targets: dict[str, tuple[nn.Module, str]], family: Family, model_dir: Path
) -> list[Unit]:
    """Group the checkpoint's tensors by the model tensor they fill, in the order of the files."""
    units: dict[str, Unit] = {}
    for entry in entries:
        name = module_name_of(entry.name, family)
        if name in targets:
            units.setdefault(name, Unit(*targets[name])).entries.append(entry)
            continue
        owner = _quant_state_owner(name)
        if owner in targets and isinstance(targets[owner][0], bnb.nn.Linear4bit):
            units.setdefault(owner, Unit(*targets[owner])).entries.append(entry)
            continue
        if name.endswith("rotary_emb.inv_freq"):  # old exports saved this recomputed table
            continue
        raise ModelFilesError(f"{entry.path}: tensor {entry.name} is not part of the model its config.json describes")
    # Checked before a byte is read: a tied head shares the embedding's tensor, so it counts as filled.
    filled = {id(getattr(unit.module, unit.attr)) for unit in units.values()}
    for name, (module, attr) in targets.items():
        if attr in module._parameters and id(getattr(module, attr)) not in filled:
            raise ModelFilesError(f"{model_dir}: the checkpoint lacks tensor {name}, which the model needs")
    return list(units.values())


def _quant_state_owner(name: str) -> str | None:
    for suffix in QUANT_STATE_SUFFIXES:
        if name.endswith(".weight." + suffix):
            return name[: -len(suffix) - 1]
    return None


class HostMemory:
    """Keeps host RSS at what the loaded shards hold, with glibc's allocator.

    Transient buffers (each tensor read, its quantized copy) are freed after every unit, but glibc
    keeps freed heap memory resident for reuse, and places new blocks into free heap space first:
    the space FSDP leaves when it re-pads the shards that `to_empty` allocated (0.6 GiB for a 1B
    model), then whatever earlier tensors left. Measured on a 1B Llama, RSS grew by 0.7 GiB over
    the load that way, with the model. So blocks from 1 MiB up are mapped on their own while
    loading (returned to the system when freed) and free heap pages are released after each unit
    (malloc_trim, a few milliseconds). Elsewhere than glibc this does nothing."""

    M_MMAP_THRESHOLD = -3

    def __init__(self):
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt, self.libc.malloc_trim  # noqa: B018 (glibc has both)
        except (OSError, AttributeError):
            self.libc = None

    def __enter__(self):
        if self.libc:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 1 << 20)
        return self

    def release(self) -> None:
        if self.libc:
            self.libc.malloc_trim(0)

    def __exit__(self, *exc):
        if self.libc:
            # Where glibc's own adaptive threshold ends up for a process that frees large blocks.
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 32 << 20)
            self.libc.malloc_trim(0)


@torch.no_grad()
def load_weights(units: list[Unit], cfg: DictConfig, d: Dist, mode: str, show_progress: bool) -> LoadStats:
    """Fill every unit's (sharded, materialized) tensor from the checkpoint."""
    with HostMemory() as host_memory:
        return _load_weights(units, cfg, d, mode, show_progress, host_memory)


def _load_weights(units: list[Unit], cfg: DictConfig, d: Dist, mode: str, show_progress: bool, host_memory: HostMemory) -> LoadStats:
    start = time.perf_counter()
    stats = LoadStats(mode=mode)
    if mode == "every_rank":
        for unit in units:
            _own_rows_only(unit)
    flat = [entry for unit in units for entry in unit.entries]
    total_bytes = sum(e.nbytes for e in flat)
    stream = (
        _received(flat, cfg, d) if mode == "rank0_broadcast" else weights.stream_tensors(flat, cfg.model.load_workers)
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


def _received(entries: list[weights.TensorEntry], cfg: DictConfig, d: Dist):
    """Rank 0 reads each tensor and broadcasts it; the others receive it into a fresh buffer. Rank
    0 first broadcasts whether the read worked, so a bad file ends every rank with the same error
    instead of leaving the others waiting for a tensor that never comes."""
    # Over NCCL the bytes travel between GPUs; over gloo, between host buffers.
    device = d.device if dist.get_backend() != "gloo" else torch.device("cpu")
    reads = weights.stream_tensors(entries, cfg.model.load_workers) if d.is_main else None
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


def _fill(unit: Unit, tensors: dict[str, torch.Tensor], cfg: DictConfig, device: torch.device) -> None:
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
    # FSDP2 replaces the parameter with a plain sharded one; the layer's own quant_state is where
    # bitsandbytes looks for it after each all-gather.
    unit.module.quant_state = quant_state
    copy_into_shard(target, packed)


def quantized_weight(unit: Unit, tensors: dict[str, torch.Tensor], cfg: DictConfig, device: torch.device):
    """The packed bytes and quantization state of a 4-bit unit, as training holds them: those of a
    pre-quantized checkpoint as saved, or the checkpoint's weight, in model.dtype, quantized."""
    if len(tensors) > 1:
        return _prequantized(unit, tensors, cfg, device)
    main_name, path = unit.entries[0].name, unit.entries[0].path
    main = tensors[main_name]
    check_shape(path, main_name, tuple(main.shape), (unit.module.out_features, unit.module.in_features))
    check_finite(path, main_name, main)
    return quant.quantize(main.to(quant.to_dtype(cfg.model.dtype)), cfg.quant, device)


def prequantized_weight_name(unit: Unit) -> str:
    """The packed weight's name among a pre-quantized unit's tensors (the others are its state)."""
    return next(e.name for e in unit.entries if _quant_state_owner(e.name) is None)


def _prequantized(unit: Unit, tensors: dict[str, torch.Tensor], cfg: DictConfig, device: torch.device):
    weight_name = prequantized_weight_name(unit)
    path = unit.entries[0].path
    packed = tensors.pop(weight_name)
    expected = unit.module.out_features * unit.module.in_features // 2
    if packed.numel() * packed.element_size() != expected:
        raise ModelFilesError(
            f"{path}: tensor {weight_name} holds {packed.numel() * packed.element_size()} packed bytes but the "
            f"model's config.json implies {expected}"
        )
    try:
        quant_state = QuantState.from_dict({name.rsplit(".weight.", 1)[1]: t for name, t in tensors.items()}, device)
    except (ValueError, KeyError, AssertionError) as exc:
        raise ModelFilesError(f"{path}: tensor {weight_name}: unusable 4-bit quantization state ({exc})") from None
    # The same bytes whatever the storage dtype they were saved in: reinterpret, never convert.
    storage = quant.to_dtype(cfg.quant.storage_dtype)
    return packed.contiguous().view(torch.uint8).view(storage).reshape(-1, 1), quant_state


def check_shape(path: Path, name: str, got: tuple, expected: tuple) -> None:
    if got != expected:
        raise ModelFilesError(
            f"{path}: tensor {name} has shape {list(got)} but the model's config.json implies {list(expected)}"
        )


def check_finite(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Corrupted bytes in a 16-bit checkpoint almost always decode to some inf or NaN."""
    if not torch.isfinite(tensor).all():
        raise ModelFilesError(f"{path}: tensor {name} contains NaN or inf values (a corrupted file?)")
