"""The trainable model: a Hugging Face causal LM of a known family, built on the meta device with
its linears as bitsandbytes 4-bit layers, and peft adapters on them.

    families.py   what each supported family needs (which linears become 4-bit, checkpoint renames)
    moe.py        mixture-of-experts experts as separate linears, so they can be 4-bit and adapted
    quant.py      Linear4bit in place of nn.Linear; NF4 quantization of one tensor
    skeleton.py   the meta-device model: 4-bit linears, tied weights, buffers no checkpoint holds
    adapters.py   LoRA/DoRA attached through peft, initialized alike on every rank, gathered and saved
    dropout.py    LoRA dropout with a cheaper mask on the CPU (a quarter of a random number per element)
    shared_input.py  one LoRA A product and dropout mask for linears that read the same input (q/k/v, gate/up)
    host_embedding.py  the input embedding kept in host memory, its rows copied to the GPU (shard.embedding_on_host)
    loss.py       the next-token loss, the head a chunk of tokens at a time
    directory.py  the model's files: the built-in tiny model, a local directory or a hub id
    build.py      the order of it all, which bounds memory: skeleton -> adapters -> checkpointing ->
                  shard -> weights
"""
