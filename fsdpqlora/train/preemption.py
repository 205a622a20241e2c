"""Stopping on request: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption),
or SIGINT (Ctrl-C), makes every rank stop at the next step boundary, after a checkpoint, with
REQUEUE_EXIT_CODE. A second SIGINT stops at once (KeyboardInterrupt), losing the steps since the
last checkpoint.

A handler only records the signal; each training step hands the recorded signal to the step's
collective (train/step.py), so that every rank stops after the same step even when the signal
reached only one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# EX_TEMPFAIL of sysexits.h, "try again later": the run saved a checkpoint and wants to be
# started again (the sbatch scripts requeue the job on it; the run then resumes by itself).
REQUEUE_EXIT_CODE = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

# Set by the launcher to its pid, for its workers to check that it is still alive when they start.
LAUNCHER_PID_ENV = "FSDPQLORA_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StopRequests:
    def __init__(self):
        self.received = 0  # the number of the last stop signal this process received, 0 for none
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: now
        self.received = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stop_with_parent() -> None:
    """Ask the kernel (Linux prctl PR_SET_PDEATHSIG) to send this worker SIGTERM when the process
    that started it dies, even by SIGKILL: a worker whose launcher is gone saves a checkpoint and
    stops instead of training on, unwatched, beside the next run. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not allowed here (a seccomp sandbox): the run is as without it
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and os.getppid() != int(launcher):  # it died before the request above
        os.kill(os.getpid(), signal.SIGTERM)
