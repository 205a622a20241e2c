"""The configuration schema: the single source of truth for every default.

The YAML files under conf/ only select presets and override fields of these dataclasses; Hydra
checks every key and type against them while composing, closed choices included (each an Enum:
a wrong name fails there, listing the choices). Each section's `check` then checks the values
that types cannot express (ranges, combinations within the section), and `Config.check` the
combinations across sections, so that a bad configuration fails in the launcher, with the key
named, before any worker is spawned.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fsdpqlora.errors import ConfigError


class Choice(str, enum.Enum):
    """A closed choice: compares, hashes and prints as its name, so that `cfg.shard.strategy ==
    "full_shard"` and f-strings read as the YAML does. Names equal values (Hydra matches by name)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StorageDType(Choice):
    uint8 = "uint8"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class LoadMode(Choice):
    auto = "auto"
    every_rank = "every_rank"
    rank0_broadcast = "rank0_broadcast"


class QuantType(Choice):
    nf4 = "nf4"
    fp4 = "fp4"


class AdapterMethod(Choice):
    lora = "lora"
    dora = "dora"


class ShardStrategy(Choice):
    full_shard = "full_shard"
    shard_grad_op = "shard_grad_op"
    hybrid_shard = "hybrid_shard"
    no_shard = "no_shard"


class DataFormat(Choice):
    alpaca = "alpaca"
    chat = "chat"
    text = "text"
    template = "template"


class Batching(Choice):
    packed = "packed"
    length_grouped = "length_grouped"
    padded = "padded"


class Truncation(Choice):
    cut = "cut"
    drop = "drop"
    split = "split"


class OnBadRow(Choice):
    error = "error"
    skip = "skip"


class Schedule(Choice):
    cosine = "cosine"
    constant = "constant"
    linear = "linear"


class Optimizer(Choice):
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"
    paged_adamw = "paged_adamw"
    paged_adamw_8bit = "paged_adamw_8bit"


class OnNonfinite(Choice):
    stop = "stop"
    skip = "skip"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LoggerKind(Choice):
    jsonl = "jsonl"
    wandb = "wandb"
    tensorboard = "tensorboard"


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


def shown(value):
    """A configuration value as the user writes it: a choice as its name (for `{...!r}` in messages)."""
    return value.value if isinstance(value, Choice) else value


