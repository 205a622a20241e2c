"""Shared fixtures: a small random Llama checkpoint written by the tests, and configs pointing at it.
The helpers they use (and the tests import) are in tests/helpers.py. The tests run on CPU, a GPU
machine's too (tests/helpers.py CPU_ONLY)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import BF16, CPU_ONLY, FP32, SHARDED_RUNS, _run, write_qa_file, write_test_model

os.environ.update(CPU_ONLY)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    return write_qa_file(tmp_path_factory.mktemp("data") / "qa.jsonl")


@pytest.fixture()
def process_group(monkeypatch):
    """A gloo group of one in the test process, for building models in-process."""
    import torch.distributed as dist

    from fsdpqlora.parallel.process_group import _free_port, init_distributed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    d = init_distributed()
    yield d
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def runs(tmp_path_factory, model_dir, cache_dir, qa_file):
    tmp = tmp_path_factory.mktemp("dist")
    results = {"reference": _run(tmp, "reference", 0, FP32 + ["train.grad_accum_steps=2"], model_dir, cache_dir, qa_file)}
    for name, overrides in SHARDED_RUNS.items():
        results[name] = _run(tmp, name, 2, FP32 + overrides, model_dir, cache_dir, qa_file)
    results["bf16_reference"] = _run(tmp, "bf16_reference", 0, BF16 + ["train.grad_accum_steps=2"], model_dir, cache_dir, qa_file)
    results["bf16_sharded"] = _run(tmp, "bf16_sharded", 2, BF16, model_dir, cache_dir, qa_file)
    results["dir"] = tmp
    return results
