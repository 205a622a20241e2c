"""What the planner counts: every tensor of the model as the workers build it, without a byte of it.

The model is built exactly as a worker builds it (`build_skeleton`: transformers on the meta device,
the family's linears swapped for bitsandbytes Linear4bit with their packed shapes), so parameter
shapes, dtypes, tied weights and MoE experts are the real ones. The configuration of a model comes
from its config.json: `model.path` when it is a local directory, else the preset's public
architecture numbers in conf/architectures/<preset>.json (the hub's config.json, trimmed to the
fields that set shapes), so planning needs no network and no weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from torch import nn

from fsdpqlora.config import CONF_DIR, Config, QuantConfig, config_from, to_dict
from fsdpqlora.errors import ConfigError

ARCHITECTURES_DIR = CONF_DIR / "architectures"


@dataclass(frozen=True)
class Tensor:
    """One parameter: its shape and bytes per element, and how FSDP2 treats it."""

    shape: tuple[int, ...]
    itemsize: int
    # packed 4-bit bytes (never cast by mixed precision), a frozen float weight, or an adapter weight
    kind: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def shard_bytes(self, shards: int, index: int) -> int:
        """Bytes of shard `index` of `shards`: FSDP2 cuts dim 0 as torch.chunk does (ceil-sized
        pieces; ranks past the last piece hold none)."""
        if shards == 1 or not self.shape:
            return self.nbytes
        rows = self.shape[0]
        chunk = -(-rows // shards)
        local_rows = max(0, min(chunk, rows - index * chunk))
        return self.nbytes // rows * local_rows


@dataclass
class Unit:
    """What one fully_shard call owns: a decoder layer, the embedding, the head, or the root (the
    final norm, and a head tied to the embedding)."""

    tensors: list[Tensor] = field(default_factory=list)
    # bytes of the bitsandbytes quantization state of this unit's 4-bit linears (kept whole)
    quant_state_bytes: int = 0

    def bytes(self, kind: str | None = None) -> int:
        return sum(t.nbytes for t in self.tensors if kind is None or t.kind == kind)

    def shard_bytes(self, shards: int) -> int:
        """The largest rank's shard of the unit (rank 0's: torch.chunk's first piece is the largest)."""
        return sum(t.shard_bytes(shards, 0) for t in self.tensors)

    def gathered_bytes(self, compute_itemsize: int) -> int:
        """The unit all-gathered: packed bytes as stored, float weights cast to the compute dtype."""
        return sum(t.nbytes if t.kind == "packed" else t.numel * compute_itemsize for t in self.tensors)


@dataclass(eq=False)  # hashed by identity: the search asks it the same questions many times
class Architecture:
    name: str
    layers: list[Unit]
    # Empty when the head is tied to the embedding: that one tensor is the root's.
    embedding: Unit
    head: Unit
    root: Unit
    hidden: int
    intermediate: int
    kv_dim: int
    q_dim: int
    vocab: int
    # MoE: experts each token passes through (1 for dense models), and experts per layer
    experts_active: int
    experts: int
    # (in_features, out_features) of every adapted linear (for the FLOPs of the adapters)
    adapted: list[tuple[int, int]]
    # in_features of each input that LoRA dropout copies in one decoder layer (with dropout > 0)
    dropped_inputs: list[int]
    # parameters of the 4-bit linears and of the head: the ones every token multiplies
    quantized_params: int
    head_params: int

    @property
    def units(self) -> list[Unit]:
        return [*self.layers, self.embedding, self.head, self.root]

    @cached_property
    def _by_kind(self) -> dict[str, list[Tensor]]:
        by_kind: dict[str, list[Tensor]] = {"packed": [], "frozen": [], "adapter": []}
        for unit in self.units:
            for t in unit.tensors:
                by_kind[t.kind].append(t)
        return by_kind

    def tensors(self, kind: str) -> list[Tensor]:
        return self._by_kind[kind]


