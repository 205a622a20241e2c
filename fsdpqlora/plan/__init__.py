"""The planner: will this configuration fit this rig, and which fitting one runs fastest?

- arch.py: every tensor of the model, from its config.json, built on the meta device as the workers
  build it (exact shapes of the packed 4-bit weights, their quantization state, the adapters).
- memory.py: bytes per GPU and host RAM; sharded state exact, activations and the rest modelled
  (the model is stated in its docstring).
- cost.py: the time of a step (FLOPs over the rig's throughput, collectives over the interconnect,
  offload over PCIe; overlap stated in its docstring).
- search.py: every combination of the levers, those that fit, the fastest first.
- checkpointing.py: shard.checkpoint_every=0 (auto), resolved to the least checkpointing that fits.
- length.py: data.seq_len=0 and train.max_steps=0, resolved for the machine and the data.
- rig.py: the rig presets (conf/rig/) or this machine, measured.
- command.py: `fsdpqlora plan`, and the launcher's check before it spawns workers.
"""
