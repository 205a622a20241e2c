"""FSDP2's row layout (fsdpqlora/parallel/fsdp.py row_range, behind local_rows and matching
copy_into_shard): rows split as torch.chunk splits them, shards past the last chunk empty."""

from __future__ import annotations

import pytest
import torch

from fsdpqlora.parallel.fsdp import row_range


@pytest.mark.parametrize(
    "rows, shards, expected",
    [
        (8, 2, [(0, 4), (4, 8)]),
        (7, 2, [(0, 4), (4, 7)]),
        (10, 4, [(0, 3), (3, 6), (6, 9), (9, 10)]),
        (5, 4, [(0, 2), (2, 4), (4, 5), (5, 5)]),  # torch.chunk makes 3 chunks: the 4th shard is empty
        (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),
        (1, 3, [(0, 1), (1, 1), (1, 1)]),
        (6, 1, [(0, 6)]),
    ],
)
def test_row_ranges(rows, shards, expected):
    assert [row_range(rows, shards, index) for index in range(shards)] == expected


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 9, 16, 31, 100])
def test_row_ranges_are_torch_chunks(rows, shards):
    full = torch.arange(rows)
    chunks = torch.chunk(full, shards)
    for index in range(shards):
        start, stop = row_range(rows, shards, index)
        expected = chunks[index] if index < len(chunks) else full[:0]
        assert full[start:stop].tolist() == expected.tolist()


def test_no_rows_gives_every_shard_nothing():
    assert [row_range(0, 4, index) for index in range(4)] == [(0, 0)] * 4
