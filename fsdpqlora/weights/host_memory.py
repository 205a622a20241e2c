"""Keeping host RSS at what a streaming load or merge really holds (glibc's allocator)."""

from __future__ import annotations

import ctypes


class HostMemory:
    """Keeps host RSS at what the loaded shards hold, with glibc's allocator.

    Transient buffers (each tensor read, its quantized copy) are freed after every unit, but glibc
    keeps freed heap memory resident for reuse, and places new blocks into free heap space first:
    the space FSDP leaves when it re-pads the shards that `to_empty` allocated (0.6 GiB for a 1B
    model), then whatever earlier tensors left. Measured on a 1B Llama, RSS grew by 0.7 GiB over
    the load that way, with the model. So blocks from 1 MiB up are mapped on their own while
    loading (returned to the system when freed) and free heap pages are released after each unit
    (malloc_trim, a few milliseconds). Elsewhere than glibc this does nothing."""

    M_MMAP_THRESHOLD = -3

    def __init__(self):
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt, self.libc.malloc_trim  # noqa: B018 (glibc has both)
        except (OSError, AttributeError):
            self.libc = None

    def __enter__(self):
        if self.libc:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 1 << 20)
        return self

    def release(self) -> None:
        if self.libc:
            self.libc.malloc_trim(0)

    def __exit__(self, *exc):
        if self.libc:
            # Where glibc's own adaptive threshold ends up for a process that frees large blocks.
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 32 << 20)
            self.libc.malloc_trim(0)
