"""Instruction data: prompt masking, batching across ranks, and bad rows named."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from fsdpqlora.assets import pydoc_qa_records
from fsdpqlora.config import compose_config
from fsdpqlora.data import IGNORE_INDEX, StepBatches, alpaca_prompt, read_records, tokenize_alpaca
from fsdpqlora.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def test_prompt_is_masked_and_response_plus_eos_are_targets(tokenizer, tmp_path):
    row = {"instruction": "Name the statement.", "input": "", "output": "assert"}
    (example,), dropped = tokenize_alpaca([row], tokenizer, 256, tmp_path / "x.jsonl")
    prompt = tokenizer(alpaca_prompt("Name the statement.")).input_ids
    response = tokenizer("assert", add_special_tokens=False).input_ids
    assert prompt[0] == tokenizer.bos_token_id
    assert example.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response + [tokenizer.eos_token_id]
    assert dropped == 0
    assert tokenizer.decode(example.input_ids[len(prompt) :], skip_special_tokens=True) == "assert"


def test_input_field_goes_into_the_prompt():
    assert "### Input:\nx = 1\n\n### Response:\n" in alpaca_prompt("Explain.", "x = 1")


def test_truncation_keeps_prompt_and_drops_rows_without_targets(tokenizer, tmp_path):
    rows = [{"instruction": "word " * 200, "output": "answer"}, {"instruction": "Short.", "output": "answer " * 100}]
    examples, dropped = tokenize_alpaca(rows, tokenizer, 128, tmp_path / "x.jsonl")
    assert dropped == 1 and len(examples) == 1
    assert len(examples[0].input_ids) == len(examples[0].labels) == 128


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"instruction": "a"}], "row 1 has no field 'output'"),
        ([{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}], "row 2 field 'instruction' must be a string, got int"),
        ([["a", "b"]], "row 1 is not an object"),
    ],
)
def test_bad_rows_are_named(tokenizer, tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    with pytest.raises(DataError, match=f"{path}: {message}"):
        tokenize_alpaca(rows, tokenizer, 128, path)


def test_unreadable_files_are_named(tmp_path):
    not_json = tmp_path / "a.jsonl"
    not_json.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match="a.jsonl: row 2 is not valid JSON"):
        read_records(not_json)
    latin1 = tmp_path / "b.jsonl"
    latin1.write_bytes('{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="b.jsonl: not UTF-8 text"):
        read_records(latin1)
    empty = tmp_path / "c.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="c.jsonl: the data set is empty"):
        read_records(empty)


def test_every_prompt_too_long_is_an_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match="every example is longer than data.seq_len=16"):
        tokenize_alpaca([{"instruction": "word " * 50, "output": "b"}], tokenizer, 16, tmp_path / "x.jsonl")


def _step_examples(examples, world_size, accum, step):
    cfg = compose_config([f"train.micro_batch_size={4 // (world_size * accum)}", f"train.grad_accum_steps={accum}"])
    seen = []
    for rank in range(world_size):
        for batch in StepBatches(examples, cfg, rank, world_size, pad_id=0).for_step(step):
            seen.append(sorted(tuple(row[mask.bool()].tolist()) for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)))
    return seen


def test_ranks_see_disjoint_parts_of_the_same_global_batch(tokenizer, tmp_path):
    rows = pydoc_qa_records()[:40]
    examples, _ = tokenize_alpaca(rows, tokenizer, 128, tmp_path / "x.jsonl")
    for step in (0, 3, 11):  # 11 is in the second epoch: reshuffled
        two_ranks = _step_examples(examples, world_size=2, accum=1, step=step)
        one_process = _step_examples(examples, world_size=1, accum=2, step=step)
        flat = lambda parts: sorted(x for part in parts for x in part)  # noqa: E731
        assert flat(two_ranks) == flat(one_process)
        assert not set(two_ranks[0]) & set(two_ranks[1])
    assert _step_examples(examples, 2, 1, 0) != _step_examples(examples, 2, 1, 10)


def test_pydoc_qa_is_real_instruction_data():
    records = pydoc_qa_records()
    assert len(records) > 150
    assert all(r["instruction"] and len(r["output"]) >= 40 for r in records)
    assert any("assert" in r["instruction"] and "AssertionError" in r["output"] for r in records)
    json.dumps(records)
