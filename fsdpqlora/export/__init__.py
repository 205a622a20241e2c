"""What happens with a trained result: find it, merge it into its base, answer prompts with it.

    locate.py    a run, checkpoint, adapter or merged directory -> config, base model, adapter
    merge.py     `fsdpqlora merge`: the adapter merged into the base, streamed into safetensors shards
    generate.py  `fsdpqlora generate`, and the end-of-run sample, through transformers + peft
"""
