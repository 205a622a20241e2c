"""`fsdpqlora data [-n N] [OVERRIDE ...]`: the data as the model will see it, without training.

Runs the pipeline the launcher runs (pipeline.prepare, build_batches: the same rows, format,
tokens, truncation, cache and batches), prints its summary (rows, examples cut or dropped, bad
rows, packed rows and their padding) and N training examples decoded back to text, with the tokens
that carry no loss (the prompt, unless data.train_on_prompt) between [[ and ]]. Needs the model's
tokenizer only: a hub model's weights are not downloaded.
"""

from __future__ import annotations

import argparse
import sys

from fsdpqlora.config import Config
from fsdpqlora.data.tokenize import TokenizedSet

MASKED_OPEN, MASKED_CLOSE = "[[", "]]"


def render(dataset: TokenizedSet, i: int, tokenizer) -> str:
    """Example i as text, its runs of tokens without loss between MASKED_OPEN and MASKED_CLOSE. Each
    run is decoded on its own, so the marks fall exactly on the token boundaries of the mask."""
    ids, targets = dataset.input_ids(i).tolist(), dataset.target_mask(i).tolist()
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or targets[end] != targets[start]:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            parts.append(text if targets[start] else f"{MASKED_OPEN}{text}{MASKED_CLOSE}")
            start = end
    return "".join(parts)


def preview(cfg: Config, count: int, workers: int) -> str:
    from fsdpqlora.data.pipeline import build_batches, pad_id_of, prepare
    from fsdpqlora.model.directory import check_tokenizer, resolve_model_dir

    tokenizer = check_tokenizer(resolve_model_dir(cfg, weights=False))
    prepared = prepare(cfg, tokenizer, show_progress=sys.stdout.isatty())
    data = build_batches(cfg, prepared, 0, workers, pad_id_of(tokenizer))
    train = data.train
    lines = [data.summary]
    if train.batching == "packed":
        rows = train.epoch_sequences()
        lines.append(
            f"[fsdpqlora] packing: {len(train.examples)} examples into {rows} rows of at most "
            f"data.seq_len={cfg.data.seq_len} tokens ({len(train.examples) / rows:.1f} examples per row; "
            "no token attends across examples); "
            f"{rows - train.steps_per_epoch * train.global_batch} left out of the epoch, short of a global batch "
            "(the next epoch reshuffles)"
        )
    lines.append(
        f"[fsdpqlora] global batch: {train.global_batch} sequences = train.micro_batch_size "
        f"{cfg.train.micro_batch_size} x train.grad_accum_steps {cfg.train.grad_accum_steps} x {workers} workers"
    )
    shown = train.examples[:count].tolist()
    masked = "the first token, data.train_on_prompt=true" if cfg.data.train_on_prompt else "the prompt"
    lines.append(
        f"\n{len(shown)} of the {len(train.examples)} training examples as the model sees them; "
        f"{MASKED_OPEN}...{MASKED_CLOSE}: no loss ({masked}), the rest is what it learns to write:"
    )
    for number, i in enumerate(shown, 1):
        n, trained = int(train.dataset.lengths[i]), int(train.dataset.target_mask(i).sum())
        at_limit = f", data.seq_len reached (data.truncation={cfg.data.truncation})" if n == cfg.data.seq_len else ""
        lines.append(f"\n--- example {number}: {n} tokens, {trained} trained, {n - trained} without loss{at_limit} ---")
        lines.append(render(train.dataset, i, tokenizer))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from fsdpqlora.config import compose_config
    from fsdpqlora.data.pipeline import check_sources
    from fsdpqlora.errors import ConfigError, exit_on_user_error
    from fsdpqlora.launcher.cli import worker_count

    parser = argparse.ArgumentParser(
        prog="fsdpqlora data",
        description="Show the data as the model will see it: what tokenizing, truncation and packing do, and "
        "N examples with the tokens that carry no loss between [[ and ]]. Same overrides as a run.",
    )
    parser.add_argument("-n", "--preview", type=int, default=3, metavar="N", help="examples to show (default 3)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=alpaca_json data.path=train.jsonl")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if args.preview < 0:
            raise ConfigError(f"--preview {args.preview}: must be >= 0")
        cfg = compose_config(args.overrides)
        cfg.check()
        check_sources(cfg)
        workers = worker_count(cfg) * (cfg.launch.nnodes or 1)
        print(preview(cfg, args.preview, workers))
    sys.stdout.flush()
    return 0
