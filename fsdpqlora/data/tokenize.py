"""Text segments -> token ids and loss mask, truncated to data.seq_len, tokenized once and cached.

Each segment is tokenized on its own and the ids are concatenated, so the prompt's tokens are those
the prompt alone gives at generation time and the mask boundary falls exactly between segments.
BOS starts an example where the tokenizer adds one by itself; formats that end in a completion get
EOS after it. The first token of every example is never a target (nothing precedes it to predict
it), which also keeps a packed row from predicting one example's first token from the last token
of the example before it.

The cache: three flat arrays (tokens, is-target mask, example offsets) in a directory under
`<launch.cache_dir>/tokenized/`, named by a hash of everything that decides their content (the
source's files or hub fingerprint, the format settings, the tokenizer, seq_len, truncation), written
under a temporary name and renamed, and memory-mapped by every rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fsdpqlora import assets
from fsdpqlora.config import Config, to_dict
from fsdpqlora.data.formats import RowError, Segment
from fsdpqlora.data.sources import Row, Source
from fsdpqlora.errors import DataError

IGNORE_INDEX = -100
# Bump when what is cached for the same inputs changes.
CACHE_VERSION = "v1"
# The data settings that decide the cached examples (others, e.g. batching, only decide their use).
CACHE_KEYS = (
    "subset", "format", "messages_field", "chat_template", "user_marker", "assistant_marker", "text_field", "prompt_template",
    "completion_template", "train_on_prompt", "seq_len", "truncation", "on_bad_row", "max_examples",
)  # fmt: skip
ROWS_PER_CALL = 512  # rows tokenized per call into the (Rust, multi-threaded) tokenizer


class TokenizedSet:
    """Examples as flat arrays: example i is tokens[offsets[i]:offsets[i + 1]], with is_target
    marking the tokens that carry loss."""

    def __init__(self, tokens: np.ndarray, is_target: np.ndarray, offsets: np.ndarray, key: str = ""):
        self.tokens, self.is_target, self.offsets, self.key = tokens, is_target, offsets, key
        self.lengths = np.diff(offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def input_ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def labels(self, i: int) -> np.ndarray:
        start, end = self.offsets[i], self.offsets[i + 1]
        return np.where(self.is_target[start:end], self.tokens[start:end], IGNORE_INDEX)

    def target_mask(self, i: int) -> np.ndarray:
        return self.is_target[self.offsets[i] : self.offsets[i + 1]]

    def prompt_length(self, i: int) -> int:
        """The tokens of example i before its first target: its prompt. An example trained on from
        its second token (the text format, data.train_on_prompt) has its first half, up to 64
        tokens, as a stand-in."""
        mask = self.target_mask(i)
        first = int(np.argmax(mask)) if mask.any() else len(mask)
        return first if first > 1 else min(len(mask) // 2, 64)

    @classmethod
    def from_examples(cls, examples: list[tuple[list[int], list[bool]]], key: str = "") -> TokenizedSet:
        lengths = [len(ids) for ids, _ in examples]
        return cls(
            np.fromiter((t for ids, _ in examples for t in ids), dtype=np.int32, count=sum(lengths)),
            np.fromiter((m for _, mask in examples for m in mask), dtype=bool, count=sum(lengths)),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            key,
        )

    @classmethod
    def load(cls, directory: Path) -> TokenizedSet:
        arrays = [np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("tokens", "is_target", "offsets")]
        return cls(*arrays, key=directory.name)

    def save(self, directory: Path) -> None:
        for name in ("tokens", "is_target", "offsets"):
            np.save(directory / f"{name}.npy", getattr(self, name))


@dataclass
class TokenizeStats:
    rows: int = 0
    examples: int = 0
    bad_rows: int = 0
    too_long: int = 0  # dropped: no target left within seq_len (cut), or longer than seq_len (drop)
    truncated: int = 0  # cut to seq_len, or split into several windows (split)
    tokens: int = 0
    target_tokens: int = 0
    first_bad: list[str] = field(default_factory=list)  # the first few bad rows' messages, for the log


# Tokens of margin between the first seq_len tokens and a text cut before tokenizing (Encoder).
PRECUT_SLACK = 256


class Encoder:
    """Segments -> (ids, is_target) pieces no longer than seq_len, by the truncation policy."""

    def __init__(self, tokenizer, fmt, cfg: Config):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.seq_len, self.truncation, self.train_on_prompt = cfg.data.seq_len, cfg.data.truncation, cfg.data.train_on_prompt
        # With cut or drop, only whether an example exceeds seq_len and its first seq_len tokens
        # matter; no token spans more characters than the vocabulary's longest entry, so a text cut
        # to this many characters still holds more than seq_len tokens (a 50 MB row tokenizes in
        # milliseconds instead of a minute). The PRECUT_SLACK tokens before the cut keep the
        # first seq_len tokens those of the whole text: a merge changed at the cut can only reach
        # back that far through a chain of overlapping merges, which real text never holds.
        longest = max(map(len, tokenizer.get_vocab()))
        self.max_chars = (self.seq_len + PRECUT_SLACK) * longest if self.truncation != "split" else None
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [bos]
        self.bos = [bos] if adds_bos and fmt.adds_bos else []
        self.eos = [tokenizer.eos_token_id] if fmt.adds_eos else []

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt tokenized as training tokenized prompts, for generation."""
        return self.bos + self.tokenizer(prompt, add_special_tokens=False).input_ids

    def bounded(self, text: str) -> str:
        """The part of a segment's text that can reach the first seq_len tokens (see __init__)."""
        return text if self.max_chars is None else text[: self.max_chars]

    def join(self, segments: list[Segment], segment_ids: list[list[int]]) -> tuple[list[int], list[bool]]:
        ids, is_target = list(self.bos), [False] * len(self.bos)
        for segment, seg_ids in zip(segments, segment_ids, strict=True):
            ids += seg_ids
            is_target += [segment.is_completion or self.train_on_prompt] * len(seg_ids)
        if self.eos:
            ids += self.eos
            is_target.append(True)
        if ids:
            is_target[0] = False
        return ids, is_target

    def fit(self, ids: list[int], is_target: list[bool]) -> tuple[list[tuple[list[int], list[bool]]], bool]:
        """(pieces that fit seq_len, whether the example was shortened). An empty list: dropped."""
        n = self.seq_len
        if len(ids) <= n:
            pieces, shortened = [(ids, is_target)], False
        elif self.truncation == "drop":
            return [], True
        elif self.truncation == "cut":
            pieces, shortened = [(ids[:n], is_target[:n])], True
        else:  # split: windows overlapping by one token, so every token but the first stays a target once
            pieces = [(ids[s : s + n], [False] + is_target[s + 1 : s + n]) for s in range(0, len(ids) - 1, n - 1)]
            shortened = True
        return [(i, m) for i, m in pieces if any(m)], shortened


