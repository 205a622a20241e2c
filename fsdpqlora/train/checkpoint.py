"""Resumable checkpoints: written by every rank, visible only once complete, never half-used.

A checkpoint is a directory `<run_dir>/checkpoints/step-<N>/` holding
- `state/`: the adapter weights and optimizer state, saved with torch.distributed.checkpoint
  (each rank writes its own shards, so no rank ever holds everything; a different world size or
  sharding strategy can load them);
- `rng/rank-<r>.pt`: each rank's random-number-generator states (LoRA dropout masks);
- `adapter/`: the adapter in PEFT format, gathered from all shards, usable as it is;
- `meta.json`, written last: the step, the scheduler and data-position state, the resolved config.

Commit protocol: everything is written under `checkpoints/.partial-step-<N>/`; when every rank has
finished writing (a barrier), rank 0 writes meta.json, renames the directory to `step-<N>` and
then points `checkpoints/latest` at it (written to a temporary file and renamed). A crash at any
point leaves the previous checkpoint and the `latest` pointer intact; partial directories are
never read and are removed at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fsdpqlora import atomic
from fsdpqlora.config import Config, Optimizer, to_dict
from fsdpqlora.errors import ConfigError, UserError
from fsdpqlora.model import adapters
from fsdpqlora.parallel.process_group import Dist, all_reduce_max, all_reduce_sum
from fsdpqlora.rundir import free_bytes

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
META = "meta.json"

# Config sections whose change makes a saved state meaningless: another base model, quantization
# or adapter shape. Everything else (learning rate, data, logging, sharding, world size) may
# change on resume; the keys in TRAJECTORY_KEYS then only break the "as if never interrupted".
INCOMPATIBLE_SECTIONS = ("model.name", "model.path", "quant", "adapter.method", "adapter.r", "adapter.alpha",
                         "adapter.target_modules", "adapter.dtype", "train.optimizer")  # fmt: skip
TRAJECTORY_SECTIONS = ("train", "data", "adapter.dropout", "adapter.fused_shared_inputs", "model.dtype")

_OPTIONS = StateDictOptions(ignore_frozen_params=True)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (a full disk): a restart would only fail again."""

    agreed = True  # raised on every rank alike


