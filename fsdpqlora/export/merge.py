"""`fsdpqlora merge PATH OUT`: the adapter merged into its base, written as a Hugging Face model
directory that transformers loads without peft or bitsandbytes.

By default the adapter is merged into the weights training actually saw: each full-precision
weight quantized with the run's settings (bitsandbytes, on CPU), then dequantized, exactly as the
4-bit layers computed with it; `--from-original` merges into the original weights instead and
reports how far that model is from the trained one. LoRA adds scaling * B @ A; DoRA rescales each
output row of W + scaling * B @ A to its learned magnitude (peft's merge).

The work is streamed: the checkpoint is read one tensor at a time (the loader's planning, reads
and checks), each tensor is merged and written to its output shard at once, so host memory holds
a few copies of the largest tensor whatever the model's size. Everything is written into a
temporary directory renamed to OUT only when complete: OUT is either absent or a whole model.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft.utils.other import get_pattern_key
from tqdm import tqdm

from fsdpqlora import atomic, weights
from fsdpqlora.config import Config, QuantConfig, QuantType, to_yaml
from fsdpqlora.errors import ConfigError, ModelFilesError, exit_on_user_error
from fsdpqlora.export.locate import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_CONFIG_COPY, TOKENIZER_CONFIG, Trained, locate
from fsdpqlora.memory import peak_host_rss_since_reset_gib, reset_peak_host_rss
from fsdpqlora.model import quant
from fsdpqlora.model.directory import check_prequantized, load_hf_config, prequantized_config
from fsdpqlora.model.families import family_of
from fsdpqlora.model.skeleton import build_skeleton, checkpoint_targets

OUT_DTYPES = ("bfloat16", "float16", "float32")
# Files of a model directory that belong to its tokenizer and generation settings (the tokenizer is
# then saved over them, carrying the chat template training used).
COPIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                "chat_template.*", "generation_config.json")  # fmt: skip
ADAPTER_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
REQUANTIZED_TYPE = QuantType.nf4  # the quant_type --requantize writes, whatever the run trained with


@dataclass
class Adapter:
    """An adapter's settings and where each module's tensors lie (read when that module is merged)."""

    path: Path
    use_dora: bool
    alpha: float
    alpha_pattern: dict
    use_rslora: bool
    modules: dict[str, dict[str, weights.TensorEntry]]

    def scaling(self, module: str, rank: int) -> float:
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), module), self.alpha)
        return alpha / rank**0.5 if self.use_rslora else alpha / rank


def read_adapter(adapter_dir: Path) -> Adapter:
    """The adapter's config and tensor table (headers only); refuses what a merge cannot express."""
    config_file = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFilesError(f"{config_file}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise ModelFilesError(f"{config_file}: peft_type {config.get('peft_type')!r}; only LoRA and DoRA adapters merge")
    unsupported = {
        "fan_in_fan_out": config.get("fan_in_fan_out"),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": config.get("lora_bias"),
        "modules_to_save": config.get("modules_to_save"),
        "trainable_token_indices": config.get("trainable_token_indices"),
        "layer_replication": config.get("layer_replication"),
        "target_parameters": config.get("target_parameters"),
    }
    for key, value in unsupported.items():
        if value:
            raise ModelFilesError(f"{config_file}: {key}={config[key]!r} is not supported by fsdpqlora merge")
    modules: dict[str, dict[str, weights.TensorEntry]] = {}
    for entry in weights.read_header(adapter_dir / ADAPTER_WEIGHTS):
        match = ADAPTER_KEY.match(entry.name)
        if match is None:
            raise ModelFilesError(f"{entry.path}: tensor {entry.name} is not a LoRA or DoRA weight fsdpqlora can merge")
        module, kind = match.groups()
        modules.setdefault(module, {})[kind.split(".")[0]] = entry
    for module, parts in modules.items():
        wanted = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if config.get("use_dora") else set())
        if set(parts) != wanted:
            missing = sorted(wanted - set(parts)) or sorted(set(parts) - wanted)
            raise ModelFilesError(f"{adapter_dir / ADAPTER_WEIGHTS}: module {module}: {missing[0]} is missing or unexpected")
    if not modules:
        raise ModelFilesError(f"{adapter_dir / ADAPTER_WEIGHTS}: holds no adapter tensors")
    return Adapter(adapter_dir, bool(config.get("use_dora")), float(config["lora_alpha"]), config.get("alpha_pattern") or {},
                   bool(config.get("use_rslora")), modules)  # fmt: skip


@dataclass
class Item:
    """One output tensor (or 4-bit weight with its state): the unit it comes from, its name, the
    adapter module merged into it, whether it is written re-quantized."""

    unit: weights.Unit
    name: str
    lora: str | None
    requantize: bool
    nbytes: int

    def names(self) -> list[str]:
        state = weights.quant_state_suffixes(REQUANTIZED_TYPE) if self.requantize else ()
        return [self.name, *(f"{self.name}.{s}" for s in state)]


