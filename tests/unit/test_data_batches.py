"""Batches: packing, each rank's share of a global batch that does not depend on the world size,
reshuffled epochs, and the saved position continuing exactly where it stopped."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from fsdpqlora.config import compose_config
from fsdpqlora.data import IGNORE_INDEX, EvalBatches, StepBatches, TokenizedSet
from fsdpqlora.data.packing import best_fit_decreasing, collate
from fsdpqlora.data.sampler import split_eval
from fsdpqlora.errors import DataError

BATCHINGS = ["packed", "length_grouped", "padded"]
SEQ_LEN = 64


def long_tailed(n: int = 120, seed: int = 0) -> TokenizedSet:
    """Examples with log-normal lengths (a few long, most short), their tokens telling them apart:
    example i is [1, 1000 + i, 1000 + i, ...], with the second half of it as targets."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=2.6, sigma=0.7, size=n).astype(int), 3, SEQ_LEN)
    return TokenizedSet.from_examples(
        [([1] + [1000 + i] * (n_ - 1), [False] * (n_ // 2) + [True] * (n_ - n_ // 2)) for i, n_ in enumerate(lengths)]
    )


# Composing a config takes ~0.4 s and the batch plans only read it: one per setting.
@functools.cache
def cfg_of(batching: str, micro: int, accum: int, seed: int = 42):
    return compose_config(
        [f"data.batching={batching}", f"data.seq_len={SEQ_LEN}", f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}", f"train.seed={seed}"]
    )


def examples_of(batch: dict[str, torch.Tensor]) -> list[int]:
    """The examples in a micro-batch, by the token that names each."""
    ids = batch["input_ids"][batch["attention_mask"].bool()]
    return sorted({int(t) - 1000 for t in ids if t >= 1000})


def global_batch(dataset, batching, micro, accum, world, step) -> list[int]:
    """Every example of step `step`, over all ranks and accumulation steps."""
    seen = []
    for rank in range(world):
        batches = StepBatches(dataset, np.arange(len(dataset)), cfg_of(batching, micro, accum), rank, world, pad_id=0)
        for _ in range(step):
            batches.next_step()
        for micro_batch in batches.next_step():
            seen += examples_of(micro_batch)
    return sorted(seen)


def test_best_fit_decreasing_packs_every_example_once_within_capacity():
    lengths = np.array([6, 5, 4, 3, 2, 2])
    rows = best_fit_decreasing(lengths, np.arange(6), capacity=8)
    assert [lengths[row].tolist() for row in rows] == [[6, 2], [5, 3], [4, 2]]  # best fit: 3 into the row with room 3
    dataset = long_tailed(500)
    rows = best_fit_decreasing(dataset.lengths, np.random.default_rng(0).permutation(500), SEQ_LEN)
    assert sorted(e for row in rows for e in row) == list(range(500))
    assert max(dataset.lengths[row].sum() for row in rows) <= SEQ_LEN
    assert len(rows) <= 1.03 * dataset.lengths.sum() / SEQ_LEN + 1  # within 3% of the unreachable bound


def test_packed_rows_restart_positions_at_each_example():
    dataset = TokenizedSet.from_examples([([1, 7, 8], [False, True, True]), ([1, 9], [False, True]), ([1, 5, 6, 4], [False, False, True, True])])
    batch = collate(dataset, [[0, 1], [2]], pad_id=0, packed=True)
    assert batch["input_ids"].tolist() == [[1, 7, 8, 1, 9], [1, 5, 6, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 8, -100, 9], [-100, -100, 6, 4, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    padded = collate(dataset, [[0], [2]], pad_id=0, packed=False)
    assert "position_ids" not in padded and padded["input_ids"].tolist() == [[1, 7, 8, 0], [1, 5, 6, 4]]


@pytest.mark.parametrize("batching", BATCHINGS)
def test_the_examples_of_a_step_do_not_depend_on_the_world_size(batching):
    """Global batch of 4 sequences: 2 ranks x 1 x 2, 1 process x 2 accumulation steps x 2, 4 ranks x 1 x 1."""
    dataset = long_tailed()
    steps_per_epoch = StepBatches(dataset, np.arange(len(dataset)), cfg_of(batching, 2, 2), 0, 1, 0).steps_per_epoch
    for step in (0, 3, steps_per_epoch + 1):  # the last one is in the second epoch
        two_ranks = global_batch(dataset, batching, micro=2, accum=1, world=2, step=step)
        assert global_batch(dataset, batching, micro=2, accum=2, world=1, step=step) == two_ranks
        assert global_batch(dataset, batching, micro=1, accum=1, world=4, step=step) == two_ranks


@pytest.mark.parametrize("batching", BATCHINGS)
def test_ranks_see_disjoint_data_and_epochs_reshuffle(batching):
    dataset = long_tailed()
    ranks = [StepBatches(dataset, np.arange(len(dataset)), cfg_of(batching, 2, 1), rank, 2, 0) for rank in range(2)]
    epochs = []
    for _ in range(2):
        seen = [[], []]
        for _ in range(ranks[0].steps_per_epoch):
            for rank, batches in enumerate(ranks):
                seen[rank] += [examples_of(b) for b in batches.next_step()]
        flat = [[e for part in rank_seen for e in part] for rank_seen in seen]
        assert not set(flat[0]) & set(flat[1])
        assert len(flat[0] + flat[1]) == len(set(flat[0] + flat[1]))  # nothing twice in an epoch
        # what an epoch leaves out is less than a global batch
        assert len(dataset) - len(flat[0] + flat[1]) < (4 * SEQ_LEN // 3 if batching == "packed" else 4)
        epochs.append(seen)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("batching", BATCHINGS)
def test_a_restored_position_continues_exactly(batching):
    dataset = long_tailed()
    cfg = cfg_of(batching, 2, 2)
    uninterrupted = StepBatches(dataset, np.arange(len(dataset)), cfg, 1, 2, 0)
    total = uninterrupted.steps_per_epoch + 4  # across an epoch boundary
    expected = [uninterrupted.next_step() for _ in range(total)]
    for stop in (3, uninterrupted.steps_per_epoch - 1, uninterrupted.steps_per_epoch + 1):
        interrupted = StepBatches(dataset, np.arange(len(dataset)), cfg, 1, 2, 0)
        for _ in range(stop):
            interrupted.next_step()
        state = json.loads(json.dumps(interrupted.state_dict()))  # plain values, small
        assert len(json.dumps(state)) < 300
        restored = StepBatches(dataset, np.arange(len(dataset)), cfg, 1, 2, 0)
        restored.load_state_dict(state)
        for want in expected[stop:]:
            got = restored.next_step()
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)


def test_a_position_from_another_run_is_refused():
    dataset = long_tailed()
    state = StepBatches(dataset, np.arange(len(dataset)), cfg_of("packed", 2, 2), 0, 2, 0).state_dict()
    other_seed = StepBatches(dataset, np.arange(len(dataset)), cfg_of("packed", 2, 2, seed=1), 0, 2, 0)
    with pytest.raises(DataError, match="its seed was 42, now 1; the batches would differ"):
        other_seed.load_state_dict(state)
    # 4 workers instead of 2 with the same micro-batches: a global batch twice as large
    with pytest.raises(DataError, match="its global_batch was 8, now 16"):
        StepBatches(dataset, np.arange(len(dataset)), cfg_of("packed", 2, 2), 0, 4, 0).load_state_dict(state)
    # 4 workers with half the accumulation: the same global batches, so the position holds
    StepBatches(dataset, np.arange(len(dataset)), cfg_of("packed", 2, 1), 0, 4, 0).load_state_dict(state)


def test_packing_and_length_grouping_cut_padding_on_long_tailed_data():
    dataset = long_tailed(400)
    padding = {b: StepBatches(dataset, np.arange(400), cfg_of(b, 4, 1), 0, 2, 0).epoch_padding() for b in BATCHINGS}
    assert padding["packed"] < 0.05 and padding["length_grouped"] < 0.1 < 0.3 < padding["padded"], padding


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_evaluation_batches_cover_every_example_once_on_any_world_size(batching):
    dataset = long_tailed(50)
    cfg = cfg_of(batching, 2, 1)
    _, held_out = split_eval(len(dataset), 0.3, seed=42)
    evaluation = EvalBatches(dataset, held_out, cfg, pad_id=0)
    for world in (1, 2, 3):
        per_rank = [list(evaluation.for_rank(rank, world)) for rank in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1  # every rank runs as many forwards
        targets = sorted(
            int(t) for batches in per_rank for b in batches for t in b["labels"][b["labels"] != IGNORE_INDEX]
        )
        assert targets == sorted(int(t) for e in held_out for t in dataset.labels(e) if t != IGNORE_INDEX)


def test_held_out_examples_are_seeded_and_disjoint():
    train, held_out = split_eval(100, 0.1, seed=42)
    assert len(held_out) == 10 and len(train) == 90 and not set(train) & set(held_out)
    assert split_eval(100, 0.1, seed=42)[1].tolist() == held_out.tolist() != split_eval(100, 0.1, seed=7)[1].tolist()
