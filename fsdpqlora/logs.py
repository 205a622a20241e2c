"""Status lines: the "fsdpqlora" logger. A line prints as it is written ("[fsdpqlora] ..."), on
stdout, through tqdm.write, so that it lands above a progress bar instead of through it."""

from __future__ import annotations

import logging
import sys

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


def configure_logging(rank: int = 0) -> None:
    """Rank 0 shows every status line; other ranks only warnings and errors, since their status
    lines would repeat rank 0's."""
    if not any(isinstance(h, _AboveProgressBars) for h in log.handlers):
        log.addHandler(_AboveProgressBars())
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


def plural(count: int, noun: str) -> str:
    """"1 step", "2 steps", "1,200 steps"."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")
