"""Assemble the trainable model: skeleton -> adapters -> checkpointing -> shard -> weights.

The order is what bounds memory: everything up to sharding happens on the meta device, so each
rank only ever materializes its own shards, and the checkpoint is read one tensor at a time.
no_shard's replicated copies skip sharding; their gradient averaging is hooked on last, onto the
adapter parameters as they will train.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from fsdpqlora import weights
from fsdpqlora.config import Config
from fsdpqlora.model import adapters
from fsdpqlora.model.directory import check_prequantized, load_hf_config
from fsdpqlora.model.families import decoder_layers, family_of
from fsdpqlora.model.host_embedding import materialize_with_host_embedding
from fsdpqlora.model.loss import attach_chunked_loss
from fsdpqlora.model.shared_input import share_inputs
from fsdpqlora.model.skeleton import (
    build_skeleton,
    checkpoint_targets,
    non_persistent_buffers,
    restore_buffers,
    retie,
    tied_parameters,
)
from fsdpqlora.parallel.activations import HostOffload, apply_activation_checkpointing
from fsdpqlora.parallel.fsdp import build_mesh, shard_model
from fsdpqlora.parallel.process_group import Dist
from fsdpqlora.parallel.replicate import average_gradients


@dataclass
class BuiltModel:
    model: PeftModel
    hf_config: object
    load_seconds: float
    load: weights.LoadStats
    # The hooks holding checkpointed layers' inputs in host memory (shard.activation_offload).
    activation_offload: HostOffload | None = None


def build_model(cfg: Config, d: Dist, model_dir: Path, shard: bool | None = None) -> BuiltModel:
    """The 4-bit base + LoRA model, sharded with FSDP2 over all ranks; whole with shard=False (for
    single-process references: nothing averaged). By default (None) as shard.uses_fsdp says: also whole on one rank,
    where there is nothing to shard and FSDP's gathered copy of each unit would only double its
    weights, and under no_shard, where every rank holds a plain copy whose adapter gradients are
    averaged over the ranks (fsdpqlora/parallel/replicate.py); unless shard.cpu_offload asks FSDP2
    to keep the weights in host memory."""
    replicated = False
    if shard is None:
        shard = cfg.shard.uses_fsdp(d.world_size)
        replicated = not shard and d.world_size > 1
    start = time.perf_counter()
    hf_config = load_hf_config(model_dir, cfg.model.trust_remote_code)
    family = family_of(hf_config)
    check_prequantized(cfg, hf_config, model_dir)  # refuses other methods and other 4-bit settings
    skeleton = build_skeleton(hf_config, cfg.model, cfg.quant)
    targets = checkpoint_targets(skeleton)
    buffers = non_persistent_buffers(skeleton)
    tied = tied_parameters(skeleton)
    # The adapter records its base: the hub id where there is one, not this machine's cache path.
    is_hub_id = bool(cfg.model.path) and not Path(cfg.model.path).expanduser().is_dir()
    base_path = cfg.model.path if is_hub_id else str(model_dir)
    model = adapters.add_lora(skeleton, cfg.adapter, base_path, family.linear_names, family.mixture_of_experts)
    if cfg.adapter.fused_shared_inputs:
        share_inputs(model, family.shared_inputs)
    layers = decoder_layers(model.base_model.model, family)
    offload = None
    if cfg.shard.activation_checkpointing:
        # A run resolves checkpoint_every=0 (auto) before building; a model built outside one checkpoints every layer.
        every = cfg.shard.checkpoint_every or 1
        offload = apply_activation_checkpointing(layers, every, cfg.shard.activation_offload)
    if shard:
        shard_model(model, layers, build_mesh(cfg.shard, d), cfg)
    if cfg.train.loss_chunk_tokens:
        attach_chunked_loss(model, cfg.train.loss_chunk_tokens)
    device = torch.device("cpu") if cfg.shard.cpu_offload else d.device
    if cfg.shard.embedding_on_host:
        materialize_with_host_embedding(model.get_base_model(), model, device, d.device)
    else:
        model.to_empty(device=device)
    retie(tied)
    restore_buffers(buffers, d.device)
    units = weights.plan_units(weights.checkpoint_entries(model_dir), targets, family, model_dir)
    stats = weights.load_weights(units, cfg, d, weights.resolve_mode(cfg, d), show_progress=d.is_main)
    adapters.init_lora_weights(model, cfg.train.seed)
    adapters.init_dora_magnitudes(model)
    if replicated:
        average_gradients(model, [p for _, p in adapters.lora_parameters(model)], int(cfg.shard.bucket_mib * 2**20))
    model.train()
    return BuiltModel(model, hf_config, time.perf_counter() - start, stats, offload)
