"""Two nodes on one machine: two `fsdpqlora` launchers (one CPU worker each) meet at a c10d
rendezvous on loopback and train with hybrid_shard, replicating across the nodes. Losses and the
final adapter equal those of one node with two workers on the same mesh and global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fsdpqlora.distributed import _free_port
from tests.conftest import REPO, base_overrides
from tests.test_checkpoint import assert_same_adapter, finish, losses, torchrun

pytestmark = pytest.mark.distributed

RUN = ["train.max_steps=4", "train.log_every=1", "checkpoint.every_steps=2", "adapter.dropout=0.1"]


def test_two_nodes_over_c10d_equal_one_node(tmp_path, model_dir, cache_dir):
    overrides = [*base_overrides(model_dir, cache_dir), *RUN]
    one_node = tmp_path / "one-node"
    # One node, two workers, hybrid_shard with shard groups of one: the mesh two nodes of one
    # worker each get by default (replicate across nodes, shard inside one).
    code, out = finish(torchrun(one_node, [*overrides, "shard=hybrid_shard", "shard.hybrid_shard_size=1"]))
    assert code == 0, out[-4000:]

    two_nodes = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "fsdpqlora.launch.cli", *overrides, "shard=hybrid_shard", "launch.cpu_workers=1",
               "launch.nnodes=2", f"launch.rdzv_endpoint={endpoint}", "launch.rdzv_id=test-multinode",
               f"launch.output_root={two_nodes}"]  # fmt: skip
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    results = [finish(node) for node in nodes]
    for code, out in results:
        assert code == 0, out[-4000:]
        assert f"starting 1 workers on each of 2 nodes (rendezvous {endpoint})" in out
    run_dir = two_nodes / "test-multinode"  # <output_root>/<rdzv_id>, the same for both nodes
    assert " trainable parameters; 2 workers, shard=hybrid_shard" in "".join(out for _, out in results)
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3, 4]
    assert losses(run_dir) == losses(one_node)
    assert_same_adapter(run_dir, one_node)
