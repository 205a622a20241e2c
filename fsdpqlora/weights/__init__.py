"""Checkpoint files: safetensors read tensor by tensor, and streamed into the sharded 4-bit model.

    files.py        safetensors headers, positioned reads, read-ahead threads, a streaming writer
    units.py        the checkpoint's tensors grouped by the model tensor each fills; 4-bit quantization
                    of a unit as training holds it; the checks every tensor passes
    load.py         streaming a checkpoint into the sharded model (every rank reads, or rank 0 broadcasts)
    host_memory.py  keeping host RSS at what is really held while streaming

`fsdpqlora merge` uses the same API (headers, units, quantization, the writer) on one process.
"""

from fsdpqlora.weights.files import (
    INDEX_FILE,
    SINGLE_FILE,
    StreamingShardWriter,
    TensorEntry,
    checkpoint_entries,
    header_room,
    read_header,
    read_tensor,
    stream_tensors,
)
from fsdpqlora.weights.host_memory import HostMemory
from fsdpqlora.weights.load import LoadStats, load_weights, resolve_mode
from fsdpqlora.weights.units import (
    Unit,
    check_finite,
    check_shape,
    plan_units,
    prequantized_weight_name,
    quant_state_suffixes,
    quantized_weight,
)

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "HostMemory",
    "LoadStats",
    "StreamingShardWriter",
    "TensorEntry",
    "Unit",
    "check_finite",
    "check_shape",
    "checkpoint_entries",
    "header_room",
    "load_weights",
    "plan_units",
    "prequantized_weight_name",
    "quant_state_suffixes",
    "quantized_weight",
    "read_header",
    "read_tensor",
    "resolve_mode",
    "stream_tensors",
]