@dataclass
class Restored:
    step: int
    data_state: dict
    changed_keys: list[str]  # settings changed since the checkpoint that alter the trajectory


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class Checkpointer:
    """Saves and finds checkpoints of one run directory. Every method is called on every rank."""

    def __init__(self, cfg: Config, run_dir: Path, d: Dist):
        self.cfg = cfg
        self.root = run_dir / CHECKPOINTS
        self.d = d
        self.last_save_time = time.monotonic()

    # -- when --------------------------------------------------------------------------------

    def seconds_since_save(self) -> float:
        """This rank's clock; the step's collective turns it into the slowest rank's."""
        return time.monotonic() - self.last_save_time

    def due(self, step: int, slowest_seconds_since_save: float) -> bool:
        """Whether to save after `step` (counted from 1). Time-based saving must be decided the same
        way on every rank, so the slowest clock decides for all."""
        c = self.cfg.checkpoint
        if c.every_steps and step % c.every_steps == 0:
            return True
        return bool(c.every_minutes) and slowest_seconds_since_save >= c.every_minutes * 60

    def maybe_save(self, step: int, slowest_seconds_since_save: float, model, optimizer, scheduler, data, scaler=None,
                   force: bool = False) -> Path | None:  # fmt: skip
        """Save when due (or when `force`d); the checkpoint's path, or None."""
        if not (force or self.due(step, slowest_seconds_since_save)):
            return None
        return self.save(step, model, optimizer, scheduler, data, scaler)

    # -- writing ------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, scheduler, data, scaler=None) -> Path:
        """`data`: the StepBatches, whose position is saved. A write that fails on any rank (a full
        disk) fails the save on every rank: the partial directory is removed, the previous
        checkpoint stays the latest, and a CheckpointWriteError names the path and the space."""
        final = self.root / step_dir_name(step)
        partial = self.root / f"{PARTIAL_PREFIX}{step_dir_name(step)}"
        failed = _FirstFailure()
        if self.d.is_main:
            with failed:
                shutil.rmtree(partial, ignore_errors=True)
                (partial / "rng").mkdir(parents=True)
                if _optimizer_state_per_rank(self.cfg):
                    (partial / "optim").mkdir()
        self._agree_written(failed, partial, final, model, optimizer)
        # The collectives below run on every rank whatever failed here, so that none is left waiting.
        state = {"model": get_model_state_dict(model, options=_OPTIONS)}
        if _optimizer_state_per_rank(self.cfg):
            with failed:
                torch.save(optimizer.state_dict(), partial / "optim" / f"rank-{self.d.rank:05d}.pt")
        else:
            state["optim"] = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
        with failed:  # torch.distributed.checkpoint gathers every rank's write errors and raises on all
            dcp.save(state, checkpoint_id=str(partial / "state"))
        with failed:
            torch.save(_rng_state(), partial / "rng" / f"rank-{self.d.rank:05d}.pt")
        adapter_state = adapters.gather_adapter_state(model)
        if self.d.is_main:
            with failed:
                adapters.save_adapter(model, adapter_state, partial / "adapter")
        self._agree_written(failed, partial, final, model, optimizer)  # every rank's files are written
        if self.d.is_main:
            meta = {
                "step": step,
                "world_size": self.d.world_size,
                "scheduler": scheduler.state_dict(),
                # fp16's loss scale (the same on every rank: overflows are agreed on across ranks)
                "grad_scaler": scaler.state_dict() if scaler else None,
                "data": data.state_dict(),
                "config": to_dict(self.cfg),
                "saved_at": time.time(),
            }
            with failed:
                atomic.write_text(partial / META, json.dumps(meta, indent=1))
                atomic.fsync_dir(partial)
                if final.exists():  # a step saved before a crash and a resume: replace it whole
                    shutil.rmtree(final)
                os.rename(partial, final)
            if failed.error is None:
                # The step is committed; the pointer is a convenience, and a failure to update it harms nothing.
                with contextlib.suppress(OSError):
                    atomic.write_text(self.root / LATEST, final.name)
                    atomic.fsync_dir(self.root)
                self._keep_last(self.cfg.checkpoint.keep)
        self._agree_written(failed, partial, final, model, optimizer)
        self.last_save_time = time.monotonic()
        return final

    def _agree_written(self, failed: _FirstFailure, partial: Path, final: Path, model, optimizer) -> None:
        """In place of a barrier: whether every rank's writes so far succeeded. If any failed, every
        rank raises the same CheckpointWriteError, after rank 0 has removed the partial directory."""
        if not all_reduce_max(failed.error is not None, self.d.device):
            return
        needed = checkpoint_bytes(model, optimizer, self.d)
        if self.d.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        previous = self.latest()
        raise CheckpointWriteError(
            f"the checkpoint {final} could not be written{f' ({failed.summary()})' if failed.error else ''}: "
            f"its file system has {free_bytes(self.root):,} bytes free and a checkpoint needs about {needed:,}; "
            f"free some space or choose a launch.run_dir elsewhere. Last complete checkpoint: {previous or 'none'}"
        )

    def _keep_last(self, keep: int) -> None:
        complete = self.complete()
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    # -- finding and reading --------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a directory counts once its meta.json is written)."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint. The `latest` pointer is a convenience for people and
        scripts; completeness is what counts, so a stale or dangling pointer cannot mislead."""
        complete = self.complete()
        return complete[-1] if complete else None

    def remove_partial(self) -> None:
        """Rank 0 removes what a crash left half-written; called before anything is saved."""
        if self.d.is_main and self.root.is_dir():
            for partial in self.root.glob(f"{PARTIAL_PREFIX}*"):
                shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()

    def restore(self, path: Path, model, optimizer, scheduler, scaler=None) -> Restored:
        meta = json.loads((path / META).read_text())
        changed = check_resumable(meta["config"], self.cfg, path)
        per_rank = _optimizer_state_per_rank(self.cfg)
        if per_rank:
            saved_layout = (meta["world_size"], meta["config"]["shard"]["strategy"], meta["config"]["shard"]["hybrid_shard_size"])
            layout = (self.d.world_size, self.cfg.shard.strategy, self.cfg.shard.hybrid_shard_size)
            if saved_layout != layout:
                raise ConfigError(
                    f"train.optimizer={self.cfg.train.optimizer.value!r}: the checkpoint {path} holds its state per shard of "
                    f"{saved_layout[0]} workers under shard={saved_layout[1]}; resume it on the same layout"
                )
        state = {"model": get_model_state_dict(model, options=_OPTIONS)}
        if not per_rank:
            state["optim"] = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)
        dcp.load(state, checkpoint_id=str(path / "state"))
        # Non-strict, since the frozen base is not in a checkpoint; so check that nothing else is missing.
        keys = set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        missing = [k for k in keys.missing_keys if k not in frozen] + list(keys.unexpected_keys)
        if missing:
            raise RuntimeError(f"{path}: the checkpoint does not match the model's adapter ({', '.join(missing[:3])} ...)")
        # Loading a state replaces each group's settings with the saved ones; which kernels step
        # (foreach on CPU, fused on CUDA: train/optim.py) is this machine's choice, not the saver's.
        kernels = [{k: group[k] for k in ("foreach", "fused") if k in group} for group in optimizer.param_groups]
        if per_rank:
            optimizer.load_state_dict(torch.load(path / "optim" / f"rank-{self.d.rank:05d}.pt", weights_only=True))
        else:
            set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTIONS)
        for group, chosen in zip(optimizer.param_groups, kernels, strict=True):
            group.update(chosen)
        # The schedule's peak is the current train.lr: a changed one takes effect from here (the
        # launcher warns that the run then no longer continues as if uninterrupted).
        schedule = dict(meta["scheduler"], base_lrs=[self.cfg.train.lr] * len(meta["scheduler"]["base_lrs"]))
        scheduler.load_state_dict(schedule)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = self.cfg.train.lr
            group["lr"] = self.cfg.train.lr * factor(scheduler.last_epoch)
        if scaler and meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
        rng_file = path / "rng" / f"rank-{self.d.rank:05d}.pt"
        # Another world size: ranks without a saved RNG state keep their own (dropout masks then
        # differ from the uninterrupted run, which a different world size changes anyway).
        if meta["world_size"] == self.d.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return Restored(step=meta["step"], data_state=meta["data"], changed_keys=changed)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / META).is_file()]
    return sorted(found, key=lambda p: json.loads((p / META).read_text())["step"])


def resume_point(cfg: Config, run_dir: Path, restarted: bool = False) -> Path | None:
    """The checkpoint a run in `run_dir` starts from, per checkpoint.resume, or None; refuses (a
    ConfigError) a resume that cannot work, from the checkpoints' meta.json alone, so that the
    launcher decides before anything is written or loaded. `restarted`: the agent restarted this
    run's workers after a failure; they continue from this run's own checkpoints."""
    resume = cfg.checkpoint.resume
    root = run_dir / CHECKPOINTS
    if resume == "auto" or (resume == "never" and restarted):
        found = complete_checkpoints(root)
        path = found[-1] if found else None
    elif resume == "never":
        if complete_checkpoints(root):
            raise ConfigError(
                f"checkpoint.resume=never: {root} already holds checkpoints of a run; choose another launch.run_dir "
                "for a new run, or continue this one with checkpoint.resume=auto"
            )
        return None
    else:
        path = Path(resume).expanduser()
        if not (path / META).is_file():
            raise ConfigError(f"checkpoint.resume={resume!r}: not a complete checkpoint directory")
    if path is not None:
        check_resumable(json.loads((path / META).read_text())["config"], cfg, path)
    return path


def write_final_adapter(model, out_dir: Path, last_checkpoint: Path | None, d: Dist, tokenizer_of=None) -> None:
    """The run's adapter in PEFT format at `out_dir` (gathered from every rank; rank 0 writes it, with
    the tokenizer `tokenizer_of()` gives, when given).
    A failed write (a full disk) fails on every rank alike with one line, naming the checkpoint
    that holds the same adapter, instead of a traceback on rank 0 and a lost peer on the others."""
    state = adapters.gather_adapter_state(model)
    failed = _FirstFailure()
    if d.is_main:
        with failed:
            adapters.save_adapter(model, state, out_dir, tokenizer_of() if tokenizer_of else None)
    if all_reduce_max(failed.error is not None, d.device):
        needed = int(all_reduce_max(sum(t.numel() * t.element_size() for t in (state or {}).values()), d.device))
        kept = last_checkpoint / "adapter" if last_checkpoint else "no checkpoint"
        raise CheckpointWriteError(
            f"the adapter {out_dir} could not be written ({failed.summary() if failed.error else 'on rank 0'}): its "
            f"file system has {free_bytes(out_dir.parent):,} bytes free and the adapter needs about {needed:,}; "
            f"the same adapter is in {kept}"
        )


class _FirstFailure:
    """A context manager that keeps the first file-system error raised in its blocks (the later
    blocks still run: each rank's collectives must all happen). torch.save reports a full disk as a
    RuntimeError ("unexpected pos"), torch.distributed.checkpoint as a CheckpointException, and
    safetensors (the PEFT adapter) as a SafetensorError."""

    def __init__(self):
        self.error: BaseException | None = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, (OSError, RuntimeError, CheckpointException, SafetensorError)):
            self.error = self.error or error
            return True
        return False

    def summary(self) -> str:
        """The error in one line; for a CheckpointException, the first rank's own error."""
        error = self.error
        if isinstance(error, CheckpointException) and error.failures:
            error = next(iter(error.failures.values()))[0]
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def checkpoint_bytes(model, optimizer, d: Dist) -> int:
    """About what one checkpoint of this run takes on disk: the adapter twice (the resumable state
    and the PEFT copy) and the optimizer's state, over all ranks."""
    def local_bytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = [p for _, p in adapters.lora_parameters(model)]
    total = 2 * sum(local_bytes(p) for p in params)
    total += sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return int(all_reduce_sum(total, d.device))


def _optimizer_state_per_rank(cfg: Config) -> bool:
    """bitsandbytes' optimizer state is computed per local shard (8-bit blocks cut within it) and
    held in plain tensors, which torch.distributed.checkpoint would take for replicated ones and
    write from rank 0 only: each rank saves its own, to be resumed on the same layout."""
    return cfg.train.optimizer != Optimizer.adamw


def check_resumable(saved: dict, current: Config, path: Path) -> list[str]:
    """Refuse a checkpoint made for another model or adapter shape (`saved`: the configuration its
    meta.json records), naming the key; return the changed keys that only alter the training
    trajectory (for a warning)."""
    saved_flat, current_flat = _flatten(saved), _flatten(to_dict(current))
    for key in sorted(set(saved_flat) | set(current_flat)):
        if any(key == s or key.startswith(s + ".") for s in INCOMPATIBLE_SECTIONS):
            before, now = saved_flat.get(key), current_flat.get(key)
            if before != now:
                raise ConfigError(
                    f"{key}={now!r}: the checkpoint {path} was trained with {key}={before!r}, so its state cannot "
                    f"be resumed; to train with {key}={now!r}, choose another launch.run_dir; to continue this run, "
                    f"keep {key}={before!r}"
                )
    return [
        key
        for key in sorted(set(saved_flat) | set(current_flat))
        if any(key == s or key.startswith(s + ".") for s in TRAJECTORY_SECTIONS)
        # a longer run, or the same global batch cut differently (the data position refuses another)
        and key not in ("train.max_steps", "train.epochs", "train.micro_batch_size", "train.grad_accum_steps")
        and saved_flat.get(key) != current_flat.get(key)
    ]


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
