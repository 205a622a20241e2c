"""Two nodes on one machine, one CPU worker each: the `fsdpqlora` launcher on one, plain torchrun
running `python -m fsdpqlora.train` on the other (README's command), meet at a c10d rendezvous on
loopback and train with hybrid_shard, replicating across the nodes. Losses and the final adapter
equal those of one node with two workers on the same mesh and global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fsdpqlora.parallel.process_group import _free_port
from tests.helpers import REPO, base_overrides
from tests.integration.test_checkpoint import assert_same_adapter, finish, losses, torchrun

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
    run_dir = two_nodes / "test-multinode"  # <output_root>/<rdzv_id>: what the launcher chooses
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    node_args = [*overrides, "shard=hybrid_shard"]
    launcher = [sys.executable, "-m", "fsdpqlora.launcher.cli", *node_args, "launch.cpu_workers=1", "launch.nnodes=2",
                f"launch.rdzv_endpoint={endpoint}", "launch.rdzv_id=test-multinode", f"launch.output_root={two_nodes}"]  # fmt: skip
    torchrun_node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={endpoint}", "--rdzv-id=test-multinode", "-m", "fsdpqlora.train", *node_args,
                     f"launch.run_dir={run_dir}"]  # fmt: skip
    nodes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in (launcher, torchrun_node)]
    (launcher_code, launcher_out), (torchrun_code, torchrun_out) = (finish(node) for node in nodes)
    assert launcher_code == 0, launcher_out[-4000:]
    assert torchrun_code == 0, torchrun_out[-4000:]
    assert f"starting 1 worker on each of 2 nodes (rendezvous {endpoint})" in launcher_out
    assert " trainable parameters; 2 workers, shard=hybrid_shard" in launcher_out + torchrun_out
    assert [step for step, _ in losses(run_dir)] == [1, 2, 3, 4]
    assert losses(run_dir) == losses(one_node)
    assert_same_adapter(run_dir, one_node)
