"""no_shard's gradient buckets (fsdpqlora/parallel/replicate.py plan_buckets): the parameters last
first, as backward produces their gradients, cut into consecutive buckets of at most the cap."""

from __future__ import annotations

import pytest

from fsdpqlora.parallel.replicate import plan_buckets


@pytest.mark.parametrize(
    "sizes, cap, expected",
    [
        ([4, 4, 4, 4], 8, [[3, 2], [1, 0]]),  # exactly full buckets
        ([4, 4, 4, 4], 9, [[3, 2], [1, 0]]),
        ([4, 4, 4, 4], 12, [[3, 2, 1], [0]]),
        ([4, 4, 4, 4], 100, [[3, 2, 1, 0]]),  # everything fits one
        ([4, 4, 4, 4], 3, [[3], [2], [1], [0]]),  # each tensor over the cap: a bucket of its own
        ([2, 20, 2, 2], 8, [[3, 2], [1], [0]]),  # a large tensor between small ones cuts before and after it
        ([5, 3, 1, 7], 8, [[3, 2], [1, 0]]),
        ([1], 8, [[0]]),
        ([], 8, []),
    ],
)
def test_buckets_are_consecutive_last_first_and_capped(sizes, cap, expected):
    assert plan_buckets(sizes, cap) == expected


@pytest.mark.parametrize("cap", [1, 7, 64, 1000])
def test_every_tensor_is_in_one_bucket_in_reverse_order(cap):
    sizes = [(i * 37) % 50 + 1 for i in range(40)]
    buckets = plan_buckets(sizes, cap)
    assert [i for bucket in buckets for i in bucket] == list(reversed(range(40)))
    assert all(sum(sizes[i] for i in bucket) <= cap or len(bucket) == 1 for bucket in buckets)
    # a bucket is closed only when the next tensor would not fit it
    closed = zip(buckets, buckets[1:], strict=False)
    assert all(sum(sizes[i] for i in bucket) + sizes[following[0]] > cap for bucket, following in closed)
