"""The model: which families we know, where its files are, and its meta-device skeleton.

Building on the meta device costs no memory, so the skeleton can be quantized (Linear4bit with the
packed shape), wrapped with adapters and sharded before a single weight is read; `load_weights`
then fills each rank's shards from the checkpoint, one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor

from fsdpqlora import assets, quant
from fsdpqlora.errors import ConfigError, ModelFilesError
from fsdpqlora.families import decoder_layers, family_of, prepare_layers


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
        message = str(exc).splitlines()[0]
        if "custom code" in message and not trust_remote_code:
            message = (
                "the model's config names custom code (auto_map), which fsdpqlora does not run unless "
                "model.trust_remote_code=true; read that code first"
            )
        raise ModelFilesError(f"{config_file}: {message}") from None


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
    """The causal LM with its parameters on the meta device and its 4-bit linears swapped for
    Linear4bit. Buffers are built for real: the non-persistent ones (rotary tables, Gemma's
    embedding scale) are computed in construction and found in no checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    family = family_of(hf_config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=quant.to_dtype(cfg.model.dtype), trust_remote_code=cfg.model.trust_remote_code
        )
    # Construction on meta skips tying; a tied head must be the embedding's very tensor, or it
    # would be a second, unfilled parameter.
    model.tie_weights()
    layers = decoder_layers(model, family)
    prepare_layers(model, family)
    quant.replace_linears(layers, family.linear_names, cfg.quant)
    # peft picks its 4-bit LoRA layer (which dequantizes the base weight) by this flag.
    model.is_loaded_in_4bit = True
    return model


def checkpoint_targets(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Map each model tensor a checkpoint fills (parameters and persistent buffers) to (module,
    attribute). Taken from the bare HF model before adapters and sharding rename or wrap anything:
    the module objects stay the same throughout, so the loader finds them whatever wraps them."""
    targets = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, param in module._parameters.items():
            if param is not None:
                targets[prefix + attr] = (module, attr)
        for attr, buffer in module._buffers.items():
            if buffer is not None and attr not in module._non_persistent_buffers_set:
                targets[prefix + attr] = (module, attr)
    return targets


def tied_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(module, attr, owner module, owner attr) for every parameter that is another's very tensor,
    such as a head tied to the embedding. `to_empty` gives each its own tensor again."""
    owners: dict[int, tuple[nn.Module, str]] = {}
    tied = []
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in owners:
                tied.append((module, attr, *owners[id(param)]))
            else:
                owners[id(param)] = (module, attr)
    return tied


def retie(tied: list[tuple[nn.Module, str, nn.Module, str]]) -> None:
    for module, attr, owner, owner_attr in tied:
        module._parameters[attr] = owner._parameters[owner_attr]


def non_persistent_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The buffers no checkpoint holds, to put back after `to_empty` wipes them."""
    return [
        (module, name, buffer.clone())
        for module in model.modules()
        for name, buffer in module._buffers.items()
        if name in module._non_persistent_buffers_set and buffer is not None
    ]


def restore_buffers(saved: list[tuple[nn.Module, str, torch.Tensor]], device: torch.device) -> None:
    for module, name, buffer in saved:
        module._buffers[name] = buffer.to(device)


def prequantized_config(hf_config) -> dict | None:
    """The bitsandbytes 4-bit settings a pre-quantized checkpoint was saved with, or None."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        method = qc.get("quant_method", "unknown")
        raise ModelFilesError(
            f"config.json: the checkpoint is quantized with {method}"
            + (" 8-bit" if qc.get("load_in_8bit") else "")
            + "; fsdpqlora loads full-precision checkpoints and bitsandbytes 4-bit ones"
        )
    return qc


def check_prequantized(cfg: DictConfig, hf_config, model_dir: Path) -> None:
    """A pre-quantized checkpoint fixes the 4-bit format; the configuration must agree with it
    (merging and reloading the adapter later go by the configuration)."""
    qc = prequantized_config(hf_config)
    if qc is None:
        return
    saved = {
        "quant.quant_type": qc.get("bnb_4bit_quant_type", "fp4"),
        "quant.double_quant": bool(qc.get("bnb_4bit_use_double_quant", False)),
    }
    for key, value in saved.items():
        configured = OmegaConf.select(cfg, key)
        if configured != value:
            raise ConfigError(
                f"{key}={configured!r}: the checkpoint in {model_dir} is pre-quantized with {value}; set {key}={value}"
            )


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
