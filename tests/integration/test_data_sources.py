"""Where rows come from, the cache, and bad input: named by file, row and field, in the launcher
before any worker starts, and in the workers without leaving a rank waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from fsdpqlora.config import compose_config, validate
from fsdpqlora.data import build_batches, pad_id_of, prepare
from fsdpqlora.data.sources import open_source, read_file
from fsdpqlora.errors import DataError
from tests.helpers import REPO, base_overrides, run_launcher

ROWS = [
    {"instruction": "Name the statement.", "input": "", "output": "assert"},
    {"instruction": "What raises, when false?", "input": "assert x", "output": "AssertionError, with \"quotes\", commas\nand lines"},
]


def write(path, rows=ROWS):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def cfg_for(tmp_path, path, *overrides):
    cfg = compose_config([f"launch.cache_dir={tmp_path / 'cache'}", f"data.path={path}", *overrides])
    validate(cfg)
    return cfg


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_type_gives_the_same_rows(tmp_path, suffix):
    path = write(tmp_path / f"train{suffix}")
    rows = list(read_file(path))
    assert [r.fields for r in rows] == ROWS
    assert [r.where for r in rows] == [f"{path}: row 1", f"{path}: row 2"]


def test_a_txt_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Chapter 1\n\nIt was a dark night.\n")
    assert [r.fields for r in read_file(path)] == [{"text": "Chapter 1\n\nIt was a dark night.\n"}]


def test_a_directory_is_split_by_file_name(tmp_path):
    write(tmp_path / "train-00.jsonl", ROWS[:1])
    write(tmp_path / "train-01.parquet", ROWS[1:])
    write(tmp_path / "test.csv")
    (tmp_path / "README.md").write_text("# my data")
    cfg = cfg_for(tmp_path, tmp_path)
    assert [r.fields for r in open_source(cfg).rows()] == ROWS
    assert [r.fields for r in open_source(cfg, split="test").rows()] == ROWS
    with pytest.raises(DataError, match=r"no data files for split 'validation' \(splits found: test, train\)"):
        open_source(cfg, split="validation")


def test_tokenized_once_then_read_from_the_cache(tmp_path, tokenizer):
    path = write(tmp_path / "train.jsonl", ROWS * 8)
    cfg = cfg_for(tmp_path, path, "data.eval_fraction=0.25")
    first = prepare(cfg, tokenizer, show_progress=False)
    assert first.train_dir.parent == tmp_path / "cache" / "tokenized"
    stamp = (first.train_dir / "tokens.npy").stat().st_mtime_ns
    assert prepare(cfg, tokenizer, show_progress=False) == first
    assert (first.train_dir / "tokens.npy").stat().st_mtime_ns == stamp
    # What decides the tokens gives a new cache; what only decides their use does not.
    assert prepare(cfg_for(tmp_path, path, "data.seq_len=200"), tokenizer, show_progress=False) != first
    assert prepare(cfg_for(tmp_path, path, "data.batching=padded"), tokenizer, show_progress=False) == first
    write(path, ROWS * 9)
    assert prepare(cfg, tokenizer, show_progress=False) != first
    data = build_batches(cfg, first, 0, 1, pad_id_of(tokenizer))
    assert (len(data.train.examples), data.eval.num_examples) == (12, 4)
    assert "16 rows -> 16 examples" in data.summary


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', "a.jsonl: row 2 is not valid JSON"),
        ("a.jsonl", '{"instruction": "a", "output": "b"}\n["a", "b"]\n', "a.jsonl: row 2 is not an object but a list"),
        ("a.jsonl", '{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"), "a.jsonl: row 1 is not UTF-8 text"),
        ("a.jsonl", b"PAR1\x15\x04\x15\x80\x01", "a.jsonl: row 1 is not UTF-8 text (invalid start byte at byte 7) (is it a JSON-lines file?)"),
        ("a.json", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n', "a.json: not valid JSON (Extra data at line 2 column 1); one object per line is a .jsonl file"),
        ("a.json", '{"instruction": "a"}', "a.json: a .json data file must hold a list of objects, not a dict"),
        ("a.parquet", '{"instruction": "a", "output": "b"}\n', "a.parquet: not a parquet file"),
        ("a.csv", b"instruction,output\ncaf\xe9,b\n", "a.csv: not UTF-8 text"),
        ("a.csv", "instruction,output\na,b,c\n", "a.csv: row 1 has 3 values, the header names 2"),
        ("a.xlsx", "x", "a.xlsx: unsupported file type .xlsx; use .jsonl, .json, .parquet, .csv, .txt"),
        ("a.jsonl", "\n", "a.jsonl: the data set is empty"),
        ("a.jsonl", '{"instruction": "a"}\n', "a.jsonl: row 1, field 'output': missing (the alpaca format needs instruction and output; input is optional)"),
        ("a.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n', "a.jsonl: row 2, field 'instruction': must be a string, got int"),
        ("a.jsonl", '{"instruction": "a", "output": null}\n', "a.jsonl: row 1, field 'output': null"),
    ],
)
def test_bad_files_and_rows_are_named(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as info:
        prepare(cfg_for(tmp_path, path), tokenizer, show_progress=False)
    assert str(info.value).startswith(f"{tmp_path}/{message}"), str(info.value)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache").glob("tokenized/*")), "nothing half-written left in the cache"


@pytest.mark.parametrize(
    "rows, overrides, message",
    [
        ([{"text": "hi"}], ["data.format=chat"], "row 1, field 'messages': missing"),
        ([{"messages": "hi"}], ["data.format=chat"], "row 1, field 'messages': must be a list of messages, got str; set data.user_marker"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], ["data.format=chat"], "row 1, field 'messages': has no assistant message"),
        ([{"messages": [{"role": "narrator", "content": "hi"}]}], ["data.format=chat"], "row 1, field 'messages': message 1 has role 'narrator'"),
        ([{"messages": [{"role": "user", "content": 5}]}], ["data.format=chat"], "row 1, field 'messages': message 1 content must be a string, got int"),
        ([{"body": "hi"}], ["data.format=text"], "row 1, field 'text': missing (the text format reads data.text_field=text)"),
        ([{"q": "hi", "a": True}], ["data.format=template", "data.prompt_template='{q}'", "data.completion_template='{a}'"], "row 1, field 'a': must be a string or a number, got bool"),
    ],
)
def test_bad_rows_of_each_format_are_named(tmp_path, tokenizer, rows, overrides, message):
    path = write(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError, match=f"^{path}: {message}".replace("(", r"\(").replace(")", r"\)")):
        prepare(cfg_for(tmp_path, path, *overrides), tokenizer, show_progress=False)


@pytest.mark.parametrize(
    "row, overrides, message",
    [
        ({"instruction": "a", "response": "b"}, [], "field 'output': missing (the alpaca format needs instruction and output; input is optional); the row has 'instruction', 'response'"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, ["data.format=chat"],
         "field 'messages': missing (the chat format reads data.messages_field); the row has 'conversations'; set data.messages_field=conversations"),
    ],
)
def test_a_missing_field_names_the_fields_the_row_has(tmp_path, tokenizer, row, overrides, message):
    path = write(tmp_path / "a.jsonl", [row])
    with pytest.raises(DataError) as info:
        prepare(cfg_for(tmp_path, path, *overrides), tokenizer, show_progress=False)
    assert str(info.value) == f"{path}: row 1, {message} (data.on_bad_row=skip skips bad rows)"


def test_a_broken_json_line_is_reported_below_the_progress_bar(tmp_path, tokenizer, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    with pytest.raises(DataError) as info:
        prepare(cfg_for(tmp_path, path), tokenizer, show_progress=True)
    assert str(info.value) == f"{path}: row 2 is not valid JSON (Expecting ',' delimiter at column 21)"
    assert capsys.readouterr().out.endswith("\n"), "the bar is closed, so the error starts a line of its own"


def test_bad_rows_can_be_skipped_and_counted(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", [ROWS[0], {"instruction": "a"}, ROWS[1], {"output": 1}] * 4)
    cfg = cfg_for(tmp_path, path, "data.on_bad_row=skip", "train.micro_batch_size=1", "data.eval_fraction=0")
    data = build_batches(cfg, prepare(cfg, tokenizer, show_progress=False), 0, 1, pad_id_of(tokenizer))
    assert len(data.train.examples) == 8
    assert "16 rows -> 8 examples" in data.summary and "8 bad rows skipped" in data.summary
    assert f"skipped: {path}: row 2, field 'output': missing" in data.summary
    everything_bad = write(tmp_path / "b.jsonl", [{"instruction": "a"}] * 3)
    with pytest.raises(DataError, match=r"b.jsonl: every row is bad and was skipped; the first: .*row 1, field 'output'"):
        prepare(cfg_for(tmp_path, everything_bad, "data.on_bad_row=skip"), tokenizer, show_progress=False)


def test_too_little_data_for_a_global_batch(tmp_path, tokenizer):
    cfg = cfg_for(tmp_path, write(tmp_path / "a.jsonl"), "train.micro_batch_size=4", "data.eval_fraction=0")
    with pytest.raises(DataError, match=r"^2 examples pack into 1 row of data.seq_len=256 tokens, fewer than one global batch of 8 \(micro_batch_size"):
        build_batches(cfg, prepare(cfg, tokenizer, show_progress=False), 0, 2, pad_id_of(tokenizer))


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(DataError, match=r"data.path='/nowhere/x.jsonl': no such file or directory"):
        open_source(cfg_for(tmp_path, "/nowhere/x.jsonl"))
    with pytest.raises(DataError, match=r"data=pydoc_qa has only a train split"):
        open_source(compose_config(["data.split=test"]))


@pytest.mark.parametrize("files", [[], ["README.md"]], ids=["empty", "readme-only"])
def test_a_directory_without_data_files_is_named(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text("# about the data\n")
    with pytest.raises(DataError, match=f"data.path='{tmp_path}': the directory holds no data files"):
        open_source(cfg_for(tmp_path, str(tmp_path)))


def test_launcher_refuses_bad_rows_before_starting_workers(model_dir, cache_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"instruction": "a", "output": ["b"]}) + "\n")
    result = run_launcher(*base_overrides(model_dir, cache_dir), f"data.path={bad}", f"launch.output_root={tmp_path}/out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fsdpqlora: error: {bad}: row 2, field 'output': must be a string, got list (data.on_bad_row=skip skips bad rows)"
    assert "starting" not in result.stdout and not (tmp_path / "out").exists()


def test_a_hub_data_set_that_cannot_be_loaded_is_named(tmp_path, tokenizer, monkeypatch):
    """Loaded through `datasets`, which refuses at once in offline mode (as it would after its retries without a network)."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        prepare(cfg_for(tmp_path, "nobody/no-such-set"), tokenizer, show_progress=False)
    assert str(info.value).startswith(
        "data.path='nobody/no-such-set': not a local file or directory, and loading it from the hub failed (ConnectionError: "
    ), str(info.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("tokenized/*"))


@pytest.mark.distributed
def test_a_bad_row_met_by_rank_0_stops_every_rank(model_dir, cache_dir, tmp_path):
    """Under plain torchrun nothing checked the data before the workers: rank 0 tokenizes while
    rank 1 waits, and rank 0's error reaches rank 1, so both exit with it and neither hangs; the
    error is printed once (by rank 0), not once per rank. torchrun looks at its workers every 3 s
    here, not every 0.1 s, so that rank 1 exits on its own before torchrun, having seen rank 0 fail,
    would terminate it (rank 1 exits a moment after rank 0; a hung rank 1 would be terminated)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--monitor-interval=3", "-m", "fsdpqlora.train",
        *base_overrides(model_dir, cache_dir), f"data.path={bad}", f"launch.output_root={tmp_path}/out",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert result.stderr.count(f"fsdpqlora: error: {bad}: row 2, field 'output': missing") == 1, result.stderr[-3000:]
    assert result.stderr.count("exitcode  : 2") == 2, result.stderr[-3000:]  # torchrun's report of both ranks
