"""What is checked before any worker does real work, in one place for the launcher and the workers
(plain `torchrun -m fsdpqlora.train` skips the launcher): the configuration's values, the settings
that depend on this machine, the data sources, and the model directory (config.json, a supported
family, 4-bit settings of a pre-quantized checkpoint, every safetensors header, the tokenizer, the
sequence length against the model's limit), and the run directory (check_run_dir: writable, not
held by a live run, resumable as checkpoint.resume says). Each failure is one ConfigError,
ModelFilesError or DataError naming the key, file or row. Headers only are read, so it costs
seconds on a 70B model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fsdpqlora.config import Config, Optimizer, StorageDType
from fsdpqlora.errors import ConfigError
from fsdpqlora.rundir import check_not_locked, check_writable


@dataclass
class Checked:
    model_dir: Path | None  # None: a hub model not downloaded (preflight's download=False)
    hf_config: object
    tokenizer: object


def preflight(cfg: Config, has_cuda: bool, download: bool = True) -> Checked:
    """`download=False` (submit --dry-run) fetches and builds nothing: a hub model's config.json
    comes from the Hugging Face cache or the preset's architecture (conf/architectures), `tiny`'s
    from its recipe, and the model files and tokenizer go unchecked (model_dir and tokenizer None)."""
    from fsdpqlora.data import check_sources
    from fsdpqlora.model.directory import (
        check_prequantized,
        check_tokenizer,
        is_hub_id,
        load_hf_config,
        resolve_model_dir,
    )
    from fsdpqlora.model.families import family_of
    from fsdpqlora.weights import checkpoint_entries

    cfg.check()
    check_machine(cfg, has_cuda)
    check_sources(cfg)  # before the model: a data mistake should not wait for a download or a build
    if not download and (is_hub_id(cfg.model.path) or cfg.model.name == "tiny" and not cfg.model.path):
        from fsdpqlora.plan.arch import hf_config_of

        hf_config = hf_config_of(cfg)
        family_of(hf_config)
        check_against_model(cfg, hf_config)
        return Checked(None, hf_config, None)
    model_dir = resolve_model_dir(cfg)
    hf_config = load_hf_config(model_dir, cfg.model.trust_remote_code)
    family_of(hf_config)
    check_prequantized(cfg, hf_config, model_dir)
    checkpoint_entries(model_dir)
    tokenizer = check_tokenizer(model_dir)
    check_against_model(cfg, hf_config)
    return Checked(model_dir, hf_config, tokenizer)


def check_against_model(cfg: Config, hf_config) -> None:
    """The settings that depend on the model (the rest were checked without it)."""
    cfg.data.check(getattr(hf_config, "max_position_embeddings", None))
    if cfg.shard.embedding_on_host and getattr(hf_config.get_text_config(), "tie_word_embeddings", False):
        raise ConfigError(
            "shard.embedding_on_host=true: this model's head is tied to its input embedding (one tensor), "
            "which the loss needs on the GPU; set shard.embedding_on_host=false"
        )


def check_run_dir(cfg: Config, run_dir: Path, locked_by_launcher: bool = False, restarted: bool = False) -> Path | None:
    """Before anything is written in the run directory or any model loaded: refuse a directory that
    cannot be written or that a live run holds, and a resume that would be refused (no checkpoint
    where one is named, checkpoints where checkpoint.resume=never, a checkpoint of another model or
    adapter). The checkpoint the run will start from, or None."""
    from fsdpqlora.train.checkpoint import resume_point

    check_writable(run_dir)
    if not locked_by_launcher:
        check_not_locked(run_dir)
    return resume_point(cfg, run_dir, restarted)


def check_machine(cfg: Config, has_cuda: bool) -> None:
    """The settings that depend on the machine the workers run on (not on the rig a plan is for);
    `has_cuda`: the workers compute on GPUs."""
    storage = cfg.quant.storage_dtype
    if has_cuda and storage in (StorageDType.bfloat16, StorageDType.float16):
        # When every tensor of an FSDP unit has one 16-bit float dtype, FSDP2 copies the all-gather
        # buffers with a copy of that dtype, which on CUDA rewrites every NaN bit pattern to one
        # canonical NaN (pytorch issue 159333, bitsandbytes issue 1945). About 1 packed word in 1,300
        # of a real weight is such a pattern, and its 4-bit indices would change silently. uint8 storage
        # mixes dtypes in the unit, so its buffers are copied as bytes. benchmarks/gpu.py checks this.
        raise ConfigError(
            f"quant.storage_dtype={storage.value!r}: on CUDA, FSDP2's all-gather copy of 16-bit float storage "
            "rewrites NaN bit patterns and so corrupts packed 4-bit weights; use quant.storage_dtype=uint8"
        )
    optimizer = cfg.train.optimizer
    if optimizer in (Optimizer.paged_adamw, Optimizer.paged_adamw_8bit):
        where = "shard.cpu_offload keeps the optimizer state in host memory already" if cfg.shard.cpu_offload else (
            "this machine has no CUDA GPU" if not has_cuda else ""
        )
        if where:
            raise ConfigError(
                f"train.optimizer={optimizer.value!r}: paged optimizers page GPU memory, and {where}; "
                f"use {optimizer.value.replace('paged_', '')}"
            )
