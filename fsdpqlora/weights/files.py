"""Reading a checkpoint tensor by tensor from safetensors files (never pickle).

The safetensors header (a JSON table of name -> dtype, shape, byte range) is parsed here, so every
tensor's place is known before a byte of data is read, and a truncated or corrupted file is caught
by a header check that costs milliseconds. Data is then read with positioned reads (`pread`) into a
buffer per tensor: host memory holds only the tensors in flight, whatever the file size. A memory
map would do the same reads through page faults, but its touched pages stay in the process's RSS
until unmapped, and a file truncated under it kills the process with SIGBUS instead of raising.

Every problem with the files ends in one ModelFilesError naming the file and, where it applies, the
tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdpqlora.errors import ModelFilesError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A larger header is not a safetensors file (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
# Linux moves at most ~2 GiB per read call; an embedding of a 128k-vocabulary 70B model is larger.
READ_CHUNK_BYTES = 1 << 30

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and byte range in that file."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, in file order, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelFilesError(f"{path}: unreadable safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise ModelFilesError(f"{path}: unreadable safetensors file (header length {header_len} is impossible)")
            raw = f.read(header_len)
    except OSError as exc:
        raise ModelFilesError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFilesError(f"{path}: unreadable safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ModelFilesError(f"{path}: unreadable safetensors file (header is not a table)")
    data_start = 8 + header_len
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(n) for n in meta["shape"])
            begin, end = (int(n) for n in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFilesError(f"{path}: tensor {name} has an unreadable header entry {meta!r}") from None
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise ModelFilesError(f"{path}: tensor {name}: its byte range does not hold shape {list(shape)}")
        if data_start + end > size:
            raise ModelFilesError(
                f"{path}: tensor {name} ends at byte {data_start + end} but the file has {size} bytes (truncated?)"
            )
        entries.append(TensorEntry(name, path, dtype, shape, data_start + begin, end - begin))
    return sorted(entries, key=lambda e: e.offset)


def checkpoint_files(model_dir: Path) -> dict[str, list[str]]:
    """Map each safetensors file of the checkpoint to the tensor names the index puts in it."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelFilesError(f"{index_path}: not a valid safetensors index ({exc})") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not (model_dir / file).is_file():
                raise ModelFilesError(f"{model_dir / file}: named in {INDEX_FILE} but missing")
        return dict(sorted(files.items()))
    if (model_dir / SINGLE_FILE).is_file():
        return {SINGLE_FILE: [e.name for e in read_header(model_dir / SINGLE_FILE)]}
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelFilesError(
            f"{model_dir}: only pickle checkpoints (*.bin / *.pt) found; fsdpqlora reads safetensors only"
        )
    raise ModelFilesError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def checkpoint_entries(model_dir: Path) -> list[TensorEntry]:
    """Every tensor of the checkpoint, in the order the files hold them. Reads headers only, so it
    doubles as the check the launcher runs before any worker starts: every file the index names
    exists, parses, is as long as its header says, and holds the tensors the index promises."""
    entries = []
    for file, names in checkpoint_files(model_dir).items():
        path = model_dir / file
        in_file = {e.name: e for e in read_header(path)}
        missing = [name for name in names if name not in in_file]
        if missing:
            raise ModelFilesError(f"{path}: tensor {sorted(missing)[0]} is named in {INDEX_FILE} but not in the file")
        wanted = set(names)
        entries.extend(e for e in in_file.values() if e.name in wanted)
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor read from disk into a new CPU tensor (positioned reads; the GIL is released)."""
    out = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    try:
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            done = 0
            while done < entry.nbytes:
                n = os.preadv(fd, [view[done : done + READ_CHUNK_BYTES]], entry.offset + done)
                if n == 0:
                    raise ModelFilesError(f"{entry.path}: tensor {entry.name} cannot be read (file ends early)")
                done += n
        finally:
            os.close(fd)
    except OSError as exc:
        raise ModelFilesError(f"{entry.path}: tensor {entry.name} cannot be read ({exc.strerror})") from None
    return out.view(entry.dtype).reshape(entry.shape)


def stream_tensors(entries: list[TensorEntry], workers: int) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Yield (entry, tensor) in order, with up to `workers` reads running ahead in threads, so disk
    reads overlap the quantization of the previous tensor. Host memory holds at most `workers`
    + 1 tensors of this stream at a time."""
    if workers <= 1:
        for entry in entries:
            yield entry, read_tensor(entry)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsdpqlora-read") as pool:
        pending = deque()
        upcoming = iter(entries)
        for entry in upcoming:
            pending.append((entry, pool.submit(read_tensor, entry)))
            if len(pending) == workers:
                break
        while pending:
            entry, future = pending.popleft()
            tensor = future.result()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(read_tensor, following)))
            yield entry, tensor
            del tensor


SAFETENSORS_DTYPES = {dtype: name for name, dtype in DTYPES.items()}


class StreamingShardWriter:
    """Writes one safetensors file tensor by tensor, holding none of them: the data goes to disk as
    each tensor arrives, after room reserved for the header, which is written last into that room
    (padded with spaces, as the format allows) once every offset is known. The caller reserves
    enough: `header_room(names)` for the names it will add."""

    def __init__(self, path: Path, header_bytes: int):
        self.path = path
        self.header_bytes = header_bytes
        self.header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        self.written = 0
        self.file = open(path, "wb")
        self.file.seek(8 + header_bytes)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.written, self.written + data.nbytes],
        }
        self.written += data.nbytes

    def close(self) -> int:
        """Write the header; returns the file's size."""
        header = json.dumps(self.header, separators=(",", ":")).encode()
        if len(header) > self.header_bytes:
            raise RuntimeError(f"{self.path}: header of {len(header)} bytes exceeds the {self.header_bytes} reserved")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.header_bytes) + header + b" " * (self.header_bytes - len(header)))
        self.file.close()
        return 8 + self.header_bytes + self.written

    def abort(self) -> None:
        self.file.close()


def header_room(names: list[str]) -> int:
    """Bytes that hold the header entries of tensors with these names, whatever their shapes and
    offsets (4 dimensions and offsets of up to 20 digits each), rounded up to 8 bytes so that the
    data starts aligned."""
    per_tensor = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},') + 4 * 21 + 2 * 20
    room = 64 + sum(len(json.dumps(name)) + per_tensor for name in names)
    return -(-room // 8) * 8
