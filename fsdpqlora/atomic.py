"""Files and directories that appear whole or not at all.

Each is written under a temporary name beside its target (a name starting with ".", in the same
directory and so on the same file system) and renamed into place, which POSIX makes atomic: a
reader, or the next run after a crash, finds the old content or the new, never half of it. A
failure removes the temporary; a crash may leave one, which nothing reads.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal


def write_text(path: Path, text: str) -> None:
    """Replace `path` with a file holding `text`. The text is fsynced before the rename, so a crash
    after it finds the new content rather than an empty file; fsync_dir(path.parent) afterwards makes
    the rename itself survive a crash."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the renames and new names in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def building_dir(target: Path, if_exists: Literal["fail", "replace", "keep"] = "fail") -> Iterator[Path]:
    """A new empty directory beside `target` to build in, renamed to `target` when the block ends.
    If the block raises, the directory is removed and `target` is left as it was.

    `if_exists` says what happens where `target` exists at the rename:
    - "fail": the rename's own rule (it raises unless `target` is an empty directory); callers
      that refuse an existing target check before building;
    - "replace": the old directory is renamed aside, the new one into place, and the old one removed;
    - "keep": another process built it first; theirs is kept and this one removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # no clash between processes, nor between hosts sharing the directory
    tmp = target.with_name(f".{target.name}.tmp-{unique}")
    tmp.mkdir()
    try:
        yield tmp
        if if_exists == "replace" and target.exists():
            old = target.with_name(f".{target.name}.old-{unique}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        elif if_exists == "keep":
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already where the rename succeeded
