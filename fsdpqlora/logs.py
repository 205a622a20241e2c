"""Status lines: the "fsdpqlora" logger. A line prints as it is written ("[fsdpqlora] ..."), on
stdout, through tqdm.write, so that it lands above a progress bar instead of through it.

Rank 0's lines (the launcher's and the first worker's) are also kept in the run directory's
`train.log`; lines written before the run directory is known are held until it is. `command.txt`
there gets the command line of every start of the run, appended."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import sys
import traceback
from collections.abc import Iterator
from datetime import datetime
from logging.handlers import MemoryHandler
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("fsdpqlora")


class _AboveProgressBars(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            # sys.stdout as it is now, not at set-up: tests and callers may redirect it.
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


class _UntilRunDir(MemoryHandler):
    """The lines written before the run directory exists, for train.log. No capacity limit applies
    before a target is set (MemoryHandler flushes only into a target); a launcher writes a few."""

    def __init__(self):
        super().__init__(capacity=10_000, flushLevel=logging.CRITICAL + 1, target=None, flushOnClose=False)


def configure_logging(rank: int = 0) -> None:
    """Rank 0 shows every status line; other ranks only warnings and errors, since their status
    lines would repeat rank 0's."""
    if not any(isinstance(h, _AboveProgressBars) for h in log.handlers):
        log.addHandler(_AboveProgressBars())
    for held in [h for h in log.handlers if isinstance(h, _UntilRunDir)]:
        log.removeHandler(held)  # a second start in this process begins a new record
    if rank == 0:
        log.addHandler(_UntilRunDir())
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


@contextlib.contextmanager
def kept_in(path: Path) -> Iterator[None]:
    """Append the lines held so far and every line until the block ends to `path` (train.log)."""
    file = logging.FileHandler(path, mode="a", encoding="utf-8")
    for held in [h for h in log.handlers if isinstance(h, _UntilRunDir)]:
        held.setTarget(file)
        held.flush()
        log.removeHandler(held)
    log.addHandler(file)
    try:
        yield
    except Exception as exc:  # what ends the run goes into the log too (the console gets it on stderr)
        from fsdpqlora.errors import UserError

        text = f"fsdpqlora: error: {exc}" if isinstance(exc, UserError) else traceback.format_exc().rstrip()
        file.handle(logging.makeLogRecord({"msg": text, "levelno": logging.ERROR}))
        raise
    finally:
        log.removeHandler(file)
        file.close()


def record_command(run_dir: Path, command: list[str], how: str) -> None:
    """Append this start's command line to <run_dir>/command.txt: a comment saying when, where and
    how, then the command as a shell would take it (run from the directory it ran in)."""
    stamp = datetime.now().isoformat(timespec="seconds")
    with open(run_dir / "command.txt", "a", encoding="utf-8") as f:
        f.write(f"# {stamp} on {socket.gethostname()}, {how}\ncd {shlex.quote(os.getcwd())} && {shlex.join(command)}\n")


def plural(count: int, noun: str) -> str:
    """"1 step", "2 steps", "1,200 steps"."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")
