"""The configuration schema: the single source of truth for every default.

The YAML files under conf/ only select presets and override fields of these dataclasses; Hydra
checks every key and type against them while composing. `validate` then checks the values that
types cannot express (ranges, names, the sequence length against the model's limit), so that a bad
configuration fails in the launcher, with the key named, before any worker is spawned.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fsdpqlora.errors import ConfigError

# conf/ sits at the top of the repository and is installed as the package `fsdpqlora.conf`
# (see pyproject.toml), so one lookup finds it in a source checkout and in an installed wheel.
CONF_DIR = Path(str(importlib.resources.files("fsdpqlora.conf")))

SHARD_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
DTYPES = ("float32", "bfloat16", "float16")
LOAD_MODES = ("auto", "every_rank", "rank0_broadcast")
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")
SCHEDULES = ("cosine", "constant", "linear")
LOGGERS = ("jsonl", "wandb")
DATA_FORMATS = ("alpaca", "chat", "text", "template")
BATCHINGS = ("packed", "length_grouped", "padded")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
ADAPTER_METHODS = ("lora", "dora")
TRUNCATIONS = ("cut", "drop", "split")


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A local model directory or a hub id. Empty for `tiny`, which is built locally on first use.
    path: str = ""
    # dtype of the frozen non-quantized weights (embeddings, norms, head) and of the weights
    # handed to the quantizer.
    dtype: str = "bfloat16"
    trust_remote_code: bool = False
    # How checkpoint bytes reach the ranks: every_rank (each reads the files), rank0_broadcast (rank
    # 0 reads and broadcasts), or auto: every_rank on one node, rank0_broadcast across nodes.
    load_mode: str = "auto"
    # Threads reading tensors ahead of the quantizer; host memory holds up to this many + 1 tensors.
    load_workers: int = 2


@dataclass
class QuantConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "bfloat16"
    # dtype the packed 4-bit bytes are stored in. uint8 is never cast by FSDP2 mixed precision.
    storage_dtype: str = "uint8"


@dataclass
class AdapterConfig:
    # lora, or dora (QDoRA: LoRA plus a trained magnitude per output feature).
    method: str = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Attribute names of the linears to adapt; `all-linear` is every 4-bit linear of the model's
    # family (attention and MLP, every expert of a mixture-of-experts; never the head or router).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # dtype of the trainable adapter weights (the optimizer's master copy).
    dtype: str = "float32"


@dataclass
class ShardConfig:
    strategy: str = "full_shard"
    # Size of the shard group for hybrid_shard; 0 means "the GPUs of one node" (all local ranks).
    hybrid_shard_size: int = 0
    # Recompute decoder layers in backward instead of keeping their activations.
    activation_checkpointing: bool = True
    # Checkpoint every k-th decoder layer only (1: every layer); the others keep their
    # activations, less recompute for more memory.
    checkpoint_every: int = 1
    # With checkpointing: the checkpointed layers' saved inputs wait in host memory until
    # backward (copied on a side stream, overlapped with compute, where CUDA exists).
    activation_offload: bool = False
    # Sharded frozen weights, adapter weights, gradients and optimizer state live in host memory
    # and are copied to the GPU per layer (FSDP2's CPUOffloadPolicy).
    cpu_offload: bool = False


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
    format: str = "alpaca"
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
    seq_len: int = 256
    # An example longer than seq_len: cut (keep its beginning), drop it, or split it into windows
    # (text format: every token is trained on).
    truncation: str = "cut"
    # A row the format cannot use: error (name it and stop) or skip (count it in the log).
    on_bad_row: str = "error"
    # packed (several examples per row, no attention across them), length_grouped (padded batches
    # of similar lengths), padded (random batches, padded to the longest).
    batching: str = "packed"
    # Evaluation data: a split of `path` (test, validation) or a file, or a fraction of the
    # training rows held out (seeded). Neither: no evaluation.
    eval_split: str = ""
    eval_fraction: float = 0.0


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"
    warmup_steps: int = 5
    max_steps: int = 60
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    # adamw (torch's, fused on CUDA), or bitsandbytes' adamw_8bit, paged_adamw, paged_adamw_8bit
    # (the QLoRA paper's paged optimizers: state moves to host memory under GPU memory pressure).
    optimizer: str = "adamw"
    # Gradient accumulation: reduce-scatter adapter gradients after every micro-batch (sharded
    # gradients, more communication) or only after the last one (the default: LoRA gradients are
    # small, so keeping them unsharded costs little memory and saves grad_accum_steps - 1 collectives).
    reduce_every_micro_batch: bool = False
    seed: int = 42
    log_every: int = 1
    # Evaluation loss every N steps and at the end; 0: at the end only. Needs evaluation data
    # (data.eval_split or data.eval_fraction).
    eval_every: int = 0


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
    on_nonfinite: str = "stop"


@dataclass
class LoggerConfig:
    kind: str = "jsonl"
    project: str = "fsdpqlora"
    # wandb mode: "offline" works without a network; "online" where one exists.
    mode: str = "offline"


@dataclass
class LaunchConfig:
    # Workers per node. 0 means one per visible GPU, or `cpu_workers` when there is no GPU.
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


@dataclass
class SlurmConfig:
    """The job `fsdpqlora submit` writes and submits (sbatch options; one launcher per node)."""

    nodes: int = 1
    # GPUs per node (--gres=gpu:N), one worker each; 0 asks for none (CPU workers, launch.cpu_workers).
    gpus_per_node: int = 0
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


@dataclass
class GenerateConfig:
    # Instruction answered with the saved adapter at the end of a run (one process loads the whole
    # 4-bit model to do it); empty skips it. The tiny model's preset sets one.
    prompt: str = ""
    max_new_tokens: int = 48


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


def _register() -> None:
    ConfigStore.instance().store(name="fsdpqlora_schema", node=Config)


_register()


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with command-line overrides, checked against the schema."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose(config_name="config", overrides=list(overrides))
        # Merging into the schema once more refuses top-level keys that `+key=value` slipped in.
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(composed))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config_file(path: str | Path) -> DictConfig:
    """Load a resolved config written by `save_config`, checked against the schema again."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_one_line(exc)}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_run_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Write the resolved config, with its run directory filled in, as <run_dir>/config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yaml"
    resolved = OmegaConf.merge(cfg, {"launch": {"run_dir": str(run_dir)}})
    config_file.write_text(OmegaConf.to_yaml(resolved, resolve=True))
    return config_file


