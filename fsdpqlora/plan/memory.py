"""The memory model: bytes per GPU and per node's host RAM for one configuration on one rig.

Sharded state (the frozen 4-bit and float weights, the adapters, their gradients and optimizer
state) is counted tensor by tensor as FSDP2 cuts it (dim 0, torch.chunk), for the rank holding the
largest shard; it is exact, and tests/integration/test_planner.py checks it against live tensors. The rest is a
model of what PyTorch keeps, stated here and in the README:

- FSDP units (fsdpqlora/parallel/fsdp.py): each decoder layer, the embedding, the head, and the
  root (the final norm, and a head tied to the embedding). FSDP2 all-gathers a decoder layer
  (packed bytes as stored, float weights cast to the compute dtype) and prefetches the next, so 2
  layers are whole at once; shard_grad_op keeps every layer whole from its forward until its
  backward. The root is not resharded after forward (FSDP2's rule for the root, which fsdp.py
  keeps) and stays whole all step. The embedding is whole only at the start of forward, when little
  else is held; the head only for the loss at the end of forward. One rank trains the plain module
  (no FSDP, nothing gathered) unless it offloads to the CPU; so does each rank under no_shard
  without CPU offload (a replicated base, fsdpqlora/parallel/replicate.py), plus the fp32 buckets
  its gradients are averaged in (the adapter's gradients again, in fp32).
- CPU offload: each gathered unit's shard is first copied to the GPU (2 layers' in flight, and the
  head's for the loss); in host RAM, FSDP2 pins every shard and the gradients it copies back, each
  a block that torch's pinned allocator rounds up to a power of two, and pinning a loaded shard
  copies it (the largest one at a time).
- shard.embedding_on_host: the input embedding table leaves the GPU and FSDP2 for each worker's
  host RAM, whole (fsdpqlora/model/host_embedding.py).
- activations per token and decoder layer, without checkpointing (bf16 compute, `b` bytes each):
  the two RMSNorms keep an fp32 copy and a `b`-byte output (6H each), q/k/v (b(Q+2K)), rotary
  q/k (b(Q+K)), attention output and o_proj input (2bQ), gate/up/activation/product (4bI, times
  the experts a token visits in a mixture of experts); each adapted linear its r-wide LoRA hidden
  (b r) and, with dropout, a dropped input and mask ((b+1) x in) per input: one per linear, one
  per group of linears reading the same input (q/k/v, gate/up) with adapter.fused_shared_inputs. A checkpointed layer keeps only
  its input (bH); activation offload moves those inputs to host RAM (2 stay on the GPU, in flight).
- the peak adds the larger of: one layer recomputed in backward (its activations again and the
  gradients flowing through it: RECOMPUTE_PEAK x its activations; without checkpointing only the
  gradients, GRADIENTS_PEAK x; both measured, see the constants) with the largest 4-bit weight
  dequantized whole in the compute dtype (bitsandbytes does so for every product), or the loss
  at the end of forward: the head gathered and one chunk of train.loss_chunk_tokens tokens'
  logits (bf16 logits, their fp32 copy, log-sum-exp's temporary and the gradient: 12 bytes per
  token and vocabulary entry) plus the hidden states' gradient it keeps for backward; with
  loss_chunk_tokens=0 the whole logits (12 bytes per token and vocabulary entry: bf16 logits,
  their fp32 copy and log-softmax, then its gradient).
- buffers: the packed rows' block-diagonal attention mask (1 byte per token pair of a row).
- the reserved peak, the one that runs out (torch.cuda.max_memory_reserved, what torch's counters
  and other tools' reports show): 10% of the allocated bytes for the caching allocator's rounding
  and fragmentation; on top of it, outside torch's counters but on the card, 0.75 GiB for the CUDA
  context and kernels (per GPU): a run fits when both fit; each worker process holds about 1.0 GiB of host RAM on a GPU machine
  (CUDA runtime, libraries) and 0.5 GiB on a CPU-only one, whose workers' host bytes get a 5%
  allowance instead (HOST_FRAGMENTATION).
- host RAM per node: the workers' processes, loading's read-ahead ((model.load_workers + 1) x the
  largest tensor a rank reads at once; on CPU plus bitsandbytes' quantizer temporaries, 7x the
  largest 4-bit weight; freed before the first step, so counted only beyond the step's own
  transient memory in host RAM), and what the levers put there: CPU offload (shards, gradients, optimizer
  state), paged optimizers (their state, counted all on host: the worst case), offloaded activations.
  On a CPU-only machine everything above lives in host RAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from fsdpqlora.config import Config
from fsdpqlora.model.quant import to_dtype
from fsdpqlora.plan.arch import Architecture
from fsdpqlora.plan.rig import Rig

GIB = 2**30
CUDA_CONTEXT = 0.75 * GIB
FRAGMENTATION = 0.10
# CPU workers' allowance over the host bytes counted: large tensors each get their own mapping from
# the C allocator, which leaves little unused; benchmarks/memory.py measured 0.95-1.01 of the bytes
# counted without any allowance (peak RSS per worker, Llama 3's vocabulary, 2 small layers).
HOST_FRAGMENTATION = 0.05
PROCESS_GPU = 1.0 * GIB
PROCESS_CPU = 0.5 * GIB
BNB_QUANTIZER_TEMPORARIES = 7
LOSS_BYTES_PER_LOGIT = 12
# Backward's peak beyond what forward kept and the dequantized weight, in one decoder layer's
# activations: with checkpointing (the layer recomputed, then the gradients through it) and without
# (the gradients alone). benchmarks/backward_peak.py measured at most 1.07 and 0.22 on the real
# model build (fp32, CPU); the margin is for what CUDA kernels add (attention's and matmuls' workspaces).
RECOMPUTE_PEAK = 1.15
GRADIENTS_PEAK = 0.25
RESERVED = "reserved, not allocated: 10% fragmentation"
CUDA_CONTEXT_NAME = "CUDA context (outside torch's counters)"
LOADING = "loading: read-ahead beyond the step's peak"
# the memory a step holds for a while (what loading's freed buffers are reused for)
STEP_TRANSIENT = ("all-gathered", "CPU offload", "activations", "peak:", "attention mask")
# bitsandbytes' 8-bit optimizers keep tensors under this many elements in 32-bit state, and quantize
# the rest in blocks of 256 (one float32 absmax per block per state).
BNB_MIN_8BIT_SIZE = 4096
BNB_8BIT_BLOCK = 256


@dataclass(frozen=True)
class Levers:
    """The settings the planner turns (the rest of the configuration stays as given)."""

    strategy: str
    cpu_offload: bool
    checkpoint_every: int  # 0: no activation checkpointing
    activation_offload: bool
    embedding_on_host: bool
    optimizer: str
    micro_batch_size: int
    grad_accum_steps: int

    @classmethod
    def of(cls, cfg: Config) -> Levers:
        s, t = cfg.shard, cfg.train
        return cls(
            strategy=s.strategy,
            cpu_offload=s.cpu_offload,
            # auto (0) not yet resolved (fsdpqlora/plan/checkpointing.py): at most every layer
            checkpoint_every=(s.checkpoint_every or 1) if s.activation_checkpointing else 0,
            activation_offload=s.activation_offload and s.activation_checkpointing,
            embedding_on_host=s.embedding_on_host,
            optimizer=t.optimizer,
            micro_batch_size=t.micro_batch_size,
            grad_accum_steps=t.grad_accum_steps,
        )

    def overrides(self) -> list[str]:
        return [
            f"shard={self.strategy}",
            f"shard.cpu_offload={str(self.cpu_offload).lower()}",
            f"shard.activation_checkpointing={str(self.checkpoint_every > 0).lower()}",
            *([f"shard.checkpoint_every={self.checkpoint_every}"] if self.checkpoint_every else []),
            f"shard.activation_offload={str(self.activation_offload).lower()}",
            f"shard.embedding_on_host={str(self.embedding_on_host).lower()}",
            f"train.optimizer={self.optimizer}",
            f"train.micro_batch_size={self.micro_batch_size}",
            f"train.grad_accum_steps={self.grad_accum_steps}",
        ]


@dataclass
class Breakdown:
    """Bytes per GPU (the fullest one) and per node's host RAM, line by line."""

    gpu: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    gpu_capacity: int = 0
    host_capacity: int = 0
    # sharded state of every rank, for checks against live tensors: kind -> bytes per rank (FSDP2's:
    # an embedding table kept in host memory is not in it)
    per_rank: dict[str, list[int]] = field(default_factory=dict)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def gpu_reserved(self) -> int:
        """What torch.cuda.max_memory_reserved should report: all but the CUDA context."""
        return self.gpu_total - self.gpu.get(CUDA_CONTEXT_NAME, 0)

    @property
    def gpu_allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should report: the reserved peak less fragmentation."""
        return self.gpu_reserved - self.gpu.get(RESERVED, 0)

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def fits(self) -> bool:
        return self.gpu_total <= self.gpu_capacity and self.host_total <= self.host_capacity


def shard_layout(strategy: str, world: int, hybrid_shard_size: int, gpus_per_node: int) -> int:
    """How many ranks share one copy of the sharded state."""
    if strategy == "no_shard":
        return 1
    if strategy == "hybrid_shard":
        return hybrid_shard_size or gpus_per_node or world
    return world


@cache
def sharded_bytes(arch: Architecture, kind: str, shards: int, index: int) -> int:
    """Bytes of shard `index` of every tensor of this kind (cached: the search asks many times)."""
    return sum(t.shard_bytes(shards, index) for t in arch.tensors(kind))


@cache
def optimizer_bytes(arch: Architecture, optimizer: str, shards: int, index: int) -> int:
    """Optimizer state of this rank's adapter shards: torch AdamW keeps two moments in the
    parameter's dtype and a float32 step per parameter; bitsandbytes' 8-bit AdamW keeps one byte
    per element and moment plus a float32 absmax per 256 elements (32-bit state for tensors under
    4096 elements) and its 256-entry float32 quantization map per moment."""
    total = 0
    eight_bit = optimizer.endswith("8bit")
    for t in arch.tensors("adapter"):
        local = t.shard_bytes(shards, index)
        numel = local // t.itemsize
        if not eight_bit:
            total += 2 * local + 4
        elif t.numel < BNB_MIN_8BIT_SIZE:
            total += 2 * numel * 4
        else:
            total += 2 * (numel + -(-numel // BNB_8BIT_BLOCK) * 4)
    return total + (2 * 256 * 4 if eight_bit else 0)


def checkpoint_bytes(arch: Architecture, optimizer: str) -> int:
    """About what one resumable checkpoint takes on disk: the adapter twice (the training state and
    the PEFT copy beside it), the optimizer's state over all shards, and a MiB for the metadata and
    each rank's random state."""
    adapter = sum(t.nbytes for t in arch.tensors("adapter"))
    return 2 * adapter + optimizer_bytes(arch, optimizer, 1, 0) + 2**20


