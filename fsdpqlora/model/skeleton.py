"""The model: which families we know, where its files are, and its meta-device skeleton.

Building on the meta device costs no memory, so the skeleton can be quantized (Linear4bit with the
packed shape), wrapped with adapters and sharded before a single weight is read; `load_weights`
then fills each rank's shards from the checkpoint, one tensor at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fsdpqlora.compat import mark_loaded_in_4bit
from fsdpqlora.config import ModelConfig, QuantConfig
from fsdpqlora.model import quant
from fsdpqlora.model.families import decoder_layers, family_of, prepare_layers


def build_skeleton(hf_config, model_cfg: ModelConfig, qcfg: QuantConfig) -> nn.Module:
    """The causal LM with its parameters on the meta device and its 4-bit linears swapped for
    Linear4bit. Buffers are built for real: the non-persistent ones (rotary tables, Gemma's
    embedding scale) are computed in construction and found in no checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    family = family_of(hf_config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=quant.to_dtype(model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code
        )
    # Construction on meta skips tying; a tied head must be the embedding's very tensor, or it
    # would be a second, unfilled parameter.
    model.tie_weights()
    layers = decoder_layers(model, family)
    prepare_layers(model, family)
    quant.replace_linears(layers, family.linear_names, qcfg)
    mark_loaded_in_4bit(model)
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
