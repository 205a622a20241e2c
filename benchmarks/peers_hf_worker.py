"""The Hugging Face route of benchmarks/peers.py, one process per rank under `accelerate launch`.

transformers `from_pretrained` with `BitsAndBytesConfig` (NF4, double quantization), peft's
`prepare_model_for_kbit_training` and `get_peft_model`, transformers' `Trainer`: the usual QLoRA
recipe. It trains on the rows peers.py wrote (token ids and labels made by fsdpqlora's data
pipeline), with the settings written beside them, and writes what it saw and measured per rank to
`<out>/rank<N>.json`: a hash of every micro-batch the Trainer handed the model, the loss of every
step, the seconds of every step, the evaluation loss, peak memory.

    accelerate launch --multi_gpu --num_processes 2 benchmarks/peers_hf_worker.py JOB.pt OUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import DistributedType
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

IGNORE_INDEX = -100
# How accelerate must have set up the processes: DDP on CPU (gloo) or GPUs, FSDP where asked. Anything
# else (DistributedType.NO: one replica per process, never synchronised) would time something else.
EXPECTED_DISTRIBUTED = {"ddp": (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU), "fsdp": (DistributedType.FSDP,)}


def batch_hash(batch: dict[str, torch.Tensor]) -> str:
    """Of the ids, labels and attention mask of a micro-batch, as int64 (peers.py hashes its own alike)."""
    digest = hashlib.sha256()
    for key in ("input_ids", "labels", "attention_mask"):
        tensor = batch[key].detach().to("cpu", torch.int64).contiguous()
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def features(row: tuple[list[int], list[int]]) -> dict[str, list[int]]:
    """A row as the collator takes it: token ids, labels and the attention mask, unpadded."""
    ids, labels = row
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class RowSet(torch.utils.data.Dataset):
    def __init__(self, rows: list[tuple[list[int], list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return features(self.rows[i])


class RecordingTrainer(Trainer):
    """The Trainer, unchanged but for a hash of every micro-batch it hands the model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_hashes: list[str] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batch_hashes.append(batch_hash(inputs))
        return super().training_step(model, inputs, num_items_in_batch)


class StepClock(TrainerCallback):
    """Seconds from one optimizer step's end to the next's (the first from the start of training),
    the loss the Trainer logs for each step (logging_steps=1: the mean over the global batch's
    target tokens), and a line on rank 0 when the first step is done, which peers.py times."""

    def __init__(self, is_main: bool):
        self.is_main, self.last = is_main, 0.0
        self.step_seconds: list[float] = []
        self.losses: dict[int, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now
        if self.is_main and state.global_step == 1:
            print("[peers-hf] first step done", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


def load_model(job: dict, state: PartialState):
    s = job["settings"]
    dtype = getattr(torch, s["dtype"])
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # FSDP flattens a unit's parameters into one tensor of one dtype: the packed bytes are
        # stored in the dtype of the others (the FSDP-QLoRA recipe of bitsandbytes and peft).
        bnb_4bit_quant_storage=dtype if s["parallel"] == "fsdp" else torch.uint8,
    )
    # Under FSDP accelerate places the shards itself; under DDP every rank holds the whole model.
    device_map = None if s["parallel"] == "fsdp" else {"": str(state.device)}
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], quantization_config=quantization, dtype=dtype, device_map=device_map)
    checkpointing = {"use_reentrant": False}  # the reentrant variant breaks DDP's gradient hooks on frozen inputs
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing)
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"], target_modules=s["target_modules"],
                      bias="none", task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, lora), checkpointing


def training_arguments(job: dict, out_dir: Path, checkpointing: dict) -> TrainingArguments:
    s = job["settings"]
    return TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        use_cpu=not s["cuda"],  # without it, accelerate on CPU leaves each process unsynchronised
        max_steps=s["steps"],
        per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=s["grad_accum_steps"],
        # "sequential": the rows in the order peers.py wrote them; accelerate then deals batch b to rank b % world.
        train_sampling_strategy=s["sampling"],
        dataloader_drop_last=True,
        learning_rate=s["lr"],
        adam_beta1=s["betas"][0],
        adam_beta2=s["betas"][1],
        adam_epsilon=1e-8,
        weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"],
        optim="adamw_torch",
        lr_scheduler_type=s["lr_scheduler_type"],
        lr_scheduler_kwargs=s["lr_scheduler_kwargs"],
        warmup_steps=s["warmup_steps"],
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs=checkpointing,
        bf16=s["dtype"] == "bfloat16",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=s["seed"],
        ddp_find_unused_parameters=False,
    )


@torch.no_grad()
def evaluation_loss(model, rows: list[tuple[list[int], list[int]]], collator, micro: int, device) -> tuple[float, int]:
    """The mean next-token loss over every target token of the rows, all ranks together (as
    fsdpqlora's evaluation counts it). Every rank runs as many forwards (FSDP gathers in each):
    a rank whose share has run out runs a stand-in without targets."""
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [rows[s : s + micro] for s in range(0, len(rows), micro)]
    rounds = -(-len(batches) // world)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    targets = torch.zeros((), dtype=torch.int64, device=device)
    model.eval()
    for j in range(rank, rounds * world, world):
        batch = {k: v.to(device) for k, v in collator([features(row) for row in batches[j % len(batches)]]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        if j >= len(batches):
            shifted.fill_(IGNORE_INDEX)
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        targets += (shifted != IGNORE_INDEX).sum()
    model.train()
    dist.all_reduce(loss_sum)
    dist.all_reduce(targets)
    return float(loss_sum / targets), int(targets)


def peak_memory(cuda: bool) -> dict[str, float]:
    peaks = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss: KiB on Linux
    if cuda:
        peaks["peak_cuda_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        peaks["peak_cuda_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", help="the rows and settings peers.py wrote (torch.save)")
    parser.add_argument("out_dir", help="where rank<N>.json goes")
    args = parser.parse_args(argv)
    job = torch.load(args.job, weights_only=False)
    s, out_dir = job["settings"], Path(args.out_dir)
    set_seed(s["seed"])
    state = PartialState(cpu=not s["cuda"])
    if state.distributed_type not in EXPECTED_DISTRIBUTED[s["parallel"]] or state.num_processes != s["world_size"]:
        sys.exit(f"peers_hf_worker: accelerate set up {state.distributed_type} over {state.num_processes} processes; "
                 f"expected {s['parallel']} over {s['world_size']} (see the launch command in benchmarks/peers.py)")  # fmt: skip
    model, checkpointing = load_model(job, state)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    if tokenizer.pad_token is None:  # fsdpqlora pads with EOS then (fsdpqlora.data.pad_id_of)
        tokenizer.pad_token = tokenizer.eos_token
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    clock = StepClock(state.is_main_process)
    trainer = RecordingTrainer(
        model=model,
        args=training_arguments(job, out_dir, checkpointing),
        train_dataset=RowSet(job["train"]),
        data_collator=collator,
        callbacks=[clock],
    )
    trainer.train()
    eval_loss, eval_tokens = evaluation_loss(trainer.model_wrapped, job["eval"], collator, s["micro_batch_size"], state.device)
    record = {
        "distributed_type": str(state.distributed_type),
        "batch_hashes": trainer.batch_hashes,
        "losses": [clock.losses[step] for step in sorted(clock.losses)],
        "step_seconds": clock.step_seconds,
        "eval_loss": eval_loss,
        "eval_tokens": eval_tokens,
        **peak_memory(s["cuda"]),
    }
    (out_dir / f"rank{state.process_index}.json").write_text(json.dumps(record))
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
