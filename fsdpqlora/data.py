"""Instruction data: records -> prompt/completion tokens with the prompt masked -> global batches.

Each optimizer step consumes one global batch of `micro_batch_size * grad_accum_steps * world_size`
examples, taken in order from a permutation that depends on the seed and the epoch only. Rank r's
k-th micro-batch is a fixed slice of that global batch, so the set of examples behind a step, and
with the token-weighted loss the step itself, is the same for any world size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from fsdpqlora import assets
from fsdpqlora.errors import DataError

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def data_path(cfg: DictConfig) -> Path:
    if cfg.data.name == "pydoc_qa" and not cfg.data.path:
        return assets.pydoc_qa_path(cfg.launch.cache_dir)
    if not cfg.data.path:
        raise DataError(f"data={cfg.data.name} needs data.path=FILE (a .json or .jsonl file)")
    path = Path(cfg.data.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path={cfg.data.path!r}: no such file")
    return path


def read_records(path: Path) -> list[dict]:
    """Rows of a .json (a list of objects) or .jsonl file. Errors name the file and the row."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects")
    else:
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {line_no} is not valid JSON ({exc.msg})") from None
    if not rows:
        raise DataError(f"{path}: the data set is empty")
    return rows


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_alpaca(rows: list[dict], tokenizer, seq_len: int, path: Path) -> tuple[list[Example], int]:
    """Prompt tokens (BOS included) are masked from the loss; the response and EOS are targets.
    Returns the examples and how many rows were dropped because truncation left no target."""
    examples, dropped = [], 0
    for row_no, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {row_no} is not an object")
        for field in ("instruction", "output"):
            if field not in row:
                raise DataError(f"{path}: row {row_no} has no field '{field}' (alpaca format needs instruction, output)")
        for field in ("instruction", "input", "output"):
            if not isinstance(row.get(field, ""), str):
                raise DataError(f"{path}: row {row_no} field '{field}' must be a string, got {type(row[field]).__name__}")
        prompt_ids = tokenizer(alpaca_prompt(row["instruction"], row.get("input", ""))).input_ids
        response_ids = tokenizer(row["output"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + response_ids)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append(Example(input_ids, labels))
    if not examples:
        raise DataError(f"{path}: every example is longer than data.seq_len={seq_len} in its prompt alone")
    return examples, dropped


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the micro-batch."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class StepBatches:
    """Yields, per optimizer step, this rank's `grad_accum_steps` micro-batches."""

    def __init__(self, examples: list[Example], cfg: DictConfig, rank: int, world_size: int, pad_id: int):
        self.examples = examples
        self.micro = cfg.train.micro_batch_size
        self.accum = cfg.train.grad_accum_steps
        self.rank, self.world_size = rank, world_size
        self.global_batch = self.micro * self.accum * world_size
        if len(examples) < self.global_batch:
            raise DataError(
                f"{len(examples)} examples are fewer than one global batch of {self.global_batch} "
                "(micro_batch_size x grad_accum_steps x workers)"
            )
        self.steps_per_epoch = len(examples) // self.global_batch
        self.seed = cfg.train.seed
        self.pad_id = pad_id
        self._cached_order: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._cached_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached_order = (epoch, torch.randperm(len(self.examples), generator=generator).tolist())
        return self._cached_order[1]

    def for_step(self, step: int) -> list[dict[str, torch.Tensor]]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        start = step_in_epoch * self.global_batch
        batches = []
        for k in range(self.accum):
            offset = start + (k * self.world_size + self.rank) * self.micro
            batches.append(collate([self.examples[i] for i in order[offset : offset + self.micro]], self.pad_id))
        return batches
