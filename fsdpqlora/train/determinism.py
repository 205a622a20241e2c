"""train.deterministic: the settings under which a CUDA run repeats itself bit for bit.

CPU runs are deterministic already (the bit-exact resume tests run on them). On CUDA, SDPA's fused
backward kernels (flash, memory-efficient, cuDNN) accumulate with atomics, so two runs of the same
configuration differ in the last bits of the gradients, and the difference grows over the steps.
"""

from __future__ import annotations

import os

import torch

# cuBLAS's documented setting for reproducible results: a fixed workspace per handle, read when
# cuBLAS starts, so it must be set before the first matrix product on the GPU.
CUBLAS_WORKSPACE = ":4096:8"


def make_deterministic() -> None:
    """Deterministic algorithms everywhere torch has them (a warning names an operation that has
    none, rather than ending a run hours in), cuBLAS's fixed workspace, and SDPA's math backend: the
    only attention backward without atomics."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)
