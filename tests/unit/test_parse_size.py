"""`fsdpqlora merge --max-shard-size` (fsdpqlora/export/merge.py parse_size): decimal units as the
Hugging Face hub counts them, case and spaces free, anything else refused with an example."""

from __future__ import annotations

import pytest

from fsdpqlora.errors import ConfigError
from fsdpqlora.export.merge import parse_size


@pytest.mark.parametrize(
    "text, size",
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("100KB", 100_000),
        ("7B", 7),
        ("1.5GB", 1_500_000_000),
        ("0.5KB", 500),
        (" 2 gb ", 2_000_000_000),
        ("10mb", 10_000_000),
    ],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5", "5 GiB", "5TB", "GB", "-1GB", "1e9B", "five GB", ""])
def test_other_text_is_refused(text):
    with pytest.raises(ConfigError, match=r"--max-shard-size .*: give a size like 5GB, 500MB or 100KB"):
        parse_size(text)