def _one_line(exc: BaseException) -> str:
    """Hydra wraps OmegaConf's precise error (which names the key) in a vaguer one; report the
    precise one, in one line, as `key: problem`."""
    cause = exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    message = lines[0] if lines else type(cause).__name__
    key = getattr(cause, "full_key", None)
    if key and not message.startswith(key):
        message = f"{key}: {message}"
    if type(cause).__name__ == "OverrideParseException" or "LexerNoViableAltException" in message:
        # Hydra keeps the override it refused, where the message may not show it (braces of a template).
        override = getattr(cause, "override", None) or message.split(": ", 1)[-1]
        key = override.split("=", 1)[0]
        message = (
            f"{override}: Hydra cannot parse this override; quote the value, "
            f"e.g. '{key}=\"{override.split('=', 1)[-1]}\"' (with the single quotes, for the shell)"
        )
    missing_option = re.match(r"In '.*': Could not find '(\w+)/(.+)'", message)
    if missing_option:
        group, option = missing_option.groups()
        options = [p.stem for p in sorted((CONF_DIR / group).glob("*.yaml"))]
        message = f"{group}={option}: no such option; choose one of {', '.join(options)}"
    return message


def choose_run_dir(cfg: DictConfig) -> Path:
    """launch.run_dir when given, else a new timestamped directory under launch.output_root."""
    if cfg.launch.run_dir:
        return Path(cfg.launch.run_dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return (Path(cfg.launch.output_root).expanduser() / stamp).resolve()


def validate(cfg: DictConfig, model_max_positions: int | None = None) -> None:
    """Check the values that the schema's types cannot express. Raises ConfigError naming the key."""

    def require(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: {problem}")

    def one_of(key: str, allowed: tuple[str, ...]) -> None:
        require(OmegaConf.select(cfg, key) in allowed, key, f"must be one of {', '.join(allowed)}")

    one_of("model.dtype", DTYPES)
    one_of("model.load_mode", LOAD_MODES)
    require(cfg.model.load_workers >= 1, "model.load_workers", "must be >= 1")
    require(cfg.model.name == "tiny" or bool(cfg.model.path), "model.path", "is empty; give a local directory or a hub id")

    one_of("quant.quant_type", ("nf4", "fp4"))
    one_of("quant.compute_dtype", DTYPES)
    one_of("quant.storage_dtype", STORAGE_DTYPES)
    require(cfg.quant.blocksize in (64, 128, 256, 512, 1024, 2048, 4096), "quant.blocksize", "must be a power of two from 64 to 4096")
    # FSDP2 all-gathers float storage through its mixed-precision cast, which rewrites packed
    # 4-bit bytes (bitsandbytes issue 1945); only storage equal to the compute dtype is left alone.
    require(
        cfg.quant.storage_dtype in ("uint8", cfg.quant.compute_dtype),
        "quant.storage_dtype",
        f"float storage must equal quant.compute_dtype ({cfg.quant.compute_dtype}) or FSDP's cast corrupts the packed bytes; use uint8",
    )

    one_of("adapter.method", ADAPTER_METHODS)
    require(cfg.adapter.r > 0, "adapter.r", "must be a positive integer")
    require(cfg.adapter.alpha > 0, "adapter.alpha", "must be positive")
    require(0.0 <= cfg.adapter.dropout < 1.0, "adapter.dropout", "must be in [0, 1)")
    require(len(cfg.adapter.target_modules) > 0, "adapter.target_modules", "must name at least one module")
    one_of("adapter.dtype", DTYPES)
    # The adapter is the optimizer's master copy: in fp16, updates smaller than fp16's resolution
    # vanish, and the gradient scaler refuses to unscale fp16 gradients.
    require(cfg.adapter.dtype != "float16", "adapter.dtype", "fp16 master weights lose small updates; use float32 (precision=fp16 does)")
    require(
        not (cfg.adapter.dtype == "bfloat16" and cfg.quant.compute_dtype == "float16"),
        "adapter.dtype",
        "bfloat16 adapters cast to float16 compute lose range and precision twice; use float32 with float16 compute",
    )

    one_of("shard.strategy", SHARD_STRATEGIES)
    require(cfg.shard.hybrid_shard_size >= 0, "shard.hybrid_shard_size", "must be >= 0")
    require(cfg.shard.checkpoint_every >= 1, "shard.checkpoint_every", "must be >= 1 (1: every decoder layer)")
    require(
        cfg.shard.activation_checkpointing or not cfg.shard.activation_offload,
        "shard.activation_offload",
        "offloads the inputs that checkpointing saves; set shard.activation_checkpointing=true",
    )

    data = cfg.data
    one_of("data.format", DATA_FORMATS)
    one_of("data.batching", BATCHINGS)
    one_of("data.truncation", TRUNCATIONS)
    one_of("data.on_bad_row", ("error", "skip"))
    require(
        data.truncation != "split" or data.format == "text",
        "data.truncation",
        "split is for the text format; cut in pieces, an example loses its prompt",
    )
    require(
        bool(data.user_marker) == bool(data.assistant_marker),
        "data.assistant_marker" if data.user_marker else "data.user_marker",
        "is empty; splitting transcripts into turns needs both data.user_marker and data.assistant_marker",
    )
    if data.format == "template":
        from fsdpqlora.data.formats import template_fields

        require(bool(data.completion_template), "data.completion_template", "is empty; the template format needs one, e.g. '{answer}'")
        template_fields(data.prompt_template, "data.prompt_template")
        template_fields(data.completion_template, "data.completion_template")
    require(0.0 <= data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
    require(not (data.eval_split and data.eval_fraction), "data.eval_fraction", "give data.eval_split or data.eval_fraction, not both")
    require(cfg.data.seq_len >= 16, "data.seq_len", "must be at least 16")
    if model_max_positions is not None:
        require(
            cfg.data.seq_len <= model_max_positions,
            "data.seq_len",
            f"exceeds the model's limit of {model_max_positions} positions (max_position_embeddings)",
        )
    require(cfg.data.max_examples >= 0, "data.max_examples", "must be >= 0")

    t = cfg.train
    require(t.lr > 0, "train.lr", "must be positive")
    require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1)")
    one_of("train.schedule", SCHEDULES)
    one_of("train.optimizer", OPTIMIZERS)
    require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    require(t.max_steps > 0, "train.max_steps", "must be positive")
    require(t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    require(t.grad_accum_steps > 0, "train.grad_accum_steps", "must be positive")
    require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 turns clipping off)")
    require(t.log_every > 0, "train.log_every", "must be positive")
    require(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: evaluate at the end only)")

    c = cfg.checkpoint
    require(c.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: not by steps)")
    require(c.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0 (0: not by time)")
    require(c.keep >= 0, "checkpoint.keep", "must be >= 0 (0 keeps all)")
    require(bool(c.resume), "checkpoint.resume", "must be auto, never or the path of a checkpoint")
    one_of("checkpoint.on_nonfinite", ("stop", "skip"))

    one_of("logger.kind", LOGGERS)
    one_of("logger.mode", ("offline", "online", "disabled"))

    require(cfg.launch.nproc_per_node >= 0, "launch.nproc_per_node", "must be >= 0 (0 = one per GPU)")
    require(cfg.launch.cpu_workers > 0, "launch.cpu_workers", "must be positive")
    require(cfg.launch.max_restarts >= 0, "launch.max_restarts", "must be >= 0")
    require(cfg.launch.nnodes >= 0, "launch.nnodes", "must be >= 0 (0: from SLURM, else 1)")
    require(cfg.slurm.nodes > 0, "slurm.nodes", "must be positive")
    require(cfg.slurm.gpus_per_node >= 0, "slurm.gpus_per_node", "must be >= 0 (0: CPU workers)")
    require(cfg.slurm.cpus_per_task > 0, "slurm.cpus_per_task", "must be positive")
    require(cfg.slurm.signal_seconds >= 0, "slurm.signal_seconds", "must be >= 0 (0: no warning signal)")
    require(all(a.startswith("--") for a in cfg.slurm.extra_args), "slurm.extra_args", "each must be a long sbatch option (--name=value)")
    require(cfg.generate.max_new_tokens >= 0, "generate.max_new_tokens", "must be >= 0")
    r = cfg.rig
    require(r.nodes >= 1, "rig.nodes", "must be >= 1")
    require(r.gpus_per_node >= 0, "rig.gpus_per_node", "must be >= 0 (0: CPU workers only)")
    for key in ("gpu_memory_gib", "host_memory_gib", "tflops", "pcie_gbps", "interconnect_gbps", "internode_gbps"):
        require(OmegaConf.select(cfg, f"rig.{key}") >= 0, f"rig.{key}", "must be >= 0")


def validate_for_machine(cfg: DictConfig, has_cuda: bool) -> None:
    """The settings that depend on the machine the workers run on (not on the rig a plan is for)."""
    if cfg.train.optimizer.startswith("paged_"):
        where = "shard.cpu_offload keeps the optimizer state in host memory already" if cfg.shard.cpu_offload else (
            "this machine has no CUDA GPU" if not has_cuda else ""
        )
        if where:
            raise ConfigError(
                f"train.optimizer={cfg.train.optimizer!r}: paged optimizers page GPU memory, and {where}; "
                f"use {cfg.train.optimizer.replace('paged_', '')}"
            )


def model_max_positions(model_dir: Path) -> int | None:
    """The model's position limit from its config.json, or None when the file is not local yet."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    try:
        hf_config: dict[str, Any] = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_file}: not valid JSON ({exc})") from None
    return hf_config.get("max_position_embeddings")
