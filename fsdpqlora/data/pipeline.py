"""The data pipeline as the launcher and the workers run it.

The launcher checks the sources exist (`check_sources`, before the model is fetched), then reads,
checks and tokenizes every row once (`prepare`, into the cache), and checks that the data fills a
global batch for its number of workers, all before a worker starts. In the workers `load_data` runs
`prepare` on rank 0 alone (finding the cache the launcher filled, or filling it under plain
torchrun) while the others wait; an error there reaches every rank. Every rank then maps the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from fsdpqlora.config import Config, DataFormat
from fsdpqlora.data.formats import chat_template_of, make_format
from fsdpqlora.data.sampler import EvalBatches, StepBatches, split_eval
from fsdpqlora.data.sources import BUILT_IN, Source, open_source, source_at
from fsdpqlora.data.tokenize import Encoder, TokenizedSet, cached_tokenize, read_stats
from fsdpqlora.errors import DataError
from fsdpqlora.logs import plural
from fsdpqlora.parallel.process_group import Dist, on_rank0


@dataclass(frozen=True)
class PreparedData:
    """Where the tokenized examples are: what rank 0 hands the other ranks."""

    train_dir: Path
    eval_dir: Path | None  # a separate evaluation split; a held-out fraction comes from train_dir


@dataclass
class Data:
    train: StepBatches
    eval: EvalBatches | None
    summary: str


def eval_source(cfg: Config) -> Source:
    """data.eval_split: a split of data.path (test, validation), or a file or directory of its own."""
    name = cfg.data.eval_split
    if Path(name).expanduser().exists():
        return source_at(name, "train", cfg)
    if cfg.data.path and Path(cfg.data.path).expanduser().is_file() or not cfg.data.path and cfg.data.name in BUILT_IN:
        raise DataError(
            f"data.eval_split={name!r}: data.path is a single file, with no other split; "
            "give data.eval_split=FILE or data.eval_fraction"
        )
    return open_source(cfg, split=name)


def check_sources(cfg: Config) -> None:
    """What can be checked without reading the data or having the tokenizer: the files or
    directories exist and have known types, a chat template file exists."""
    open_source(cfg)
    if cfg.data.eval_split:
        eval_source(cfg)
    if cfg.data.format == "chat" and cfg.data.chat_template not in ("auto", "builtin"):
        chat_template_of(cfg, tokenizer=None)


def prepare(cfg: Config, tokenizer, show_progress: bool = True) -> PreparedData:
    """Read, check and tokenize the training (and evaluation) rows into the cache, once."""
    fmt = make_format(cfg, tokenizer)
    train_dir = cached_tokenize(open_source(cfg), fmt, tokenizer, cfg, cfg.data.max_examples, show_progress)
    eval_dir = cached_tokenize(eval_source(cfg), fmt, tokenizer, cfg, 0, show_progress) if cfg.data.eval_split else None
    return PreparedData(train_dir, eval_dir)


def generation_prompt_ids(cfg: Config, tokenizer, instruction: str) -> list[int]:
    """The token ids a trained model answers `instruction` from: the data format's prompt for it
    (the alpaca prompt, the chat template's user turn, ...), tokenized as in training."""
    fmt = make_format(cfg, tokenizer)
    return Encoder(tokenizer, fmt, cfg).prompt_ids(fmt.generation_prompt(instruction))


def tokenizer_for_export(cfg: Config, model_dir: Path):
    """The model's tokenizer as saved beside a trained adapter and in a merged model. For the chat
    format it carries the chat template training rendered with (the built-in one where the model's
    tokenizer has none), so that `apply_chat_template` (transformers, vLLM) gives the text training
    saw; the BOS that training put before the built-in template's text, the template writes itself."""
    from fsdpqlora.model.directory import check_tokenizer

    tokenizer = check_tokenizer(model_dir)
    if cfg.data.format == DataFormat.chat:
        fmt = make_format(cfg, tokenizer)
        tokenizer.chat_template = ("{{ bos_token }}" if Encoder(tokenizer, fmt, cfg).bos else "") + fmt.template
    return tokenizer


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_batches(cfg: Config, prepared: PreparedData, rank: int, world_size: int, pad_id: int) -> Data:
    train_set = TokenizedSet.load(prepared.train_dir)
    train_ids, held_out = split_eval(len(train_set), cfg.data.eval_fraction, cfg.train.seed)
    train = StepBatches(train_set, train_ids, cfg, rank, world_size, pad_id)
    evaluation = None
    if prepared.eval_dir is not None:
        eval_set = TokenizedSet.load(prepared.eval_dir)
        evaluation = EvalBatches(eval_set, np.arange(len(eval_set)), cfg, pad_id)
    elif len(held_out):
        evaluation = EvalBatches(train_set, held_out, cfg, pad_id)
    return Data(train, evaluation, describe(cfg, prepared, train, evaluation))


def load_data(cfg: Config, d: Dist, tokenizer) -> Data:
    """In a worker: rank 0 prepares (or finds) the cache while the others wait, then every rank
    builds its batches from it."""
    prepared = on_rank0(lambda: prepare(cfg, tokenizer, show_progress=True))
    seen = [False] * d.world_size
    dist.all_gather_object(seen, all(p.is_dir() for p in (prepared.train_dir, prepared.eval_dir) if p is not None))
    if not all(seen):
        blind = [rank for rank, ok in enumerate(seen) if not ok]
        raise DataError(
            f"{prepared.train_dir}: rank(s) {blind} cannot see the tokenized data rank 0 wrote; "
            "launch.cache_dir must be a directory that every node shares"
        )
    return build_batches(cfg, prepared, d.rank, d.world_size, pad_id_of(tokenizer))


def describe(cfg: Config, prepared: PreparedData, train: StepBatches, evaluation: EvalBatches | None) -> str:
    stats = read_stats(prepared.train_dir)
    too_long = "longer than it" if cfg.data.truncation == "drop" else "with no target left"
    lines = [
        f"[fsdpqlora] data: {stats['source']} ({cfg.data.format}): {stats['rows']} rows -> {stats['examples']} examples "
        f"({stats['truncated']} {cfg.data.truncation} to data.seq_len={cfg.data.seq_len}, {stats['too_long']} skipped {too_long}, "
        f"{stats['bad_rows']} bad rows skipped); {stats['target_tokens'] / stats['tokens']:.0%} of {stats['tokens']:,} tokens are targets",
    ]
    lines += [f"[fsdpqlora]   skipped: {message}" for message in stats["first_bad"]]
    unit = "packed rows" if train.batching == "packed" else "examples"
    lines.append(
        f"[fsdpqlora] batches ({train.batching}): {plural(train.steps_per_epoch, 'step')} per epoch of {train.global_batch} {unit} "
        f"({len(train.examples)} examples), padding {train.epoch_padding():.1%} of the tokens"
        + (f"; {evaluation.num_examples} examples for evaluation" if evaluation else "")
    )
    return "\n".join(lines)

