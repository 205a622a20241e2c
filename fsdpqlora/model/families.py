"""The model families fsdpqlora knows: what it needs beyond a Hugging Face config to quantize,
shard and load each one.

Adding a dense decoder family is one entry: the `model_type` of its config.json and the attribute
names of the attention and MLP linears that become 4-bit. Embeddings, norms, the LM head and MoE
routers stay in the model dtype and frozen: they are a small part of the weights, and quantizing
the head or a router measurably hurts quality.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fsdpqlora.errors import ModelFilesError
from fsdpqlora.model.moe import replace_fused_experts


@dataclass(frozen=True)
class Family:
    # Attribute names of the linears inside each decoder layer that become 4-bit.
    linear_names: tuple[str, ...]
    # Attribute path from the *ForCausalLM model to the ModuleList of decoder layers.
    layers_path: str = "model.layers"
    # (checkpoint substring, module substring) pairs, for checkpoints whose tensor names differ
    # from the module tree transformers builds.
    renames: tuple[tuple[str, str], ...] = ()
    # Mixture-of-experts: rebuild the experts of each layer as separate linears so that they can
    # be quantized and adapted like any other (see moe.py beside this file).
    mixture_of_experts: bool = False
    # Groups of sibling linears that the family's forward calls on the same input tensor (q/k/v of
    # the attention, gate/up of a gated MLP): their LoRA A products are computed as one (shared_input.py
    # beside this file). Experts are left out: each reads only the tokens routed to it.
    shared_inputs: tuple[tuple[str, ...], ...] = ()


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
_QKV = ("q_proj", "k_proj", "v_proj")
_DENSE = Family(linear_names=_ATTENTION + _GATED_MLP, shared_inputs=(_QKV, ("gate_proj", "up_proj")))

FAMILIES: dict[str, Family] = {
    "llama": _DENSE,  # Llama 2, Llama 3.x
    "mistral": _DENSE,
    "qwen2": _DENSE,  # Qwen2, Qwen2.5 (q/k/v carry biases, kept in the model dtype)
    "qwen3": _DENSE,  # per-head q/k RMSNorm weights load as plain tensors
    "gemma2": _DENSE,  # tied embeddings; embed_scale is a non-persistent buffer
    "gemma3_text": _DENSE,  # Gemma 3 1B, and the text tower of larger Gemma 3 checkpoints
    # Phi-3 fuses q/k/v into one linear and gate/up into another; each is quantized whole.
    "phi3": Family(linear_names=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    # Mixtral: the router (`gate`) stays in the model dtype and frozen; every expert's w1/w2/w3 is
    # 4-bit. Checkpoints keep the pre-transformers-5 name `block_sparse_moe`.
    "mixtral": Family(
        linear_names=_ATTENTION + ("w1", "w2", "w3"),
        renames=((".block_sparse_moe.", ".mlp."),),
        mixture_of_experts=True,
        shared_inputs=(_QKV,),
    ),
}


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


def prepare_layers(model: nn.Module, family: Family) -> None:
    """Family-specific surgery on the meta skeleton, before the linears are quantized."""
    if family.mixture_of_experts:
        for layer in decoder_layers(model, family):
            replace_fused_experts(layer.mlp)


def module_name_of(checkpoint_name: str, family: Family) -> str:
    for old, new in family.renames:
        checkpoint_name = checkpoint_name.replace(old, new)
    return checkpoint_name
