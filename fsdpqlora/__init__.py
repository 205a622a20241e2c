"""fsdpqlora: QLoRA fine-tuning (NF4 base weights, LoRA adapters) sharded with PyTorch FSDP2."""

import logging
import warnings

# bitsandbytes logs at import, on every AVX512-BF16 CPU, that the optional `kernels` package is
# missing; its own CPU kernels serve instead. Harmless, and it would bury our one-line errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "Failed to load CPU gemm_4bit_forward" not in record.getMessage()
)

# peft asks transformers for a property that transformers 5 has renamed; each rank would print it.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)

__version__ = "0.1.0"
