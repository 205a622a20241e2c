"""LoRA on linears that read the same input: one A product and one dropout mask per input.

An attention's q_proj, k_proj and v_proj are called on the same hidden states, a gated MLP's gate_proj
and up_proj on the same input. peft runs each module's LoRA branch on its own: it draws a dropout
mask over the whole input for each module (tokens x hidden size random numbers, three times for
q, k and v) and launches a small A product for each. Here the LoRA linears of such a group share
both: the first one called draws one mask, multiplies the dropped input by the group's A weights
concatenated along the output dimension, and each module takes its columns of that one product and
goes on with its own B and scaling, as peft's forward does.

peft's modules and parameters stay as they are; the concatenation is made in every forward from the
weights the modules hold then (FSDP2's gathered ones), so the optimizer, the sharding and the saved
adapter see peft's per-module lora_A/lora_B tensors. DoRA layers keep peft's path (its forward needs
the dropped input itself, not its A product), and so does any call peft treats specially (adapters
disabled or merged, several adapters, extra arguments).

One mask per input instead of one per module: each module still sees dropout of rate p on its
input, as with peft, but the modules of a group see the same mask instead of independent ones.
With dropout 0 the forward is peft's (bit for bit in the tests; a BLAS may choose another kernel
for the wider product, which can change the last bit) and the gradients differ only in the order in
which the input's gradient sums the group's branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from torch import nn

from fsdpqlora.model.adapters import ADAPTER_NAME


class SharedInput:
    """The LoRA A products of a group of LoRA linears for the input tensor they were last called with.

    Keyed on the tensor object: the group's modules are handed the very same one. Holding it until
    `forget` also keeps its id from going to another tensor. The products are forgotten once every
    module has taken its own, or when the group's parent module returns (a module not called, a
    recompute that stopped early, an exception), so nothing outlives the layer's forward but what
    autograd saved; a module called again on the same tensor, or on another one, gets a new product.
    """

    def __init__(self, layers: list[LoraLinear4bit]):
        self.layers = layers
        self.forget()

    def forget(self) -> None:
        self.input: torch.Tensor | None = None
        self.products: tuple[torch.Tensor, ...] = ()
        self.taken: set[int] = set()

    def product(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s A product of x after dropout."""
        if x is not self.input or index in self.taken:
            self._compute(x)
        self.taken.add(index)
        product = self.products[index]
        if len(self.taken) == len(self.layers):
            self.forget()
        return product

    def _compute(self, x: torch.Tensor) -> None:
        first = self.layers[0]
        lora_a = [layer.lora_A[ADAPTER_NAME] for layer in self.layers]
        weight = torch.cat([a.weight for a in lora_a])
        lora_x = x
        if not torch.is_autocast_enabled():  # peft casts the input to the A weights' dtype, once per module
            lora_x = first._cast_input_dtype(x, weight.dtype)
        dropped = first.lora_dropout[ADAPTER_NAME](lora_x)  # every layer of the group has the same p
        self.input = x
        self.products = F.linear(dropped, weight).split([a.out_features for a in lora_a], dim=-1)
        self.taken = set()


class SharedInputLinear4bit(LoraLinear4bit):
    """peft's LoRA on a bitsandbytes 4-bit linear whose A product comes from its group's one product.
    `share_inputs` turns peft's modules into this class in place (as FSDP2's fully_shard does with
    the modules it shards), so their parameters and names stay peft's."""

    shared_input: SharedInput
    shared_input_index: int

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [ADAPTER_NAME]:
            return super().forward(x, *args, **kwargs)
        # peft 0.21.2's Linear4bit.forward for one active LoRA adapter, the A product replaced by the group's.
        # peft clones the 4-bit output before adding to it in place; the sum below is out of place.
        result = self.base_layer(x)
        lora_a = self.shared_input.product(self.shared_input_index, x)
        output = self.lora_B[ADAPTER_NAME](lora_a) * self.scaling[ADAPTER_NAME]
        if not torch.is_autocast_enabled():
            output = output.to(result.dtype)
        return result + output


def share_inputs(model: nn.Module, groups: tuple[tuple[str, ...], ...]) -> int:
    """Let every group of plain LoRA linears named in `groups` (siblings in one parent module, as
    q_proj, k_proj and v_proj in an attention) share its A product and dropout mask; returns the
    number of groups. Linears with DoRA, or not adapted, are left to peft."""
    count = 0
    for parent in list(model.modules()):
        for names in groups:
            layers = [getattr(parent, name, None) for name in names]
            layers = [layer for layer in layers if _plain_lora(layer)]
            if len(layers) < 2:
                continue
            shared = SharedInput(layers)
            for index, layer in enumerate(layers):
                layer.__class__ = SharedInputLinear4bit
                layer.shared_input, layer.shared_input_index = shared, index
            parent.register_forward_hook(_forget_after(shared), always_call=True)
            count += 1
    return count


def _plain_lora(layer) -> bool:
    return type(layer) is LoraLinear4bit and ADAPTER_NAME in layer.lora_A and not layer.lora_variant


def _forget_after(shared: SharedInput):
    def hook(module, args, output):
        shared.forget()

    return hook