@dataclass
class Difference:
    """How far the merge into the original weights is from the merge into the NF4 weights."""

    max_4bit: float = 0.0
    max_4bit_name: str = ""
    sum_4bit: float = 0.0
    numel_4bit: int = 0
    max_other: float = 0.0

    def add(self, name: str, diff: torch.Tensor, is_4bit: bool) -> None:
        largest = diff.abs().max().item() if diff.numel() else 0.0
        if is_4bit:
            self.sum_4bit += diff.abs().sum(dtype=torch.float64).item()
            self.numel_4bit += diff.numel()
            if largest > self.max_4bit or not self.max_4bit_name:
                self.max_4bit, self.max_4bit_name = largest, name
        else:
            self.max_other = max(self.max_other, largest)

    @property
    def mean_4bit(self) -> float:
        return self.sum_4bit / max(self.numel_4bit, 1)


@dataclass
class MergeSummary:
    out_dir: Path
    seconds: float
    bytes_written: int
    tensors: int
    adapted: int
    peak_rss_gib: float
    rss_growth_gib: float
    difference: Difference | None = None
    files: list[str] = field(default_factory=list)

    def lines(self, trained: Trained, from_original: bool) -> list[str]:
        into = "the original weights" if from_original else "the base weights as training saw them (4-bit, dequantized)"
        lines = [
            f"[fsdpqlora] merged {trained.adapter_dir} into {into} of {trained.model_dir}",
            f"[fsdpqlora] {self.tensors} tensors ({self.adapted} adapted) in {self.seconds:.1f}s, "
            f"{self.bytes_written / 2**30:.2f} GiB written in {len(self.files)} file{'s' * (len(self.files) != 1)}, peak host RSS "
            f"{self.peak_rss_gib:.2f} GiB ({self.rss_growth_gib * 1024:.0f} MiB above the start)",
        ]
        if self.difference is not None:
            d = self.difference
            lines.append(
                f"[fsdpqlora] difference from the merge into the 4-bit weights training saw (before the cast to the output "
                f"dtype): 4-bit weights max |d| {d.max_4bit:.6g} ({d.max_4bit_name}), mean |d| {d.mean_4bit:.6g}; "
                f"other tensors max |d| {d.max_other:.6g}"
            )
        lines.append(f"[fsdpqlora] merged model: {self.out_dir}")
        return lines


def merge(
    trained: Trained,
    out_dir: Path,
    dtype: str = "bfloat16",
    from_original: bool = False,
    requantize: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    show_progress: bool = True,
) -> MergeSummary:
    start = time.perf_counter()
    cfg, model_dir = trained.cfg, trained.model_dir
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists():
        raise ConfigError(f"{out_dir}: already exists; merge writes a new directory")
    hf_config = load_hf_config(model_dir, cfg.model.trust_remote_code)
    family = family_of(hf_config)
    check_prequantized(cfg, hf_config, model_dir)
    if from_original and prequantized_config(hf_config) is not None:
        raise ConfigError(f"--from-original: {model_dir} is saved in 4-bit; it has no original full-precision weights")
    skeleton = build_skeleton(hf_config, cfg.model, cfg.quant)
    units = weights.plan_units(weights.checkpoint_entries(model_dir), checkpoint_targets(skeleton), family, model_dir)
    adapter = read_adapter(trained.adapter_dir)
    module_names = {id(m): name for name, m in skeleton.named_modules()}
    items = _plan(units, module_names, adapter, family.mixture_of_experts, requantize, dtype)
    files = _assign_files(items, max_shard_bytes)

    start_rss = reset_peak_host_rss()  # what the process holds before the first tensor is read
    with atomic.building_dir(out_dir) as tmp:  # out_dir was refused above if it exists
        qcfg = replace(cfg.quant, quant_type=REQUANTIZED_TYPE) if requantize else None
        written, difference = _write_tensors(items, files, tmp, adapter, cfg, dtype, from_original, qcfg, show_progress)
        _write_config(hf_config, tmp, dtype, qcfg, cfg)
        for pattern in COPIED_FILES:
            for path in model_dir.glob(pattern):
                shutil.copy(path, tmp / path.name)
        tokenizer_of(trained).save_pretrained(tmp)
        if trained.cfg_file is not None:
            (tmp / RUN_CONFIG_COPY).write_text(to_yaml(cfg))
    peak = peak_host_rss_since_reset_gib()
    return MergeSummary(
        out_dir, time.perf_counter() - start, written, len(items), sum(1 for i in items if i.lora),
        peak, max(0.0, peak - start_rss), difference, sorted(set(files.values())),
    )  # fmt: skip


