"""Reading a safetensors header (fsdpqlora/weights/files.py read_header) from hand-built bytes: the
tensors, their dtypes, shapes and absolute byte ranges; and each way a file can be broken, named."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fsdpqlora.errors import ModelFilesError
from fsdpqlora.weights.files import read_header


def write(path, header, data: bytes = b"", header_len: int | None = None, raw_header: bytes | None = None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


GOOD = {
    "__metadata__": {"format": "pt"},
    # out of file order on purpose: entries come back sorted by offset
    "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]},
    "a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
    "flag": {"dtype": "BOOL", "shape": [], "data_offsets": [32, 33]},
}


def test_a_good_file(tmp_path):
    path = write(tmp_path / "good.safetensors", GOOD, bytes(33))
    header_len = len(json.dumps(GOOD).encode())
    entries = read_header(path)
    assert [(e.name, e.dtype, e.shape, e.offset, e.nbytes) for e in entries] == [
        ("a", torch.bfloat16, (4,), 8 + header_len, 8),
        ("b", torch.float32, (2, 3), 8 + header_len + 8, 24),
        ("flag", torch.bool, (), 8 + header_len + 32, 1),
    ]
    assert all(e.path == path for e in entries)


def test_the_offsets_point_at_the_bytes(tmp_path):
    values = torch.tensor([[1.5, -2.0], [3.25, 4.0]])
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    path = write(tmp_path / "w.safetensors", header, values.numpy().tobytes())
    (entry,) = read_header(path)
    raw = path.read_bytes()[entry.offset : entry.offset + entry.nbytes]
    assert torch.frombuffer(bytearray(raw), dtype=torch.float32).view(2, 2).tolist() == values.tolist()


def test_a_header_of_only_metadata_has_no_tensors(tmp_path):
    assert read_header(write(tmp_path / "empty.safetensors", {"__metadata__": {}})) == []


def test_shorter_than_the_header_length(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ModelFilesError, match="shorter than its 8-byte header length"):
        read_header(path)


def test_a_truncated_file(tmp_path):
    path = write(tmp_path / "cut.safetensors", GOOD, bytes(20))  # b needs bytes up to 32
    with pytest.raises(ModelFilesError, match=r"tensor b ends at byte \d+ but the file has \d+ bytes \(truncated\?\)"):
        read_header(path)


@pytest.mark.parametrize("header_len", [1_000, 2**40])  # longer than the file; longer than the format allows
def test_an_impossible_header_length(tmp_path, header_len):
    path = write(tmp_path / "len.safetensors", {}, header_len=header_len)
    with pytest.raises(ModelFilesError, match=f"header length {header_len} is impossible"):
        read_header(path)


@pytest.mark.parametrize(
    "raw, message",
    [(b"{not json", "header is not JSON"), (b"\xff\xfe\x00", "header is not JSON"), (b"[1, 2]", "header is not a table")],
)
def test_a_header_that_is_not_a_json_table(tmp_path, raw, message):
    path = write(tmp_path / "bad.safetensors", None, raw_header=raw)
    with pytest.raises(ModelFilesError, match=message):
        read_header(path)


@pytest.mark.parametrize(
    "meta",
    [
        {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]},  # 6 floats are 24 bytes
        {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 24]},  # 6 bf16 are 12 bytes
        {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
    ],
)
def test_a_byte_range_that_does_not_hold_the_shape(tmp_path, meta):
    path = write(tmp_path / "range.safetensors", {"t": meta}, bytes(24))
    with pytest.raises(ModelFilesError, match=r"tensor t: its byte range does not hold shape"):
        read_header(path)


@pytest.mark.parametrize(
    "meta",
    [
        {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]},  # no such dtype
        {"dtype": "F32", "data_offsets": [0, 4]},  # no shape
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},  # one offset
        "F32",
    ],
)
def test_an_unreadable_entry_is_named(tmp_path, meta):
    path = write(tmp_path / "entry.safetensors", {"t": meta}, bytes(8))
    with pytest.raises(ModelFilesError, match="tensor t has an unreadable header entry"):
        read_header(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ModelFilesError, match="cannot be read"):
        read_header(tmp_path / "absent.safetensors")
