"""Files and directories written whole or not at all (checkpoints, adapters, merged models, assets)."""

from __future__ import annotations

import pytest

from fsdpqlora import atomic


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    atomic.write_text(path, "step-1")
    atomic.write_text(path, "step-2")
    atomic.fsync_dir(tmp_path)
    assert path.read_text() == "step-2"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


@pytest.mark.parametrize("if_exists", ["fail", "replace", "keep"])
def test_a_failed_build_leaves_the_target_as_it_was_and_no_temporary(tmp_path, if_exists):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic.building_dir(target, if_exists=if_exists) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_if_exists_replace_keep_and_fail(tmp_path):
    target = tmp_path / "a" / "out"
    with atomic.building_dir(target) as tmp:
        (tmp / "f").write_text("first")
    with atomic.building_dir(target, if_exists="replace") as tmp:
        (tmp / "f").write_text("second")
    assert (target / "f").read_text() == "second"
    with atomic.building_dir(target, if_exists="keep") as tmp:  # another process built it first
        (tmp / "f").write_text("third")
    assert (target / "f").read_text() == "second"
    with pytest.raises(OSError), atomic.building_dir(target) as tmp:
        (tmp / "f").write_text("fourth")
    assert (target / "f").read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["out"]