def tokenizer_of(trained: Trained):
    """The tokenizer a trained adapter goes with: the one saved beside it (with the chat template
    training used), or, for an adapter saved without one, the base's as training exported it."""
    from transformers import AutoTokenizer

    from fsdpqlora.data import tokenizer_for_export

    if trained.adapter_dir is not None and (trained.adapter_dir / TOKENIZER_CONFIG).is_file():
        return AutoTokenizer.from_pretrained(trained.adapter_dir)
    return tokenizer_for_export(trained.cfg, trained.model_dir)


def _plan(units: list[weights.Unit], module_names: dict, adapter: Adapter, moe: bool, requantize: bool, dtype: str) -> list[Item]:
    """An output per unit, in checkpoint order, with the adapter modules matched and their shapes
    checked against the base before anything is written."""
    itemsize = quant.to_dtype(dtype).itemsize
    items, matched = [], set()
    for unit in units:
        module = module_names[id(unit.module)]
        name = weights.prequantized_weight_name(unit) if unit.is_4bit and len(unit.entries) > 1 else unit.entries[0].name
        lora = module if unit.attr == "weight" and module in adapter.modules else None
        if unit.is_4bit:
            shape = (unit.module.out_features, unit.module.in_features)
        else:
            shape = tuple(getattr(unit.module, unit.attr).shape)
        if lora is not None:
            _check_adapter_shapes(adapter, lora, shape)
            matched.add(lora)
        # transformers 5 holds a mixture-of-experts' experts as fused 3-D tensors, which its
        # bitsandbytes loader keeps in 16 bits: re-quantized, they could not be loaded.
        quantized = requantize and unit.is_4bit and not (moe and ".experts." in module)
        numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
        is_float = unit.entries[0].dtype.is_floating_point or unit.is_4bit
        nbytes = numel // 2 if quantized else numel * itemsize if is_float else unit.entries[0].nbytes
        items.append(Item(unit, name, lora, quantized, nbytes))
    unmatched = sorted(set(adapter.modules) - matched)
    if unmatched:
        entry = next(iter(adapter.modules[unmatched[0]].values()))
        raise ModelFilesError(
            f"{entry.path}: tensor {entry.name} adapts {unmatched[0]}, which is not a weight the base checkpoint holds "
            f"(another base model, or a head tied to the embedding?)"
        )
    return items


def _check_adapter_shapes(adapter: Adapter, module: str, shape: tuple) -> None:
    parts = adapter.modules[module]
    if len(shape) != 2:
        raise ModelFilesError(f"{parts['lora_A'].path}: tensor {parts['lora_A'].name} adapts {module}, which is not a linear weight")
    rank = parts["lora_A"].shape[0]
    expected = {"lora_A": (rank, shape[1]), "lora_B": (shape[0], rank), "lora_magnitude_vector": (shape[0],)}
    for kind, entry in parts.items():
        if entry.shape != expected[kind]:
            raise ModelFilesError(
                f"{entry.path}: tensor {entry.name} has shape {list(entry.shape)} but the base weight {module} "
                f"({list(shape)}) needs {list(expected[kind])} (an adapter of another model?)"
            )


def _assign_files(items: list[Item], max_shard_bytes: int) -> dict[str, str]:
    """Output tensor name -> file, filling each file up to max_shard_bytes in order, as
    transformers' save_pretrained shards (model.safetensors when one file holds everything)."""
    groups: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    files = {}
    for index, group in enumerate(groups, 1):
        file = weights.SINGLE_FILE if len(groups) == 1 else f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        files.update({name: file for item in group for name in item.names()})
    return files