def tokenize_source(
    source: Source, fmt, tokenizer, cfg: Config, max_rows: int = 0, show_progress: bool = True
) -> tuple[TokenizedSet, TokenizeStats]:
    """Read, check and tokenize every row of the source (the first max_rows when > 0)."""
    from tqdm import tqdm

    encoder = Encoder(tokenizer, fmt, cfg)
    stats = TokenizeStats()
    examples: list[tuple[list[int], list[bool]]] = []
    total = source.count_hint()
    if max_rows:
        total = min(total or max_rows, max_rows)
    bar = tqdm(total=total, desc="tokenizing", unit=" rows", file=sys.stdout, disable=not show_progress, dynamic_ncols=True)
    pending: list[tuple[Row, list[Segment]]] = []

    def flush() -> None:
        texts = [encoder.bounded(s.text) for _, segments in pending for s in segments]
        token_ids = iter(tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
        for _, segments in pending:
            ids, is_target = encoder.join(segments, [next(token_ids) for _ in segments])
            pieces, shortened = encoder.fit(ids, is_target)
            if not pieces:
                stats.too_long += 1
            elif shortened:
                stats.truncated += 1
            examples.extend(pieces)
        bar.update(len(pending))
        pending.clear()

    # Closed on any error too, so that the error's line starts below the bar, not on it.
    with bar:
        for row in source.rows():
            if max_rows and stats.rows == max_rows:
                break
            stats.rows += 1
            try:
                pending.append((row, fmt.segments(row.fields)))
            except RowError as exc:
                if cfg.data.on_bad_row == "error":
                    raise DataError(f"{row.where}, {exc} (data.on_bad_row=skip skips bad rows)") from None
                stats.bad_rows += 1
                if len(stats.first_bad) < 3:
                    stats.first_bad.append(f"{row.where}, {exc}")
            if len(pending) == ROWS_PER_CALL:
                flush()
        flush()
    _refuse_nothing_left(source, stats, examples, cfg)
    dataset = TokenizedSet.from_examples(examples)
    stats.examples = len(dataset)
    stats.tokens = int(dataset.lengths.sum())
    stats.target_tokens = int(dataset.is_target.sum())
    return dataset, stats


def _refuse_nothing_left(source: Source, stats: TokenizeStats, examples: list, cfg: Config) -> None:
    if examples:
        return
    if stats.rows == 0:
        raise DataError(f"{source.name}: the data set is empty")
    if stats.bad_rows == stats.rows:
        raise DataError(f"{source.name}: every row is bad and was skipped; the first: {stats.first_bad[0]}")
    why = "in its prompt alone" if cfg.data.truncation == "cut" else ""
    raise DataError(
        f"{source.name}: every example is longer than data.seq_len={cfg.data.seq_len} {why}".rstrip()
        + f" (data.truncation={cfg.data.truncation})"
    )


def cache_key(source: Source, fmt, tokenizer, cfg: Config) -> str:
    data = to_dict(cfg.data)
    settings = {k: data[k] for k in CACHE_KEYS}
    parts = [
        CACHE_VERSION,
        source.fingerprint(),
        source.split,
        json.dumps(settings, sort_keys=True),
        getattr(fmt, "template", ""),  # a chat template read from a file
        tokenizer_fingerprint(tokenizer),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's whole definition (vocabulary, merges, normalizer, special tokens) and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None)])
    return hashlib.sha256((definition + extra).encode()).hexdigest()


def cached_tokenize(
    source: Source, fmt, tokenizer, cfg: Config, max_rows: int = 0, show_progress: bool = True
) -> Path:
    """The cache directory of this source's examples, tokenizing them first if it is not there."""
    target = assets.cache_root(cfg.launch.cache_dir) / "tokenized" / cache_key(source, fmt, tokenizer, cfg)

    def build(tmp: Path) -> None:
        dataset, stats = tokenize_source(source, fmt, tokenizer, cfg, max_rows, show_progress)
        dataset.save(tmp)
        (tmp / "stats.json").write_text(json.dumps({"source": source.name, **stats.__dict__}, indent=1))

    return assets.atomic_build(target, build)


def read_stats(directory: Path) -> dict:
    return json.loads((directory / "stats.json").read_text())