class Checks:
    """`require` for one section: the refusal names the key and its value as the user wrote it."""

    def __init__(self, section: str, values):
        self.section, self.values = section, values

    def require(self, ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{key}={shown(getattr(self.values, key))!r}: {problem}")


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A local model directory or a hub id. Empty for `tiny`, which is built locally on first use.
    path: str = ""
    # dtype of the frozen non-quantized weights (embeddings, norms, head) and of the weights
    # handed to the quantizer.
    dtype: DType = DType.bfloat16
    trust_remote_code: bool = False
    # How checkpoint bytes reach the ranks: every_rank (each reads the files), rank0_broadcast (rank
    # 0 reads and broadcasts), or auto: every_rank on one node, rank0_broadcast across nodes.
    load_mode: LoadMode = LoadMode.auto
    # Threads reading tensors ahead of the quantizer; host memory holds up to this many + 1 tensors.
    load_workers: int = 2

    def check(self) -> None:
        c = Checks("model", self)
        c.require(self.load_workers >= 1, "load_workers", "must be >= 1")
        c.require(self.name == "tiny" or bool(self.path), "path", "is empty; give a local directory or a hub id")


@dataclass
class QuantConfig:
    quant_type: QuantType = QuantType.nf4
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: DType = DType.bfloat16
    # dtype the packed 4-bit bytes are stored in. uint8 is never cast by FSDP2 mixed precision.
    storage_dtype: StorageDType = StorageDType.uint8

    def check(self) -> None:
        c = Checks("quant", self)
        c.require(self.blocksize in (64, 128, 256, 512, 1024, 2048, 4096), "blocksize", "must be a power of two from 64 to 4096")
        # FSDP2 all-gathers float storage through its mixed-precision cast, which rewrites packed
        # 4-bit bytes (bitsandbytes issue 1945); only storage equal to the compute dtype is left alone.
        c.require(
            self.storage_dtype in (StorageDType.uint8, self.compute_dtype),
            "storage_dtype",
            f"float storage must equal quant.compute_dtype ({self.compute_dtype}) or FSDP's cast corrupts the packed bytes; use uint8",
        )


@dataclass
class AdapterConfig:
    # lora, or dora (QDoRA: LoRA plus a trained magnitude per output feature).
    method: AdapterMethod = AdapterMethod.lora
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Attribute names of the linears to adapt; `all-linear` is every 4-bit linear of the model's
    # family (attention and MLP, every expert of a mixture-of-experts; never the head or router).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # dtype of the trainable adapter weights (the optimizer's master copy).
    dtype: DType = DType.float32
    # Linears that read the same input (q_proj/k_proj/v_proj, gate_proj/up_proj) compute their LoRA A
    # products in one matrix product and draw one dropout mask per input, where peft draws one per
    # module: the masks' random numbers were 15-18% of a CPU step. Each module still sees dropout of
    # rate `dropout` on its input, but the modules of a group see the same mask (correlated, where
    # peft's are independent). With dropout 0 the forward is peft's (bit for bit in the tests). The
    # saved adapter is peft's either way; false: peft's per-module masks and products. Not for DoRA.
    fused_shared_inputs: bool = True

    def check(self, compute_dtype: DType) -> None:
        c = Checks("adapter", self)
        c.require(self.r > 0, "r", "must be a positive integer")
        c.require(self.alpha > 0, "alpha", "must be positive")
        c.require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        c.require(len(self.target_modules) > 0, "target_modules", "must name at least one module")
        # The adapter is the optimizer's master copy: in fp16, updates smaller than fp16's resolution
        # vanish, and the gradient scaler refuses to unscale fp16 gradients.
        c.require(self.dtype != DType.float16, "dtype", "fp16 master weights lose small updates; use float32 (precision=fp16 does)")
        c.require(
            not (self.dtype == DType.bfloat16 and compute_dtype == DType.float16),
            "dtype",
            "bfloat16 adapters cast to float16 compute lose range and precision twice; use float32 with float16 compute",
        )


@dataclass
class ShardConfig:
    # How the workers share the model, with FSDP2 (fsdpqlora/parallel/fsdp.py): full_shard (frozen
    # weights, adapter, gradients and optimizer state sharded; gathered layers freed after forward),
    # shard_grad_op (gathered layers kept until backward), hybrid_shard (sharded inside a group,
    # replicated across groups); or no_shard: every worker holds the whole model and adapter, without
    # FSDP, and only the adapter's gradients are averaged, DDP-style (fsdpqlora/parallel/replicate.py).
    # no_shard with shard.cpu_offload stays FSDP2, over shard groups of one: its offload is FSDP's.
    strategy: ShardStrategy = ShardStrategy.full_shard
    # Size of the shard group for hybrid_shard; 0 means "the GPUs of one node" (all local ranks).
    hybrid_shard_size: int = 0
    # Recompute decoder layers in backward instead of keeping their activations (false: never).
    activation_checkpointing: bool = True
    # Checkpoint every k-th decoder layer only (1: every layer); the others keep their
    # activations, less recompute for more memory. 0 (auto): as few layers as memory needs, chosen
    # by the planner for the machine before the workers start: none, every 4th, 2nd or every layer.
    checkpoint_every: int = 0
    # With checkpointing: the checkpointed layers' saved inputs wait in host memory until
    # backward (copied on a side stream, overlapped with compute, where CUDA exists).
    activation_offload: bool = False
    # Sharded frozen weights, adapter weights, gradients and optimizer state live in host memory
    # and are copied to the GPU per layer (FSDP2's CPUOffloadPolicy).
    cpu_offload: bool = False
    # The input embedding table stays whole in each worker's host memory: token ids are looked up
    # there and only their rows are copied to the GPU (fsdpqlora/model/host_embedding.py). Not for
    # a head tied to the embedding, which the loss needs on the GPU.
    embedding_on_host: bool = False
    # no_shard: adapter gradients are averaged in buckets of about this many MiB, each started in
    # backward as soon as its gradients are ready. Smaller buckets start sooner and overlap more of
    # backward (one bucket holding the whole adapter overlaps nothing), at a collective each.
    bucket_mib: float = 25.0

    def check(self) -> None:
        c = Checks("shard", self)
        c.require(self.hybrid_shard_size >= 0, "hybrid_shard_size", "must be >= 0")
        c.require(self.bucket_mib > 0, "bucket_mib", "must be positive")
        c.require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (1: every decoder layer, 0: auto)")
        c.require(
            self.activation_checkpointing or not self.activation_offload,
            "activation_offload",
            "offloads the inputs that checkpointing saves; set shard.activation_checkpointing=true",
        )

    def uses_fsdp(self, world_size: int) -> bool:
        """Whether the model is sharded with FSDP2: on several workers under every strategy but
        no_shard, whose copies are plain (fsdpqlora/parallel/replicate.py), and wherever
        shard.cpu_offload asks for FSDP2's offload, one worker included."""
        return self.cpu_offload or (world_size > 1 and self.strategy != ShardStrategy.no_shard)

    def shard_group_size(self, world_size: int, local_world_size: int) -> int:
        """Ranks that share one copy of the sharded state: all of them for full_shard and
        shard_grad_op, one for no_shard, and for hybrid_shard shard.hybrid_shard_size (default: a
        node's ranks), which must divide the world size."""
        if self.strategy in (ShardStrategy.full_shard, ShardStrategy.shard_grad_op):
            return world_size
        if self.strategy == ShardStrategy.no_shard:
            return 1
        size = self.hybrid_shard_size or local_world_size
        if world_size % size:
            raise ConfigError(f"shard.hybrid_shard_size={size}: must divide the {world_size} workers")
        return size


# The longest sequence data.seq_len=0 (auto) chooses: long enough for most instruction and chat data,
# and the context QLoRA recipes train with.
AUTO_SEQ_LEN_CAP = 2048


@dataclass
class DataConfig:
    name: str = "pydoc_qa"
    # Where the rows are: a local file (.jsonl, .json, .parquet, .csv, .txt), a directory of them
    # (split by file name: train*, test*, validation*), or a hub data set name (needs a network).
    # Empty for the built-in `pydoc_qa` and `pydoc_text`, made from Python's own docs.
    path: str = ""
    # Hub data sets: the configuration ("subset") to load, if it has several.
    subset: str = ""
    split: str = "train"
    # 0 keeps every row; N keeps the first N rows.
    max_examples: int = 0
    # alpaca (instruction/input/output), chat (messages), text (pre-training), template (yours).
    format: DataFormat = DataFormat.alpaca
    # chat: the field holding the messages ([{role, content}] or ShareGPT's [{from, value}]); the
    # template: auto (the tokenizer's, or a built-in one when it has none), builtin, or a Jinja
    # file. A transcript stored as one string is split where the markers start each turn (text
    # before the first marker is a system message), e.g. "### Human:" and "### Assistant:".
    messages_field: str = "messages"
    chat_template: str = "auto"
    user_marker: str = ""
    assistant_marker: str = ""
    # text: the field holding the text.
    text_field: str = "text"
    # template: Python format strings over the row's fields, e.g. "Q: {question}\nA: " and "{answer}".
    prompt_template: str = ""
    completion_template: str = ""
    # Loss on the prompt too; off, only completions (alpaca output, assistant turns) are trained on.
    train_on_prompt: bool = False
    # Tokens per row (packed) or per example at most; 0 (auto): the longest of AUTO_SEQ_LEN_CAP,
    # half of it, ... down to 256 that the model allows (max_position_embeddings) and at which the
    # planner finds the configuration fits this machine (the rig, for `fsdpqlora plan`).
    seq_len: int = 0
    # An example longer than seq_len: cut (keep its beginning), drop it, or split it into windows
    # (text format: every token is trained on).
    truncation: Truncation = Truncation.cut
    # A row the format cannot use: error (name it and stop) or skip (count it in the log).
    on_bad_row: OnBadRow = OnBadRow.error
    # packed (several examples per row, no attention across them), length_grouped (padded batches
    # of similar lengths), padded (random batches, padded to the longest).
    batching: Batching = Batching.packed
    # Evaluation data: a split of `path` (test, validation) or a file, or a fraction of the
    # training rows held out (seeded). Neither: no evaluation.
    eval_split: str = ""
    eval_fraction: float = 0.0

    def check(self, model_max_positions: int | None = None) -> None:
        c = Checks("data", self)
        c.require(
            self.truncation != Truncation.split or self.format == DataFormat.text,
            "truncation",
            "split is for the text format; cut in pieces, an example loses its prompt",
        )
        c.require(
            bool(self.user_marker) == bool(self.assistant_marker),
            "assistant_marker" if self.user_marker else "user_marker",
            "is empty; splitting transcripts into turns needs both data.user_marker and data.assistant_marker",
        )
        if self.format == DataFormat.template:
            from fsdpqlora.data.formats import template_fields

            c.require(bool(self.completion_template), "completion_template", "is empty; the template format needs one, e.g. '{answer}'")
            template_fields(self.prompt_template, "data.prompt_template")
            template_fields(self.completion_template, "data.completion_template")
        c.require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        c.require(not (self.eval_split and self.eval_fraction), "eval_fraction", "give data.eval_split or data.eval_fraction, not both")
        c.require(self.seq_len == 0 or self.seq_len >= 16, "seq_len", "must be at least 16 (or 0: auto)")
        if model_max_positions is not None and self.seq_len:
            c.require(
                self.seq_len <= model_max_positions,
                "seq_len",
                f"exceeds the model's limit of {model_max_positions} positions (max_position_embeddings)",
            )
        c.require(self.max_examples >= 0, "max_examples", "must be >= 0")


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 5
    # How long the run is: exactly max_steps optimizer steps, or, with max_steps=0 (the default),
    # `epochs` passes over the training data (rounded up to whole steps; the launcher says how many).
    max_steps: int = 0
    epochs: float = 1.0
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    # adamw (torch's, fused on CUDA), or bitsandbytes' adamw_8bit, paged_adamw, paged_adamw_8bit
    # (the QLoRA paper's paged optimizers: state moves to host memory under GPU memory pressure).
    optimizer: Optimizer = Optimizer.adamw
    # Gradient accumulation: reduce-scatter adapter gradients after every micro-batch (sharded
    # gradients, more communication) or only after the last one (the default: LoRA gradients are
    # small, so keeping them unsharded costs little memory and saves grad_accum_steps - 1 collectives).
    reduce_every_micro_batch: bool = False
    # The head and the loss are computed this many target tokens at a time, so only one chunk's
    # logits exist at once (fsdpqlora/model/loss.py); 0: the whole logits tensor at once (12 bytes
    # per token and vocabulary entry: 5.9 GiB for Llama 3 at 2 x 2,048 tokens), for comparison.
    loss_chunk_tokens: int = 256
    seed: int = 42
    # Deterministic kernels on GPUs (fsdpqlora/train/determinism.py): the same run, on the same
    # machine and number of GPUs, repeats its losses bit for bit, at some speed. CPU runs always do.
    deterministic: bool = False
    log_every: int = 1
    # Evaluation loss every N steps and at the end; 0: at the end only. Needs evaluation data
    # (data.eval_split or data.eval_fraction).
    eval_every: int = 0

    def check(self) -> None:
        c = Checks("train", self)
        c.require(self.lr > 0, "lr", "must be positive")
        c.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        c.require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        c.require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        c.require(self.max_steps >= 0, "max_steps", "must be >= 0 (0: train.epochs passes over the data)")
        c.require(self.epochs > 0, "epochs", "must be positive")
        c.require(self.micro_batch_size > 0, "micro_batch_size", "must be positive")
        c.require(self.grad_accum_steps > 0, "grad_accum_steps", "must be positive")
        c.require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 turns clipping off)")
        c.require(self.loss_chunk_tokens >= 0, "loss_chunk_tokens", "must be >= 0 (0: the whole logits at once)")
        c.require(self.log_every > 0, "log_every", "must be positive")
        c.require(self.eval_every >= 0, "eval_every", "must be >= 0 (0: evaluate at the end only)")


