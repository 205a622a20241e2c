"""Sequences of examples and their tensors: packed rows, or padded batches grouped by length.

A *sequence* is what becomes one row of a batch: with packing, several whole examples (never split
across rows) whose lengths add up to at most seq_len; without, one example. A micro-batch is as
wide as its longest sequence (at most seq_len, so memory is bounded by micro_batch_size x seq_len).

Packed rows carry position_ids that restart at 0 for each example and no attention mask. From those,
transformers (5.x) builds a block-diagonal causal mask for the eager, sdpa and flex_attention
implementations, so no token attends across examples (tests/integration/test_packing.py checks the loss of a
packed batch against the examples run one by one). flash_attention_2/3 read packing from
position_ids only for a batch of one row; with more rows they need cu_seq_lens passed in.
fsdpqlora builds its models with transformers' default, sdpa.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from fsdpqlora.data.tokenize import IGNORE_INDEX, TokenizedSet


def best_fit_decreasing(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Pack the examples `order` (indices into `lengths`) into rows of at most `capacity` tokens:
    longest first, each into the open row it fills best, a new row when none has room. Ties keep
    the order of `order`, so a shuffled order gives differently mixed rows. O(n log n)."""
    by_length = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    spaces: list[int] = []  # the distinct amounts of room left in open rows, sorted
    rows_with_space: dict[int, list[int]] = {}  # room left -> rows with exactly that much
    for example in by_length.tolist():
        need = int(lengths[example])
        k = bisect.bisect_left(spaces, need)
        if k < len(spaces):
            room = spaces[k]
            row = rows_with_space[room].pop()
            if not rows_with_space[room]:
                del rows_with_space[room]
                spaces.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(example)
        left = room - need
        if left > 0:
            if left not in rows_with_space:
                bisect.insort(spaces, left)
                rows_with_space[left] = []
            rows_with_space[left].append(row)
    return rows


def length_grouped(lengths: np.ndarray, order: np.ndarray, group: int, window: int) -> list[list[int]]:
    """Cut `order` into groups of `group` examples of similar length: within consecutive windows of
    `window` groups, sort by length and cut. The last incomplete group is left out."""
    groups = []
    span = group * window
    for start in range(0, len(order) - group + 1, span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        groups += [chunk[i : i + group].tolist() for i in range(0, len(chunk) - group + 1, group)]
    return groups


def collate(dataset: TokenizedSet, sequences: list[list[int]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """One micro-batch, its rows as long as its longest sequence. Packed: position_ids restart at
    each example, and the padding at a row's end is a segment of its own. attention_mask marks the
    real tokens either way; the step hands it to the model only for unpacked batches (given one,
    transformers does not look for packing in the position_ids)."""
    lengths = [sequence_length(dataset, seq) for seq in sequences]
    width = max(lengths)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    labels = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
    position_ids = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        at = 0
        for example in seq:
            n = int(dataset.lengths[example])
            input_ids[row, at : at + n] = dataset.input_ids(example)
            labels[row, at : at + n] = dataset.labels(example)
            position_ids[row, at : at + n] = np.arange(n)
            at += n
        attention_mask[row, :at] = 1
        position_ids[row, at:] = np.arange(width - at)
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention_mask),
    }
    if packed:
        batch["position_ids"] = torch.from_numpy(position_ids)
    return batch


def sequence_length(dataset: TokenizedSet, sequence: list[int]) -> int:
    return int(sum(dataset.lengths[e] for e in sequence))
