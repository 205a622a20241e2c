"""One run directory, one live run; and a run directory that can take what the run writes.

The lock is an flock(2) on `<run_dir>/.lock`. The kernel drops it when its holder dies, however it
dies, so a crashed or killed run never leaves it stuck. Holders take it shared: the launcher for
the run's life, and the rank-0 worker for its own (under plain torchrun it is the only holder).
A new run first asks for it exclusively, which fails while anyone holds it, so a second command
on a live run's directory is refused; the workers of a launcher that was killed keep the run
locked until they have saved their checkpoint and stopped. The lock file holds the pid and host
of the process that took it first, for the refusal to name.

Multi-node runs: launchers on several hosts would contend for one lock on a shared file system,
so there only the rank-0 worker takes it (FSDPQLORA_RUN_DIR_LOCKED tells workers whether their
launcher holds it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from pathlib import Path

from fsdpqlora.errors import ConfigError

LOCK_FILE = ".lock"
# Set by a launcher that holds the lock of this run directory for its workers.
LOCKED_BY_LAUNCHER_ENV = "FSDPQLORA_RUN_DIR_LOCKED"


class RunDirLock:
    """A held lock of a run directory; released by release() or when this process ends."""

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)


def _holder(run_dir: Path) -> str:
    try:
        text = (run_dir / LOCK_FILE).read_text().split()
    except OSError:
        text = []
    return f"pid {text[0]} on {text[1]}" if len(text) == 2 else "a process that did not say which"


def _refused(run_dir: Path) -> ConfigError:
    return ConfigError(
        f"launch.run_dir={run_dir}: a live run ({_holder(run_dir)}) is using this run directory; wait for it to "
        "end (or stop it: SIGTERM saves a checkpoint), or choose another launch.run_dir"
    )


def check_not_locked(run_dir: Path) -> None:
    """Refuse a run directory that a live run holds, without writing anything."""
    lock_file = run_dir / LOCK_FILE
    if not lock_file.is_file():
        return
    fd = os.open(lock_file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refused(run_dir) from None
    finally:
        os.close(fd)  # releases it, if taken


def lock_run_dir(run_dir: Path, joining: bool = False) -> RunDirLock:
    """Take the run directory's lock (creating the directory). `joining`: the launcher of this
    run holds it already, and this worker shares it; else any holder means another live run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not joining:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        # Shared from here on, so that this run's rank-0 worker can hold it too. A conversion is not
        # atomic, but a rival that takes it exclusively in between makes this non-blocking request fail.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _refused(run_dir) from None
    return RunDirLock(fd)


def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest existing parent: where a directory about to be created would live."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory that cannot be created or written (a read-only mount, no permission)."""
    where = existing_ancestor(run_dir)
    # access(2) answers EROFS for a read-only mount even to root, whom file modes do not stop.
    if os.access(where, os.W_OK):
        return
    read_only = os.statvfs(where).f_flag & os.ST_RDONLY
    why = "is on a read-only file system" if read_only else f"cannot be written ({os.strerror(errno.EACCES)})"
    raise ConfigError(f"launch.run_dir={run_dir}: {where} {why}; choose a launch.run_dir that can be written")


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def short_of_space(run_dir: Path, needed: int) -> str | None:
    """A warning when the run directory's file system has less room than one checkpoint needs."""
    free = free_bytes(run_dir)
    if free >= needed:
        return None
    return (f"warning: {existing_ancestor(run_dir)} has {free:,} bytes free and a checkpoint needs about {needed:,}: "
            "checkpoints will fail (the run then stops, exit 2) unless space is freed")  # fmt: skip
