"""Running on several processes: the process group, FSDP2 sharding, no_shard's replicated copies
and activation checkpointing.

    process_group.py  joining torchrun's group (nccl on GPUs, gloo on CPU) and the few collectives
                      on Python scalars the launcher's checks and the training step need
    fsdp.py           the device mesh per sharding strategy, fully_shard per decoder layer and root,
                      copying a full tensor into this rank's shard
    replicate.py      no_shard: plain copies on every rank, adapter gradients averaged in buckets
                      during backward (DDP-style)
    activations.py    recomputing decoder layers in backward, and their saved inputs in host memory
"""
