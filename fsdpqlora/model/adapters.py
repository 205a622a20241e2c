"""LoRA adapters through peft: attaching, initializing under sharding, and saving in PEFT format."""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fsdpqlora import atomic
from fsdpqlora.compat import CHECKPOINT_WRAPPER_PREFIX, dora_magnitude_left_on_meta, model_type_hidden
from fsdpqlora.config import AdapterConfig
from fsdpqlora.errors import ConfigError
from fsdpqlora.model.dropout import use_lora_dropout
from fsdpqlora.model.families import family_of
from fsdpqlora.model.quant import to_dtype
from fsdpqlora.parallel.fsdp import copy_into_shard, local_tensor

ADAPTER_NAME = "default"


def add_lora(
    model: nn.Module, acfg: AdapterConfig, base_model_path: str, quantized_names: tuple[str, ...], per_expert_moe: bool
) -> PeftModel:
    """Attach LoRA to the (meta) model's target modules: those named, or with `all-linear` every
    4-bit linear (`quantized_names`, the family's). Adapter weights stay on meta until
    `init_lora_weights` fills them after sharding. Their dropout is LoraDropout (model/dropout.py)."""
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = list(acfg.target_modules)
    if targets == ["all-linear"]:
        targets = [name for name in quantized_names if name in linear_names]
    unknown = sorted(set(targets) - linear_names)
    if unknown:
        raise ConfigError(
            f"adapter.target_modules: {', '.join(unknown)} not linear layers of this model; "
            f"its linear layers are {', '.join(sorted(linear_names))}"
        )
    config = LoraConfig(
        r=acfg.r,
        lora_alpha=acfg.alpha,
        lora_dropout=acfg.dropout,
        target_modules=targets,
        use_dora=acfg.method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    )
    wanted = sum(1 for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    attach = contextlib.ExitStack()
    if acfg.method == "dora":
        attach.enter_context(dora_magnitude_left_on_meta())
    if per_expert_moe:
        attach.enter_context(model_type_hidden(model.config))
    with attach:
        peft_model = get_peft_model(model, config)
    adapted = sum(1 for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and name.rsplit(".", 1)[-1] in targets)
    if adapted != wanted:
        raise RuntimeError(f"peft adapted {adapted} of the {wanted} target linears; refusing to train a partial adapter")
    use_lora_dropout(peft_model)
    for _, param in lora_parameters(peft_model):
        param.data = param.data.to(to_dtype(acfg.dtype))
    return peft_model


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable adapter parameters, in a fixed order, under their saved names."""
    return [(name.replace(CHECKPOINT_WRAPPER_PREFIX, ""), p) for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int) -> None:
    """Initialize every LoRA weight as peft does (A: Kaiming-uniform, B: zeros), from full tensors
    drawn from a generator seeded per parameter name. Every rank draws the same full tensor and keeps
    its shard, so the initial adapter is the same for any world size or sharding strategy."""
    for name, param in lora_parameters(model):
        if ".lora_magnitude_vector." in name:
            continue  # init_dora_magnitudes
        shape = tuple(param.shape)
        full = torch.zeros(shape, dtype=torch.float32)
        if ".lora_A." in name:
            generator = torch.Generator().manual_seed(seed + _stable_hash(name))
            # nn.Linear's default init, which peft uses for A: kaiming_uniform_(a=sqrt(5)).
            bound = 1.0 / math.sqrt(shape[1])
            full.uniform_(-bound, bound, generator=generator)
        copy_into_shard(param, full.to(device=local_tensor(param).device, dtype=param.dtype))


@torch.no_grad()
def init_dora_magnitudes(model: nn.Module) -> None:
    """peft's DoRA init: each magnitude is the row norm of W + s*B@A with W the NF4-dequantized base
    weight; B is zero, so of W alone. Under FSDP2 the packed weight is sharded by bytes, not by rows:
    each sharded unit (a decoder layer, then the root) is all-gathered in turn, its weights are
    dequantized whole, and every rank keeps the norms of its own rows."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model] + [model]
    done: set[int] = set()
    for unit in units:
        layers = [m for m in unit.modules() if getattr(m, "lora_magnitude_vector", None) and id(m) not in done]
        if not layers:
            continue
        done.update(id(m) for m in layers)
        if isinstance(unit, FSDPModule):
            unit.unshard()
        norms = []
        for layer in layers:
            base = layer.get_base_layer()
            weight = bnb.functional.dequantize_4bit(base.weight.data.contiguous(), base.quant_state).float()
            norms.append(torch.linalg.norm(weight, dim=1))
        if isinstance(unit, FSDPModule):  # writes to gathered parameters would be lost: copy into the shards
            unit.reshard()
        for layer, norm in zip(layers, norms, strict=True):
            magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight
            copy_into_shard(magnitude, norm.to(device=local_tensor(magnitude).device, dtype=magnitude.dtype))


def _stable_hash(text: str) -> int:
    # Python's hash() is salted per process; ranks must agree.
    value = 0
    for char in text.encode():
        value = (value * 131 + char) % 2_147_483_647
    return value


def gather_adapter_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full adapter in PEFT's key format, gathered from every rank's shards. Every rank must
    call this (it all-gathers); rank 0 gets the state dict, the others None."""
    full = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensor = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            full[name] = tensor.detach().cpu().clone()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    # peft finds adapter entries by the live module names (checkpoint wrapper included), so the
    # wrapper's prefix is removed only from what it returns.
    state = get_peft_model_state_dict(model, state_dict=full, adapter_name=ADAPTER_NAME)
    if len(state) != len(full):
        raise RuntimeError(f"peft kept {len(state)} of {len(full)} adapter tensors; refusing to save a partial adapter")
    return {name.replace(CHECKPOINT_WRAPPER_PREFIX, ""): tensor for name, tensor in state.items()}


def save_adapter(model: PeftModel, state: dict[str, torch.Tensor], out_dir: Path, tokenizer=None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (and the tokenizer's files, when given,
    as peft and TRL users expect them beside an adapter) under a temporary name, then rename, so
    `out_dir` is either absent, the previous adapter, or the complete new one."""
    out_dir = Path(out_dir)
    config = copy.copy(model.peft_config[ADAPTER_NAME])
    config.inference_mode = True  # as peft's own save_pretrained writes it
    if family_of(model.base_model.model.config).mixture_of_experts:
        # peft loads per-expert adapters onto transformers 5's fused experts only when they have no
        # dropout; dropout is a training-time setting that inference never applies.
        config.lora_dropout = 0.0
    with atomic.building_dir(out_dir, if_exists="replace") as tmp:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
