"""fsdpqlora: QLoRA fine-tuning (NF4 base weights, LoRA adapters) sharded with PyTorch FSDP2."""

from fsdpqlora.compat import quiet_third_party_logs

quiet_third_party_logs()

__version__ = "0.1.0"