@torch.no_grad()
def _write_tensors(items, files, out_dir, adapter, cfg, dtype, from_original, qcfg, show_progress) -> tuple[int, Difference | None]:
    out_dtype = quant.to_dtype(dtype)
    difference = Difference() if from_original else None
    cpu = torch.device("cpu")
    flat = [entry for item in items for entry in item.unit.entries]
    stream = weights.stream_tensors(flat, cfg.model.load_workers)
    writer, written = None, 0
    with weights.HostMemory() as host_memory, tqdm(total=sum(e.nbytes for e in flat), desc="merge", unit="B", unit_scale=True,
                                           unit_divisor=1024, disable=not show_progress, dynamic_ncols=True) as bar:  # fmt: skip
        try:
            for item in items:
                file = files[item.name]
                if writer is None or writer.path.name != file:
                    if writer is not None:
                        written += writer.close()
                    names = [n for n, f in files.items() if f == file]
                    writer = weights.StreamingShardWriter(out_dir / file, weights.header_room(names))
                tensors = {}
                for _ in item.unit.entries:
                    entry, tensor = next(stream)
                    tensors[entry.name] = tensor
                    bar.update(entry.nbytes)
                merged = _merged(item, tensors, adapter, cfg, from_original, difference)
                if item.requantize:
                    packed, state = quant.quantize(merged.to(out_dtype), qcfg, cpu)
                    writer.add(item.name, packed)
                    for key, value in state.as_dict(packed=True).items():
                        writer.add(f"{item.name}.{key}", value)
                else:
                    writer.add(item.name, merged.to(out_dtype) if merged.is_floating_point() else merged)
                del tensors, merged
                host_memory.release()
            written += writer.close()
            writer = None
        finally:
            if writer is not None:
                writer.abort()
    index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(files.items()))}
    if len(set(files.values())) > 1:
        (out_dir / weights.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return written, difference


def _merged(item: Item, tensors: dict, adapter: Adapter, cfg: Config, from_original: bool, difference) -> torch.Tensor:
    """The unit's tensor as training saw it (or the original, with `from_original`), in fp32 with
    the adapter merged in; a non-float tensor as it is."""
    unit, entry = item.unit, item.unit.entries[0]
    original = tensors[entry.name]
    if unit.is_4bit:
        packed, state = weights.quantized_weight(unit, tensors, cfg, torch.device("cpu"))
        trained = bnb.functional.dequantize_4bit(packed.view(torch.uint8), state).float()
        del packed
    else:
        weights.check_shape(entry.path, entry.name, tuple(original.shape), tuple(getattr(unit.module, unit.attr).shape))
        if not original.is_floating_point():
            return original
        weights.check_finite(entry.path, entry.name, original)
        trained = original.to(quant.to_dtype(cfg.model.dtype)).float()
    if from_original:
        base = original.float()
        difference.add(item.name, base - trained, unit.is_4bit)
    else:
        base = trained
    del trained
    return _apply_adapter(base, item.lora, adapter) if item.lora else base


def _apply_adapter(weight: torch.Tensor, module: str, adapter: Adapter) -> torch.Tensor:
    parts = {kind: weights.read_tensor(entry).float() for kind, entry in adapter.modules[module].items()}
    scaling = adapter.scaling(module, parts["lora_A"].shape[0])
    weight += scaling * (parts["lora_B"] @ parts["lora_A"])
    if adapter.use_dora:
        # peft's DoRA merge: each output row of W + scaling * B @ A rescaled to its learned magnitude.
        weight *= (parts["lora_magnitude_vector"] / torch.linalg.norm(weight, dim=1))[:, None]
    weights.check_finite(adapter.path / ADAPTER_WEIGHTS, f"merged into {module}", weight)
    return weight


def _write_config(hf_config, out_dir: Path, dtype: str, qcfg: QuantConfig | None, cfg: Config) -> None:
    from fsdpqlora.export.generate import bnb_config

    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    hf_config.dtype = quant.to_dtype(dtype)
    if qcfg is not None:
        hf_config.quantization_config = bnb_config(replace(cfg, quant=qcfg)).to_dict()
    hf_config.save_pretrained(out_dir)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", text.strip().upper())
    if match is None:
        raise ConfigError(f"--max-shard-size {text!r}: give a size like 5GB, 500MB or 100KB")
    number, unit = match.groups()
    return int(float(number) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fsdpqlora merge",
        description="Merge a trained adapter into its base model and write a Hugging Face model directory.",
    )
    parser.add_argument("path", help="a run directory, a checkpoint directory (checkpoints/step-N) or an adapter directory")
    parser.add_argument("out", help="the model directory to write (must not exist)")
    parser.add_argument("--base", help="the base model directory or hub id (default: the run's model, or the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=OUT_DTYPES, default="bfloat16", help="dtype of the written weights (default: bfloat16)")
    parser.add_argument("--from-original", action="store_true",
                        help="merge into the original full-precision weights instead of the 4-bit ones training saw; reports the difference")  # fmt: skip
    parser.add_argument("--quantize", choices=("nf4",), help="write the merged model re-quantized to 4-bit (bitsandbytes), loadable by transformers as it is")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        trained = locate(args.path, args.base, need_adapter=True)
        if trained.cfg_file is None:
            q = trained.cfg.quant
            print(f"[fsdpqlora] no run configuration next to {trained.adapter_dir}; assuming the defaults: {q.quant_type}, "
                  f"double_quant={q.double_quant}, blocksize {q.blocksize}, model.dtype={trained.cfg.model.dtype}", flush=True)  # fmt: skip
        summary = merge(trained, Path(args.out), args.dtype, args.from_original, args.quantize == "nf4", parse_size(args.max_shard_size))
    print("\n".join(summary.lines(trained, args.from_original)), flush=True)
    return 0

