"""Assemble the trainable model: skeleton -> adapters -> checkpointing -> shard -> weights.

The order is what bounds memory: everything up to sharding happens on the meta device, so each
rank only ever materializes its own shards, and the checkpoint is read one tensor at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import PeftModel
from tqdm import tqdm

from fsdpqlora import adapters, weights
from fsdpqlora.distributed import Dist, apply_activation_checkpointing, build_mesh, shard_model
from fsdpqlora.model import (
    build_skeleton,
    checkpoint_targets,
    decoder_layers,
    family_of,
    init_non_persistent_buffers,
    load_hf_config,
    load_weights,
)


@dataclass
class BuiltModel:
    model: PeftModel
    hf_config: object
    load_seconds: float
    bytes_read: int


def build_model(cfg: DictConfig, d: Dist, model_dir: Path, shard: bool = True) -> BuiltModel:
    """The 4-bit base + LoRA model, sharded with FSDP2 over all ranks (or whole, with shard=False,
    for single-process references)."""
    start = time.perf_counter()
    hf_config = load_hf_config(model_dir, cfg.model.trust_remote_code)
    family = family_of(hf_config)
    skeleton = build_skeleton(hf_config, cfg)
    targets = checkpoint_targets(skeleton)
    # The adapter records its base: the hub id where there is one, not this machine's cache path.
    is_hub_id = bool(cfg.model.path) and not Path(cfg.model.path).expanduser().is_dir()
    model = adapters.add_lora(skeleton, cfg.adapter, cfg.model.path if is_hub_id else str(model_dir))
    layers = decoder_layers(model.base_model.model, family)
    if cfg.shard.activation_checkpointing:
        apply_activation_checkpointing(layers)
    if shard:
        shard_model(model, layers, build_mesh(cfg, d), cfg)
    device = torch.device("cpu") if cfg.shard.cpu_offload else d.device
    model.to_empty(device=device)
    init_non_persistent_buffers(model, d.device)
    n_tensors = sum(len(names) for names in weights.checkpoint_files(model_dir).values())
    with tqdm(total=n_tensors, desc="load", unit="tensor", disable=not d.is_main, dynamic_ncols=True) as bar:
        bytes_read = load_weights(targets, model_dir, cfg, d.device, progress=bar)
    adapters.init_lora_weights(model, cfg.train.seed)
    model.train()
    return BuiltModel(model, hf_config, time.perf_counter() - start, bytes_read)