def hf_config_of(cfg: Config):
    """The transformers config of the model: the local model directory's (or the Hugging Face
    cache's copy of a hub id's), else the preset's."""
    from transformers import AutoConfig

    local = Path(cfg.model.path).expanduser() if cfg.model.path else None
    if local is not None and not local.exists() and cfg.model.path.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(cfg.model.path, "config.json")
        local = Path(cached).parent if isinstance(cached, str) else local
    if local is not None and (local / "config.json").is_file():
        from fsdpqlora.model.directory import load_hf_config

        return load_hf_config(local, cfg.model.trust_remote_code)
    if cfg.model.name == "tiny" and not cfg.model.path:  # its recipe, whether built yet or not
        from fsdpqlora.assets import TINY_LLAMA, TINY_VOCAB_SIZE

        return AutoConfig.for_model("llama", vocab_size=TINY_VOCAB_SIZE, **TINY_LLAMA)
    preset = ARCHITECTURES_DIR / f"{cfg.model.name}.json"
    if not preset.is_file():
        known = ", ".join(sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json")))
        raise ConfigError(
            f"model.path={cfg.model.path!r}: planning needs the model's config.json; give a local model "
            f"directory, or one of the presets whose architecture ships with fsdpqlora ({known})"
        )
    numbers = json.loads(preset.read_text())
    return AutoConfig.for_model(numbers.pop("model_type"), **numbers)


def architecture(cfg: Config, hf_config) -> Architecture:
    # Only these settings change the tensors; caching on them lets the search reuse one skeleton.
    shape = {
        "model": {"dtype": str(cfg.model.dtype), "trust_remote_code": cfg.model.trust_remote_code, "name": cfg.model.name},
        "quant": to_dict(cfg.quant),
        "adapter": to_dict(cfg.adapter),
    }
    return _architecture(hf_config.to_json_string(), json.dumps(shape, sort_keys=True))


@lru_cache(maxsize=4)
def _architecture(hf_json: str, shape_json: str) -> Architecture:
    import bitsandbytes as bnb
    from transformers import AutoConfig

    from fsdpqlora.model.families import decoder_layers, family_of
    from fsdpqlora.model.quant import to_dtype
    from fsdpqlora.model.skeleton import build_skeleton

    settings = config_from(json.loads(shape_json))
    raw = json.loads(hf_json)
    hf_config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    family = family_of(hf_config)
    model = build_skeleton(hf_config, settings.model, settings.quant)
    adapter = settings.adapter
    targets = set(family.linear_names if list(adapter.target_modules) == ["all-linear"] else adapter.target_modules)
    adapter_itemsize = to_dtype(adapter.dtype).itemsize
    seen: set[int] = set()
    adapted: list[tuple[int, int]] = []

    def unit_of(module: nn.Module, skip: str | None = None) -> Unit:
        unit = Unit()
        for name, sub in module.named_modules():
            if skip and (name == skip or name.startswith(skip + ".")):  # the decoder layers' own units
                continue
            for param in sub.parameters(recurse=False):
                if id(param) in seen:  # a tied weight is one tensor
                    continue
                seen.add(id(param))
                kind = "packed" if isinstance(param, bnb.nn.Params4bit) else "frozen"
                unit.tensors.append(Tensor(tuple(param.shape), param.element_size(), kind))
            if isinstance(sub, bnb.nn.Linear4bit):
                unit.quant_state_bytes += quant_state_bytes(sub.in_features * sub.out_features, settings.quant)
            if isinstance(sub, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                # peft's LoRA: A (r x in), B (out x r); DoRA adds a magnitude per output feature.
                adapted.append((sub.in_features, sub.out_features))
                unit.tensors.append(Tensor((adapter.r, sub.in_features), adapter_itemsize, "adapter"))
                unit.tensors.append(Tensor((sub.out_features, adapter.r), adapter_itemsize, "adapter"))
                if adapter.method == "dora":
                    unit.tensors.append(Tensor((sub.out_features,), adapter_itemsize, "adapter"))
        return unit

    layers = [unit_of(layer) for layer in decoder_layers(model, family)]
    dropped_inputs = dropout_inputs(decoder_layers(model, family)[0], targets, family.shared_inputs, settings.adapter)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = Unit() if tied else unit_of(model.get_input_embeddings())
    head = Unit() if tied else unit_of(model.get_output_embeddings())
    root = unit_of(model, skip=family.layers_path)  # what is not seen yet: the final norm (and a tied head)
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    experts = getattr(hf_config, "num_local_experts", 1) or 1
    return Architecture(
        name=settings.model.name,
        layers=layers,
        embedding=embedding,
        head=head,
        root=root,
        hidden=hf_config.hidden_size,
        intermediate=hf_config.intermediate_size,
        kv_dim=hf_config.num_key_value_heads * head_dim,
        q_dim=hf_config.num_attention_heads * head_dim,
        vocab=hf_config.vocab_size,
        experts_active=getattr(hf_config, "num_experts_per_tok", 1) if experts > 1 else 1,
        experts=experts,
        adapted=adapted,
        dropped_inputs=dropped_inputs,
        quantized_params=quantized,
        head_params=model.get_output_embeddings().weight.numel(),
    )


def dropout_inputs(layer: nn.Module, targets: set[str], groups: tuple[tuple[str, ...], ...], adapter) -> list[int]:
    """in_features of each input that LoRA dropout copies in a decoder layer: one per adapted linear
    (peft's way), but one per group of sibling linears that read the same input where
    adapter.fused_shared_inputs shares their mask (fsdpqlora/model/shared_input.py; not for DoRA)."""
    inputs = []
    grouped: set[int] = set()
    if adapter.fused_shared_inputs and adapter.method != "dora":
        for parent in layer.modules():
            for names in groups:
                members = [getattr(parent, name) for name in names if name in targets and isinstance(getattr(parent, name, None), nn.Linear)]
                if len(members) >= 2:
                    inputs.append(members[0].in_features)
                    grouped.update(id(m) for m in members)
    for name, sub in layer.named_modules():
        if isinstance(sub, nn.Linear) and name.rsplit(".", 1)[-1] in targets and id(sub) not in grouped:
            inputs.append(sub.in_features)
    return inputs


def quant_state_bytes(numel: int, qcfg: QuantConfig) -> int:
    """Bytes of the QuantState bitsandbytes' quantize_4bit returns for a weight of `numel` values:
    one absmax per block (float32; with double quantization uint8, plus a float32 absmax per 256 of
    those, the 256-entry float32 code of the nested quantization and a float32 offset) and the
    16-entry float32 4-bit code."""
    blocks = -(-numel // qcfg.blocksize)
    code = 16 * 4
    if not qcfg.double_quant:
        return blocks * 4 + code
    nested_blocks = -(-blocks // 256)
    return blocks + code + 4 + nested_blocks * 4 + 256 * 4