@cache
def pinned_bytes(arch: Architecture, kind: str, shards: int) -> int:
    """Rank 0's shards of every tensor of this kind, each in a pinned block of a power of two bytes."""
    return sum(pinned_block(t.shard_bytes(shards, 0)) for t in arch.tensors(kind))


def pinned_block(nbytes: int) -> int:
    """What torch's pinned allocator takes for `nbytes`: a block of the next power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes else 0


def activation_bytes_per_token(arch: Architecture, cfg: Config) -> int:
    """Bytes one token keeps for backward in one decoder layer without checkpointing."""
    b = to_dtype(cfg.quant.compute_dtype).itemsize
    h, q, k, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    norms = 2 * (4 * h + b * h)
    attention = b * (q + 2 * k) + b * (q + k) + 2 * b * q
    mlp = 4 * b * i * arch.experts_active
    adapters = b * cfg.adapter.r * (len(arch.adapted) // len(arch.layers))
    if cfg.adapter.dropout > 0:
        adapters += sum((b + 1) * in_features for in_features in arch.dropped_inputs)
    if arch.experts > 1:  # a token reaches only the experts it is routed to
        adapters = adapters * arch.experts_active // arch.experts
    return norms + attention + mlp + adapters


def estimate(arch: Architecture, cfg: Config, levers: Levers, rig: Rig) -> Breakdown:
    world = rig.workers
    shards = shard_layout(levers.strategy, world, cfg.shard.hybrid_shard_size, rig.gpus_per_node)
    on_gpu = rig.gpus_per_node > 0
    compute = to_dtype(cfg.quant.compute_dtype).itemsize
    tokens = levers.micro_batch_size * cfg.data.seq_len
    layers = len(arch.layers)

    per_rank = {
        kind: [sharded_bytes(arch, kind, shards, i) for i in range(shards)] for kind in ("packed", "frozen", "adapter")
    }
    # shard.embedding_on_host: the table leaves FSDP2 (and the GPU) for each worker's host RAM, whole
    table_on_host = arch.embedding.bytes() if levers.embedding_on_host else 0
    if table_on_host:
        per_rank["frozen"] = [b - sum(t.shard_bytes(shards, i) for t in arch.embedding.tensors) for i, b in enumerate(per_rank["frozen"])]
    per_rank["optimizer"] = [optimizer_bytes(arch, levers.optimizer, shards, i) for i in range(shards)]
    per_rank["quant_state"] = [sum(u.quant_state_bytes for u in arch.units)] * shards
    adapter_numel = sum(t.numel for t in arch.tensors("adapter"))
    # Without a reduce-scatter per micro-batch, FSDP2 accumulates whole fp32 gradients until the last.
    unsharded_grads = 4 * adapter_numel if levers.grad_accum_steps > 1 and not cfg.train.reduce_every_micro_batch else 0

    sharded = {
        "4-bit weights, packed (shard)": per_rank["packed"][0],
        "embeddings, norms, head (shard)": per_rank["frozen"][0],
        "adapter weights (shard)": per_rank["adapter"][0],
        "adapter gradients (shard)": per_rank["adapter"][0],
    }
    optimizer = {f"optimizer state ({levers.optimizer})": per_rank["optimizer"][0]}
    offloaded = dict(sharded) if levers.cpu_offload else {}
    if levers.cpu_offload and on_gpu:
        # FSDP2 pins every offloaded shard (and the gradients it copies back), one block each, which
        # torch's pinned allocator rounds up to a power of two; pinning copies each loaded shard.
        kinds = ("packed", "frozen", "adapter", "adapter")
        offloaded = {name: pinned_bytes(arch, kind, shards) for name, kind in zip(sharded, kinds, strict=True)}
        if table_on_host:
            offloaded["embeddings, norms, head (shard)"] -= sum(pinned_block(t.shard_bytes(shards, 0)) for t in arch.embedding.tensors)
        offloaded["CPU offload: pinning's copy of a shard"] = max(t.shard_bytes(shards, 0) for t in arch.tensors("packed"))
    paged = levers.optimizer.startswith("paged") or levers.cpu_offload

    # One rank trains the plain module (nothing to shard), unless FSDP2 is what offloads it; so does
    # every rank under no_shard, whose replicas average the adapter's gradients from fp32 buckets.
    replicated = world > 1 and levers.strategy == "no_shard" and not levers.cpu_offload
    fsdp = (world > 1 and not replicated) or levers.cpu_offload
    device: dict[str, int] = {}
    device.update({k: 0 if levers.cpu_offload else v for k, v in sharded.items()})
    device["quantization state (whole)"] = per_rank["quant_state"][0]
    device.update({k: 0 if paged else v for k, v in optimizer.items()})
    device["unsharded gradients (accumulation)"] = unsharded_grads if fsdp else 0
    device["gradient buckets (replicas' all-reduce)"] = 4 * adapter_numel if replicated else 0
    held_layers = layers if levers.strategy == "shard_grad_op" else min(2, layers)
    largest_layer = max(u.gathered_bytes(compute) for u in arch.layers)
    device[f"all-gathered: {held_layers} decoder layer(s)"] = held_layers * largest_layer if fsdp else 0
    root = "final norm, tied head" if not arch.head.tensors else "final norm"
    device[f"all-gathered: root ({root})"] = arch.root.gathered_bytes(compute) if fsdp else 0
    # each gathered unit's shard is first copied to the GPU
    staged = held_layers * max(u.shard_bytes(shards) for u in arch.layers) if levers.cpu_offload and on_gpu else 0
    device[f"CPU offload: {held_layers} shard(s) staged on the GPU"] = staged

    per_token_layer = activation_bytes_per_token(arch, cfg)
    checkpointed = -(-layers // levers.checkpoint_every) if levers.checkpoint_every else 0
    checkpoint_inputs = checkpointed * tokens * arch.hidden * compute
    on_host_activations = max(0, checkpointed - 2) * tokens * arch.hidden * compute if levers.activation_offload else 0
    device["activations saved for backward"] = (
        (layers - checkpointed) * tokens * per_token_layer + checkpoint_inputs - on_host_activations
    )
    backward_name = "peak: one layer recomputed in backward" if checkpointed else "peak: one layer's gradients in backward"
    recompute = backward_peak_bytes(arch, cfg, tokens, checkpointed > 0)
    loss_name, loss = loss_peak(arch, cfg, tokens, compute)
    if fsdp:  # the head's unit is gathered for the loss (a tied head is the root's, counted above)
        loss += arch.head.gathered_bytes(compute)
        if levers.cpu_offload and on_gpu:
            loss += arch.head.shard_bytes(shards)
    device[loss_name] = loss if loss >= recompute else 0
    device[backward_name] = recompute if loss < recompute else 0
    device["attention mask (packed rows)"] = levers.micro_batch_size * cfg.data.seq_len**2

    procs = rig.gpus_per_node or rig.cpu_workers
    host: dict[str, int] = {}
    host["worker processes"] = procs * (PROCESS_GPU if on_gpu else PROCESS_CPU)
    # Loading's buffers are freed before the first step: they count only beyond what the step itself
    # holds for a while in the same memory (on CPU workers, everything a GPU would hold for a step).
    transient = (
        sum(v for k, v in device.items() if k.startswith(STEP_TRANSIENT)) if not on_gpu else on_host_activations
    )
    host[LOADING] = procs * max(0, loading_bytes(arch, cfg, shards, on_gpu, levers.embedding_on_host) - transient)
    host_state = dict(offloaded)
    if paged:
        host_state.update(optimizer)
    host_state["offloaded activations"] = on_host_activations
    host_state["input embedding in host memory (whole)"] = table_on_host
    for name, value in host_state.items():
        host[name] = procs * value

    breakdown = Breakdown(per_rank=per_rank)
    if on_gpu:
        allocated = sum(device.values())
        device[RESERVED] = int(FRAGMENTATION * allocated)
        device[CUDA_CONTEXT_NAME] = int(CUDA_CONTEXT)
        breakdown.gpu = device
        breakdown.gpu_capacity = int(rig.gpu_memory_gib * GIB)
    else:  # CPU workers: what a GPU would hold is in each worker's host memory
        for name, value in device.items():
            host[f"worker: {name}"] = procs * value
        host["allowance: 5% fragmentation"] = int(HOST_FRAGMENTATION * sum(host.values()))
        breakdown.gpu_capacity = 0
    breakdown.host = host
    breakdown.host_capacity = int(rig.host_memory_gib * GIB)
    return breakdown


def backward_peak_bytes(arch: Architecture, cfg: Config, tokens: int, checkpointed: bool) -> int:
    """What backward adds at its peak beyond what forward kept, in one decoder layer of `tokens`
    tokens: a share of the layer's activations (recomputed ones and the gradients, or the gradients
    alone) and the largest 4-bit weight dequantized whole in the compute dtype, as bitsandbytes does
    for each product."""
    share = RECOMPUTE_PEAK if checkpointed else GRADIENTS_PEAK
    dequantized = 2 * max((t.nbytes for t in arch.tensors("packed")), default=0) * to_dtype(cfg.quant.compute_dtype).itemsize
    return int(share * tokens * activation_bytes_per_token(arch, cfg)) + dequantized


def loss_peak(arch: Architecture, cfg: Config, tokens: int, compute: int) -> tuple[str, int]:
    """The loss's own bytes at its peak, at the end of forward: one chunk's logits (bf16 logits, their
    fp32 copy, log-sum-exp's temporary and the gradient: 12 bytes per token and vocabulary entry)
    and, kept for backward, the target tokens' hidden states, their gradient (fp32) and its scatter
    into the whole sequence; or, with train.loss_chunk_tokens=0, the whole logits (12 bytes per token and
    entry, which the logits' backward then holds)."""
    chunk = cfg.train.loss_chunk_tokens
    if not chunk:
        return "peak: logits + loss (whole)", LOSS_BYTES_PER_LOGIT * tokens * arch.vocab
    at_once = min(chunk, tokens)
    return (
        f"peak: head + loss ({at_once} tokens at once)",
        LOSS_BYTES_PER_LOGIT * at_once * arch.vocab + tokens * arch.hidden * (4 + 2 * compute),
    )


def dominant(breakdown: Breakdown) -> tuple[str, float]:
    """The largest term of the GPU's (or, on CPU workers, the host's) memory, and its share."""
    lines = breakdown.gpu or breakdown.host
    name = max(lines, key=lines.get)
    return name, lines[name] / max(1, sum(lines.values()))


def loading_bytes(arch: Architecture, cfg: Config, shards: int, on_gpu: bool, table_on_host: bool) -> int:
    """Host bytes loading holds at its peak beyond the process: the read-ahead queue of whole 4-bit
    weights (quantized whole) and of 16-bit tensors' own rows (all of an embedding table kept in
    host memory, which is not sharded), and on CPU bitsandbytes' temporaries."""
    model_itemsize = to_dtype(cfg.model.dtype).itemsize
    # a packed tensor holds half a byte per weight, whatever its storage dtype
    largest_4bit = max((2 * t.nbytes * model_itemsize for t in arch.tensors("packed")), default=0)
    largest_float = max((t.shard_bytes(shards, 0) for t in arch.tensors("frozen")), default=0)
    largest = max(largest_4bit, largest_float)
    read_ahead = (cfg.model.load_workers + 1) * largest
    if table_on_host:  # read whole on every worker, the other tensors in flight beside it
        read_ahead = max(read_ahead, arch.embedding.bytes() + cfg.model.load_workers * largest)
    return read_ahead + (0 if on_gpu else BNB_QUANTIZER_TEMPORARIES * largest_4bit)