@dataclass
class CheckpointConfig:
    # A resumable checkpoint (adapter, optimizer, schedule, data position, RNG) after every this
    # many optimizer steps, and after this many minutes since the last one; 0 turns either off.
    # One is always written at the end of training and when SLURM (SIGUSR1) or anyone (SIGTERM)
    # asks the run to stop.
    every_steps: int = 100
    every_minutes: float = 30.0
    # How many checkpoints to keep (the newest); 0 keeps all.
    keep: int = 2
    # auto: continue from the newest complete checkpoint of the run directory, if there is one;
    # never: refuse a run directory that has checkpoints; or the path of a checkpoint to start from.
    resume: str = "auto"
    # A loss or gradient that is NaN or inf: stop (keeping the last good checkpoint) or skip the step.
    on_nonfinite: OnNonfinite = OnNonfinite.stop

    def check(self) -> None:
        c = Checks("checkpoint", self)
        c.require(self.every_steps >= 0, "every_steps", "must be >= 0 (0: not by steps)")
        c.require(self.every_minutes >= 0, "every_minutes", "must be >= 0 (0: not by time)")
        c.require(self.keep >= 0, "keep", "must be >= 0 (0 keeps all)")
        c.require(bool(self.resume), "resume", "must be auto, never or the path of a checkpoint")


