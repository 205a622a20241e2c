"""A checkpoint's tensors grouped by the model tensor each fills (a `Unit`), the quantization of a
4-bit unit's weight as training holds it, and the checks every tensor read passes. The streaming
loader (load.py) and `fsdpqlora merge` both work unit by unit through this API."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import QuantState
from torch import nn

from fsdpqlora.config import Config
from fsdpqlora.errors import ModelFilesError
from fsdpqlora.model import quant
from fsdpqlora.model.families import Family, module_name_of
from fsdpqlora.weights.files import TensorEntry


def quant_state_suffixes(quant_type: str, nested: bool = True) -> tuple[str, ...]:
    """The tensors a 4-bit weight's quantization state is saved as, each named WEIGHT.SUFFIX, in the
    order bitsandbytes' QuantState.as_dict(packed=True) gives them: the block scales, the code book,
    with double quantization (`nested`) the scales' own scales and code book, and one packed tensor
    holding the non-tensor fields, named after the quant_type ("nf4" or "fp4")."""
    nested_names = ("nested_absmax", "nested_quant_map") if nested else ()
    return ("absmax", "quant_map", *nested_names, f"quant_state.bitsandbytes__{quant_type}")


# Every suffix a 4-bit weight's state may carry in a checkpoint saved by transformers with bitsandbytes.
QUANT_STATE_SUFFIXES = tuple(dict.fromkeys(s for quant_type in ("nf4", "fp4") for s in quant_state_suffixes(quant_type)))


@dataclass
class Unit:
    """One parameter or buffer of the model and the checkpoint tensors that fill it."""

    module: nn.Module
    attr: str
    entries: list[TensorEntry] = field(default_factory=list)
    # Set when only this rank's rows [start, stop) of a 16-bit tensor are read (see _own_rows_only).
    rows: tuple[int, int] | None = None

    @property
    def is_4bit(self) -> bool:
        return isinstance(self.module, bnb.nn.Linear4bit) and self.attr == "weight"


def plan_units(
    entries: list[TensorEntry], targets: dict[str, tuple[nn.Module, str]], family: Family, model_dir: Path
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


def quantized_weight(unit: Unit, tensors: dict[str, torch.Tensor], cfg: Config, device: torch.device):
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


def _prequantized(unit: Unit, tensors: dict[str, torch.Tensor], cfg: Config, device: torch.device):
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
