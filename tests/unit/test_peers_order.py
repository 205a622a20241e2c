"""benchmarks/peers.py `sequential_order`: the order in which the Hugging Face Trainer must read the
rows so that, under accelerate's sharding (BatchSamplerShard, the real class) and the Trainer's
gradient accumulation, every rank gets at every step the micro-batches our run gave it."""

from __future__ import annotations

import sys

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from peers import sequential_order  # noqa: E402


def what_each_rank_reads(rows: list, micro: int, accum: int, world: int) -> list[list[list]]:
    """[rank][step][accumulation step] -> rows, as the Trainer under accelerate deals them out: a
    sequential sampler cut into batches of `micro`, the b-th batch to rank b % world, each rank's
    consecutive batches the accumulation steps of one optimizer step."""
    batches = BatchSampler(SequentialSampler(range(len(rows))), batch_size=micro, drop_last=True)
    per_rank = []
    for rank in range(world):
        mine = [[rows[i] for i in batch] for batch in BatchSamplerShard(batches, num_processes=world, process_index=rank)]
        per_rank.append([mine[s : s + accum] for s in range(0, len(mine), accum)])
    return per_rank


@pytest.mark.parametrize("world, accum", [(2, 1), (2, 2), (3, 2), (1, 3)])
def test_every_rank_reads_its_micro_batches_step_by_step(world, accum):
    micro, steps = 4, 5
    # Micro-batch (rank, step, accumulation step) holds rows named after it.
    ours = [[[[(r, s, k, i) for i in range(micro)] for k in range(accum)] for s in range(steps)] for r in range(world)]
    rows = [row for micro_batch in sequential_order(ours) for row in micro_batch]
    assert what_each_rank_reads(rows, micro, accum, world) == ours
