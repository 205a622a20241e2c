"""The cost model: the time of one optimizer step, to rank the configurations that fit.

- Compute: per token, forward 2 x (4-bit linear parameters a token passes through + head) plus
  attention 4 x seq_len/2 x q_dim per layer (causal, without packing's shorter spans); backward
  the same again for input gradients (the frozen weights need no weight gradients) and twice the
  attention; checkpointed layers run their forward again; each adapter adds 6 r (in + out). Over
  the rig's peak at EFFICIENCY (4-bit dequantization and small LoRA matmuls keep QLoRA well under
  dense training's utilization).
- Collectives: each costs a fixed latency (COLLECTIVE_LATENCY_*) plus its bytes over the link.
  FSDP2 all-gathers every decoder layer's shard for each micro-batch's forward, and
  again for its backward under full_shard (hybrid_shard within its group, no_shard never); the
  embedding, the root and the head once (the head twice for the whole-logits loss under full_shard); adapter gradients are reduce-scattered in fp32 after every micro-batch or, by default,
  once per step (no_shard and hybrid_shard all-reduce across copies: twice the bytes). A ring
  moves (n - 1)/n of the gathered bytes per GPU, at the interconnect's speed within a node, at the
  inter-node speed when the group spans nodes.
- PCIe: CPU offload copies every shard to the GPU for forward and again for backward, the adapter
  gradients back to host and the optimizer step runs on the CPU; activation offload copies the
  checkpointed inputs out and back.
- Overlap: FSDP2 prefetches the next layer's all-gather and copies on side streams, so a step takes
  the longest of the three, plus the part that cannot overlap (the root's and the embedding's gathers,
  first; or, with the embedding in host memory, each micro-batch's lookup on the CPU and the copy of
  its rows from pageable memory). CPU workers have no side streams: gloo's collectives take the cores that compute, so there
  compute and collectives add up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fsdpqlora.config import Config
from fsdpqlora.model.quant import to_dtype
from fsdpqlora.plan.arch import Architecture
from fsdpqlora.plan.memory import Levers, shard_layout
from fsdpqlora.plan.rig import Rig

# Of the rig's peak: answer.ai's fsdp_qlora measured about 33% on 4 x H100 (70B, 6N FLOPs per
# token) and about 60% on 2 x RTX 4090 (70B, 17 s per step at 2 x 2048 tokens per GPU).
EFFICIENCY = 0.4
# What a collective costs beyond its bytes (launch, synchronization, FSDP2's copies in and out):
# NCCL's tens of microseconds; gloo on CPU workers about 10 ms each in a profile of the tiny model's
# step (15% of a 1 s step waiting on some 15 collectives), half of it counted here.
COLLECTIVE_LATENCY_GPU = 50e-6
COLLECTIVE_LATENCY_CPU = 5e-3
CPU_ADAM_GBPS = 10.0  # the CPU optimizer step streams parameters, gradients and two moments
# shard.embedding_on_host: the ids wait for the GPU, the CPU looks the rows up and copies them from
# pageable memory; layer 0 needs them, so nothing overlaps it (not yet measured on a GPU)
HOST_LOOKUP_GBPS = 5.0


def gathers_per_layer(strategy: str, shards: int) -> int:
    """How often FSDP2 all-gathers each decoder layer per micro-batch: for forward, and again for
    backward where the layer was resharded after forward; never without shards to gather."""
    return {"full_shard": 2, "hybrid_shard": 2, "shard_grad_op": 1}.get(strategy, 0) if shards > 1 else 0


def collective_calls(arch: Architecture, cfg: Config, levers: Levers, shards: int, copies: int) -> int:
    """Collectives per step: FSDP2's all-gather of every unit for each pass it is gathered for and
    a reduce-scatter of every decoder layer's gradients per reduction; across copies (no_shard,
    hybrid_shard), an all-reduce per gradient bucket (a replicated base's) or per layer (FSDP2's)."""
    layers = len(arch.layers)
    micro_batches = levers.grad_accum_steps
    reductions = micro_batches if cfg.train.reduce_every_micro_batch else 1
    gathers = gathers_per_layer(levers.strategy, shards)
    calls = micro_batches * (gathers * layers + 3) + reductions * layers if gathers else 0
    if copies > 1:
        replicated = levers.strategy == "no_shard" and not levers.cpu_offload
        adapter_bytes = 4 * sum(t.numel for t in arch.tensors("adapter"))
        calls += reductions * (math.ceil(adapter_bytes / (cfg.shard.bucket_mib * 2**20)) if replicated else layers)
    return calls


@dataclass(frozen=True)
class StepTime:
    seconds: float
    compute: float
    collectives: float
    pcie: float
    tokens_per_second: float  # all workers together


def flops_per_token(arch: Architecture, cfg: Config, checkpoint_every: int) -> float:
    layers = len(arch.layers)
    experts_share = arch.experts_active / arch.experts
    # Expert linears: a token reaches experts_active of each layer's experts.
    linear = arch.quantized_params * (experts_share if arch.experts > 1 else 1.0)
    attention = 4 * (cfg.data.seq_len / 2) * arch.q_dim * layers
    layer_forward = 2 * linear + attention
    forward = layer_forward + 2 * arch.head_params
    backward = 2 * linear + 2 * attention + 2 * arch.head_params
    checkpointed = -(-layers // checkpoint_every) / layers if checkpoint_every else 0.0
    adapters = sum(6 * cfg.adapter.r * (i + o) for i, o in arch.adapted) * (experts_share if arch.experts > 1 else 1.0)
    return forward + backward + checkpointed * layer_forward + adapters


def step_time(arch: Architecture, cfg: Config, levers: Levers, rig: Rig) -> StepTime:
    world = rig.workers
    micro_batches = levers.grad_accum_steps
    tokens = levers.micro_batch_size * cfg.data.seq_len * micro_batches  # per worker per step
    compute = tokens * flops_per_token(arch, cfg, levers.checkpoint_every) / (rig.tflops * 1e12 * EFFICIENCY)

    shards = shard_layout(levers.strategy, world, cfg.shard.hybrid_shard_size, rig.gpus_per_node)
    itemsize = to_dtype(cfg.quant.compute_dtype).itemsize
    gathers = gathers_per_layer(levers.strategy, shards)
    # Decoder layers: once per pass. The embedding (unless in host memory) and the root (not resharded
    # after forward): once.
    # The head: once for the chunked loss, again for the whole logits' backward when resharded.
    head_gathers = 1 if cfg.train.loss_chunk_tokens or gathers < 2 else 2
    gathered = (
        gathers * sum(u.gathered_bytes(itemsize) for u in arch.layers)
        + (0 if levers.embedding_on_host else arch.embedding.gathered_bytes(itemsize)) + arch.root.gathered_bytes(itemsize)
        + head_gathers * arch.head.gathered_bytes(itemsize)
    )
    spans_nodes = rig.nodes > 1 and (levers.strategy in ("full_shard", "shard_grad_op"))
    shard_bandwidth = (rig.internode_gbps if spans_nodes else rig.interconnect_gbps) * 1e9
    ring = (shards - 1) / shards
    gather_seconds = micro_batches * gathered * ring / shard_bandwidth if gathers else 0.0
    adapter_numel = sum(t.numel for t in arch.tensors("adapter"))
    reductions = micro_batches if cfg.train.reduce_every_micro_batch else 1
    grad_seconds = 0.0
    if shards > 1:
        grad_seconds += reductions * 4 * adapter_numel * ring / shard_bandwidth
    copies = world // shards
    if copies > 1:
        across = (rig.internode_gbps if rig.nodes > 1 else rig.interconnect_gbps) * 1e9
        grad_seconds += reductions * 2 * 4 * adapter_numel * (copies - 1) / copies / across
    collectives = gather_seconds + grad_seconds + collective_calls(arch, cfg, levers, shards, copies) * (
        COLLECTIVE_LATENCY_GPU if rig.gpus_per_node else COLLECTIVE_LATENCY_CPU
    )

    pcie_bytes = 0.0
    cpu_seconds = 0.0
    if levers.cpu_offload and rig.gpus_per_node:
        shard_bytes = sum(t.shard_bytes(shards, 0) for t in arch.tensors("packed") + arch.tensors("frozen"))
        if levers.embedding_on_host:  # not FSDP2's to copy
            shard_bytes -= arch.embedding.shard_bytes(shards)
        passes = 2 if levers.strategy != "shard_grad_op" else 1
        pcie_bytes += micro_batches * passes * shard_bytes + 2 * 4 * adapter_numel / shards
        cpu_seconds = 16 * adapter_numel / shards / (CPU_ADAM_GBPS * 1e9)
    if levers.activation_offload and levers.checkpoint_every and rig.gpus_per_node:
        layers = -(-len(arch.layers) // levers.checkpoint_every)
        pcie_bytes += 2 * micro_batches * layers * levers.micro_batch_size * cfg.data.seq_len * arch.hidden * itemsize
    pcie = pcie_bytes / (rig.pcie_gbps * 1e9) if pcie_bytes else 0.0
    host_lookup = 0.0
    if levers.embedding_on_host and rig.gpus_per_node:  # each micro-batch's rows, before anything else runs
        rows = levers.micro_batch_size * cfg.data.seq_len * arch.hidden * itemsize
        host_lookup = micro_batches * (rows / (HOST_LOOKUP_GBPS * 1e9) + COLLECTIVE_LATENCY_GPU)

    first = arch.root.gathered_bytes(itemsize) + (0 if levers.embedding_on_host else arch.embedding.gathered_bytes(itemsize))
    exposed = first * ring / shard_bandwidth if gathers else 0.0
    overlapped = max(compute, collectives, pcie) if rig.gpus_per_node else compute + collectives
    seconds = overlapped + exposed + host_lookup + cpu_seconds
    return StepTime(seconds, compute, collectives, pcie, tokens * world / seconds)
