"""The model: which families we know, where its files are, and its meta-device skeleton.

Building on the meta device costs no memory, so the skeleton can be quantized (Linear4bit with the
packed shape), wrapped with adapters and sharded before a single weight is read; `load_weights`
then fills each rank's shards from the checkpoint, one tensor at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor

from fsdpqlora import assets, quant, weights
from fsdpqlora.distributed import copy_into_shard
from fsdpqlora.errors import ModelFilesError


@dataclass(frozen=True)
class Family:
    """What fsdpqlora must know about an architecture beyond its HF config."""

    # Attribute path from the *ForCausalLM model to the ModuleList of decoder layers.
    layers_path: str
    # Attribute names of the attention and MLP linears that become 4-bit.
    linear_names: tuple[str, ...]


_LLAMA_LIKE = Family(
    layers_path="model.layers",
    linear_names=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
FAMILIES: dict[str, Family] = {"llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE}


def family_of(hf_config) -> Family:
    family = FAMILIES.get(hf_config.model_type)
    if family is None:
        raise ModelFilesError(
            f"architecture '{hf_config.model_type}' is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    return family


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    module = model
    for attr in family.layers_path.split("."):
        module = getattr(module, attr)
    return module


def resolve_model_dir(cfg: DictConfig) -> Path:
    """The local directory holding the model's files: built for `tiny`, a local path as given, or a
    hub id downloaded (safetensors and configs only) where a network exists."""
    if cfg.model.name == "tiny" and not cfg.model.path:
        return assets.tiny_model_path(cfg.launch.cache_dir)
    local = Path(cfg.model.path).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.is_absolute() or cfg.model.path.startswith((".", "~")) or cfg.model.path.count("/") != 1:
        raise ModelFilesError(f"model.path={cfg.model.path!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(cfg.model.path, allow_patterns=["*.json", "model*.safetensors", "tokenizer*", "*.model"])
        )
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise ModelFilesError(
            f"model.path={cfg.model.path!r}: not a local directory, and the hub download failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None


def load_hf_config(model_dir: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelFilesError(f"{config_file}: missing; a model directory needs config.json")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFilesError(f"{config_file}: not valid JSON ({exc})") from None
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise ModelFilesError(f"{config_file}: {str(exc).splitlines()[0]}") from None


def check_tokenizer(model_dir: Path):
    """The model directory's tokenizer, which training needs an EOS token from."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"{model_dir}: no usable tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.eos_token_id is None:
        raise ModelFilesError(f"{model_dir}: the tokenizer has no EOS token; responses could not end")
    return tokenizer


def build_skeleton(hf_config, cfg: DictConfig) -> nn.Module:
    """The causal LM on the meta device with its attention/MLP linears swapped for Linear4bit."""
    from transformers import AutoModelForCausalLM

    family = family_of(hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=quant.to_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code
        )
    quant.replace_linears(decoder_layers(model, family), family.linear_names, cfg.quant)
    # peft picks its 4-bit LoRA layer (which dequantizes the base weight) by this flag.
    model.is_loaded_in_4bit = True
    return model


def checkpoint_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Map each checkpoint tensor name to (module, attribute). Taken from the bare HF model before
    adapters and sharding rename or wrap anything: the module objects stay the same throughout,
    so the loader can find them whatever wraps them later."""
    targets = {}
    for module_name, module in model.named_modules():
        for attr, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            targets[f"{module_name}.{attr}" if module_name else attr] = (module, attr)
    return targets


@torch.no_grad()
def load_weights(
    targets: dict[str, tuple[nn.Module, str]], model_dir: Path, cfg: DictConfig, device: torch.device, progress=None
) -> int:
    """Fill the (sharded, materialized) model from the checkpoint, one tensor at a time: 4-bit
    layers get their weight quantized on `device` and keep only this rank's shard of the packed
    bytes; every other tensor keeps only its shard. Returns the number of bytes read."""
    import bitsandbytes as bnb

    dtype = quant.to_dtype(cfg.model.dtype)
    filled: set[int] = set()
    bytes_read = 0
    for name, tensor in weights.iter_tensors(model_dir):
        if name not in targets:
            if name.endswith("rotary_emb.inv_freq"):  # old exports saved the recomputed table
                continue
            raise ModelFilesError(
                f"{model_dir}: tensor {name} is not part of the model its config.json describes"
                + (" (a pre-quantized checkpoint? not supported yet)" if name.endswith((".absmax", ".quant_map")) else "")
            )
        module, attr = targets[name]
        target = getattr(module, attr)
        bytes_read += tensor.numel() * tensor.element_size()
        if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
            expected = (module.out_features, module.in_features)
            _check_shape(name, model_dir, tuple(tensor.shape), expected)
            packed, quant_state = quant.quantize(tensor.to(dtype), cfg.quant, device)
            # FSDP2 replaces the parameter with a plain sharded one; the layer's own quant_state is
            # where bitsandbytes looks for it after each all-gather.
            module.quant_state = quant_state
            copy_into_shard(target, packed)
        else:
            full_shape = tuple(target.shape)
            _check_shape(name, model_dir, tuple(tensor.shape), full_shape)
            copy_into_shard(target, tensor.to(target.dtype))
        filled.add(id(target))
        if progress is not None:
            progress.update(1)
    _check_all_filled(targets, filled, model_dir)
    return bytes_read


def _check_shape(name: str, model_dir: Path, got: tuple, expected: tuple) -> None:
    if got != expected:
        raise ModelFilesError(
            f"{model_dir}: tensor {name} has shape {list(got)} but the model's config.json implies {list(expected)}"
        )


def _check_all_filled(targets, filled: set[int], model_dir: Path) -> None:
    """Every parameter was loaded (tied ones count once: they are the same tensor)."""
    missing = []
    for name, (module, attr) in targets.items():
        is_buffer = attr in dict(module.named_buffers(recurse=False))
        if id(getattr(module, attr)) not in filled and not is_buffer:
            missing.append(name)
    if missing:
        raise ModelFilesError(f"{model_dir}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")


def init_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute buffers that are not in checkpoints and that meta construction left empty
    (rotary inverse frequencies), by building those small modules again for real."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=module.config).to(device)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer)


def count_quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(this rank's bytes of packed 4-bit weights, all ranks' bytes) from the live tensors."""
    import bitsandbytes as bnb

    local = total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            if isinstance(weight, DTensor):
                local += weight.to_local().numel() * weight.element_size()
            else:
                local += weight.numel() * weight.element_size()
            total += weight.numel() * weight.element_size()
    return local, total