@dataclass
class LoggerConfig:
    # Besides metrics.jsonl (always): wandb, or tensorboard (event files in <run>/tensorboard).
    kind: LoggerKind = LoggerKind.jsonl
    # <run>/plots/metrics.png, redrawn at each evaluation and at the end (a second or two each).
    plots: bool = True
    project: str = "fsdpqlora"
    # wandb mode: "offline" works without a network; "online" where one exists.
    mode: WandbMode = WandbMode.offline


@dataclass
class LaunchConfig:
    # Where the workers compute: cuda (one GPU per worker, nccl), cpu (gloo, GPUs left unused), or
    # auto: cuda when a GPU is visible, else cpu.
    device: Device = Device.auto
    # Workers per node. 0 means one per GPU, or `cpu_workers` when the workers run on CPU.
    nproc_per_node: int = 0
    cpu_workers: int = 2
    # Where run directories are created; each run gets <output_root>/<timestamp>.
    output_root: str = "outputs"
    # The run directory itself; empty means a new timestamped one under output_root.
    run_dir: str = ""
    # How many times a failed worker group (a worker killed, out of memory, a lost node) is
    # restarted; each restart resumes from the last checkpoint. A run stopped by SIGTERM/SIGUSR1
    # (exit 75) or refused for its configuration (exit 2) is never restarted.
    max_restarts: int = 3
    # Nodes of the run: one launcher per node, meeting at rdzv_endpoint (torchrun's c10d
    # rendezvous). 0: the nodes of the SLURM job step running the launcher (srun), else 1.
    nnodes: int = 0
    # host:port where the nodes meet, the same for all (under SLURM: the job's first node). A node
    # whose name or address is the host serves the rendezvous store.
    rdzv_endpoint: str = ""
    # The run's name at the rendezvous; empty: the SLURM job id. Multi-node runs without a
    # launch.run_dir use <output_root>/<rdzv_id>, so that every node writes to the same directory.
    rdzv_id: str = ""
    # Where the built-in tiny model and data set are cached.
    cache_dir: str = "~/.cache/fsdpqlora"
    # Start even when the planner (fsdpqlora/plan) estimates that the configuration does not fit.
    force: bool = False

    def uses_cuda(self, visible_gpus: int) -> bool:
        """Whether the workers compute on GPUs, given how many this machine shows."""
        if self.device == Device.cuda and not visible_gpus:
            raise ConfigError("launch.device='cuda': this machine shows no CUDA GPU; use launch.device=cpu")
        return self.device == Device.cuda or (self.device == Device.auto and visible_gpus > 0)

    def check(self) -> None:
        c = Checks("launch", self)
        c.require(self.nproc_per_node >= 0, "nproc_per_node", "must be >= 0 (0 = one per GPU)")
        c.require(self.cpu_workers > 0, "cpu_workers", "must be positive")
        c.require(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        c.require(self.nnodes >= 0, "nnodes", "must be >= 0 (0: from SLURM, else 1)")


@dataclass
class RigConfig:
    """The machine `fsdpqlora plan` plans for. `auto` measures this one (GPUs and their memory, host
    RAM; speeds from a table of known GPUs); the presets in conf/rig/ describe others."""

    name: str = "auto"
    nodes: int = 1
    # 0: a CPU-only machine, whose workers (launch.cpu_workers per node) count against host RAM only.
    gpus_per_node: int = 0
    gpu_memory_gib: float = 0.0
    # Per node.
    host_memory_gib: float = 0.0
    # Dense bf16/fp16 tensor-core peak of one GPU (of one CPU worker on a CPU-only machine), TFLOP/s.
    tflops: float = 0.0
    # Host <-> GPU copies, GB/s per GPU (PCIe 4.0 x16: about 25 in practice).
    pcie_gbps: float = 25.0
    # GPU <-> GPU collectives inside a node, GB/s per GPU (PCIe peer copies about 10, NVLink 4: about 400).
    interconnect_gbps: float = 10.0
    # Between nodes, GB/s per GPU.
    internode_gbps: float = 12.5

    def check(self) -> None:
        c = Checks("rig", self)
        c.require(self.nodes >= 1, "nodes", "must be >= 1")
        c.require(self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0 (0: CPU workers only)")
        for key in ("gpu_memory_gib", "host_memory_gib", "tflops", "pcie_gbps", "interconnect_gbps", "internode_gbps"):
            c.require(getattr(self, key) >= 0, key, "must be >= 0")


@dataclass
class SlurmConfig:
    """The job `fsdpqlora submit` writes and submits (sbatch options; one launcher per node)."""

    nodes: int = 1
    # GPUs per node (--gres=gpu:N), one worker each. Unset: the rig's (rig=8x80gb, ...), which must then
    # be named; 0 asks for none (a CPU job: launch.cpu_workers CPU workers per node).
    gpus_per_node: int | None = None
    cpus_per_task: int = 16
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    job_name: str = "fsdpqlora"
    # SLURM sends SIGUSR1 this many seconds before the time limit: the run checkpoints, exits 75
    # and the job requeues itself. Leave enough for one step plus a checkpoint.
    signal_seconds: int = 300
    # More #SBATCH options, as on sbatch's command line: ["--qos=high", "--constraint=a100"].
    extra_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        c = Checks("slurm", self)
        c.require(self.nodes > 0, "nodes", "must be positive")
        gpus = self.gpus_per_node
        c.require(gpus is None or gpus >= 0, "gpus_per_node", "must be >= 0 (0: CPU workers)")
        c.require(self.cpus_per_task > 0, "cpus_per_task", "must be positive")
        c.require(self.signal_seconds >= 0, "signal_seconds", "must be >= 0 (0: no warning signal)")
        c.require(all(a.startswith("--") for a in self.extra_args), "extra_args", "each must be a long sbatch option (--name=value)")


@dataclass
class GenerateConfig:
    # The end-of-run sample: an instruction answered greedily with the saved adapter (one process
    # loads the whole 4-bit model to do it, so it is off unless asked for): `prompt`, put into the
    # data format's prompt, or with at_end=true and no prompt, the prompt of the first evaluation
    # example. The tiny model's preset turns it on.
    prompt: str = ""
    at_end: bool = False
    # At each evaluation, this many evaluation examples' prompts answered greedily by the model in
    # training (every rank runs the forwards; rank 0 prints); 0: none.
    eval_samples: int = 0
    max_new_tokens: int = 48

    def check(self) -> None:
        c = Checks("generate", self)
        c.require(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
        c.require(self.eval_samples >= 0, "eval_samples", "must be >= 0 (0: none)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    rig: RigConfig = field(default_factory=RigConfig)

    def check(self, model_max_positions: int | None = None) -> None:
        """The values that the schema's types cannot express, section by section (the order in
        which a user reads them). Raises ConfigError naming the key; `model_max_positions`, once
        the model's config.json is at hand, bounds data.seq_len."""
        self.model.check()
        self.quant.check()
        self.adapter.check(self.quant.compute_dtype)
        self.shard.check()
        self.data.check(model_max_positions)
        self.train.check()
        self.checkpoint.check()
        self.launch.check()
        self.slurm.check()
        self.generate.check()
        self.rig.check()
