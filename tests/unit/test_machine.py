"""What depends on the machine: which device each worker computes on (launch.device), how many
workers the launcher starts, the refusal of 16-bit storage of the packed bytes on CUDA, and the
settings train.deterministic applies. A GPU count is a parameter here, so every case runs on CPU."""

from __future__ import annotations

import os
import re

import pytest
import torch

from fsdpqlora.config import Config, Device, DType, LaunchConfig, QuantConfig, StorageDType
from fsdpqlora.errors import ConfigError
from fsdpqlora.launcher import cli
from fsdpqlora.parallel.process_group import worker_device
from fsdpqlora.preflight import check_machine
from fsdpqlora.train.determinism import make_deterministic


@pytest.mark.parametrize(
    "device, local_rank, gpus, expected",
    [
        ("auto", 0, 0, "cpu"),
        ("auto", 1, 0, "cpu"),
        ("auto", 0, 1, "cuda:0"),
        ("auto", 1, 2, "cuda:1"),
        ("cpu", 1, 1, "cpu"),  # two gloo workers on a one-GPU machine
        ("cpu", 0, 8, "cpu"),
        ("cuda", 1, 2, "cuda:1"),
    ],
)
def test_each_worker_computes_on_its_own_gpu_or_on_the_cpu(device, local_rank, gpus, expected):
    assert worker_device(LaunchConfig(device=Device(device)), local_rank, gpus) == torch.device(expected)


def test_two_workers_on_one_gpu_are_refused_naming_the_way_out():
    message = (
        "launch.device='auto': worker 1 of this node has no GPU of its own (1 visible, one per worker); "
        "start at most 1 workers per node, or run the workers on CPU with launch.device=cpu"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        worker_device(LaunchConfig(), 1, 1)


def test_cuda_workers_without_a_gpu_are_refused():
    with pytest.raises(ConfigError, match=re.escape("launch.device='cuda': this machine shows no CUDA GPU; use launch.device=cpu")):
        worker_device(LaunchConfig(device=Device.cuda), 0, 0)


@pytest.mark.parametrize(
    "launch, gpus, workers",
    [
        (LaunchConfig(), 4, 4),  # one per GPU
        (LaunchConfig(), 0, 2),  # launch.cpu_workers
        (LaunchConfig(device=Device.cpu), 4, 2),  # CPU workers though GPUs are there
        (LaunchConfig(device=Device.cpu, nproc_per_node=3), 1, 3),
        (LaunchConfig(nproc_per_node=1), 2, 1),
    ],
)
def test_the_launcher_starts_a_worker_per_gpu_or_the_cpu_workers(monkeypatch, launch, gpus, workers):
    monkeypatch.setattr(cli, "_visible_gpus", lambda: gpus)
    assert cli.worker_count(Config(launch=launch)) == workers


def test_the_launcher_refuses_more_gpu_workers_than_gpus(monkeypatch):
    monkeypatch.setattr(cli, "_visible_gpus", lambda: 1)
    with pytest.raises(ConfigError, match=re.escape("launch.nproc_per_node=2: only 1 GPUs are visible")):
        cli.worker_count(Config(launch=LaunchConfig(nproc_per_node=2)))


@pytest.mark.parametrize("storage", [StorageDType.bfloat16, StorageDType.float16])
def test_16bit_storage_of_the_packed_bytes_is_refused_on_cuda_only(storage):
    cfg = Config(quant=QuantConfig(storage_dtype=storage, compute_dtype=DType(storage.value)))
    cfg.quant.check()  # a valid configuration in itself
    message = (
        f"quant.storage_dtype='{storage.value}': on CUDA, FSDP2's all-gather copy of 16-bit float storage "
        "rewrites NaN bit patterns and so corrupts packed 4-bit weights; use quant.storage_dtype=uint8"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_machine(cfg, has_cuda=True)
    check_machine(cfg, has_cuda=False)  # CPU copies keep every bit (tests/integration/test_gpu_paths.py)


@pytest.mark.parametrize("storage", [StorageDType.uint8, StorageDType.float32])
def test_storage_whose_copies_keep_every_bit_is_accepted_on_cuda(storage):
    check_machine(Config(quant=QuantConfig(storage_dtype=storage, compute_dtype=DType.float32)), has_cuda=True)


def test_deterministic_settings(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    backends = torch.backends.cuda
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(),
             backends.cudnn_sdp_enabled(), backends.math_sdp_enabled())  # fmt: skip
    try:
        make_deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
        assert not (backends.flash_sdp_enabled() or backends.mem_efficient_sdp_enabled() or backends.cudnn_sdp_enabled())
        assert backends.math_sdp_enabled()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        backends.enable_flash_sdp(saved[3])
        backends.enable_mem_efficient_sdp(saved[4])
        backends.enable_cudnn_sdp(saved[5])
        backends.enable_math_sdp(saved[6])
