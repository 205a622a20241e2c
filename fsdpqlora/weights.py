"""Reading a checkpoint tensor by tensor from safetensors files (memory-mapped, never pickle).

Every problem with the files ends in one ModelFilesError naming the file and, where it applies, the
tensor: a missing shard named in the index, a truncated or corrupted file, an index that is not JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fsdpqlora.errors import ModelFilesError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(model_dir: Path) -> dict[str, list[str]]:
    """Map each safetensors file of the checkpoint to the tensor names it holds, in file order."""
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
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with _open(single) as f:
            return {SINGLE_FILE: list(f.keys())}
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelFilesError(f"{model_dir}: only pickle checkpoints (*.bin / *.pt) found; fsdpqlora reads safetensors only")
    raise ModelFilesError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelFilesError(f"{path}: unreadable safetensors file ({exc})") from None


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of the checkpoint, one at a time, memory-mapped."""
    for file, names in checkpoint_files(model_dir).items():
        path = model_dir / file
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ModelFilesError(f"{path}: tensor {name} is named in {INDEX_FILE} but not in the file")
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as exc:
                    raise ModelFilesError(f"{path}: tensor {name} cannot be read ({exc})") from None
                yield name, tensor


def check_checkpoint(model_dir: Path) -> None:
    """Cheap checks before any worker starts: every file the index names exists, and every file's
    header parses (which catches truncated downloads) and lists the tensors the index promises."""
    for file, names in checkpoint_files(model_dir).items():
        path = model_dir / file
        with _open(path) as f:
            missing = set(names) - set(f.keys())
        if missing:
            raise ModelFilesError(f"{path}: tensor {sorted(missing)[0]} is named in {INDEX_FILE} but not in the file")
