"""The held-out evaluation examples (fsdpqlora/data/sampler.py split_eval): a seeded random share,
rounded up, the rest for training; both sorted, together every example once.
(tests/unit/test_data_batches.py checks the 10% case: sizes, disjoint, seeded.)"""

from __future__ import annotations

import numpy as np
import pytest

from fsdpqlora.data.sampler import split_eval


@pytest.mark.parametrize(
    "num_examples, fraction, held_out",
    [(100, 0.1, 10), (101, 0.1, 11), (7, 0.01, 1), (10, 0.5, 5), (10, 0.0, 0), (1, 0.5, 1), (0, 0.1, 0), (3, 1.0, 3)],
)
def test_the_held_out_share_is_rounded_up(num_examples, fraction, held_out):
    train, evaluation = split_eval(num_examples, fraction, seed=42)
    assert (len(train), len(evaluation)) == (num_examples - held_out, held_out)
    assert np.array_equal(np.sort(np.concatenate([train, evaluation])), np.arange(num_examples))
    assert np.array_equal(train, np.sort(train)) and np.array_equal(evaluation, np.sort(evaluation))


def test_the_same_seed_gives_the_same_split_in_any_process():
    # numpy's PCG64 seeded by [seed, 1_000_003]: what every rank and every resumed run computes
    assert split_eval(20, 0.2, seed=42)[1].tolist() == [2, 4, 6, 14]
    assert split_eval(20, 0.2, seed=43)[1].tolist() == [9, 10, 15, 16]


def test_a_larger_fraction_holds_out_a_superset():
    # one permutation per (size, seed): the first k of it are held out
    small, large = split_eval(50, 0.1, seed=3)[1], split_eval(50, 0.3, seed=3)[1]
    assert set(small.tolist()) < set(large.tolist())
