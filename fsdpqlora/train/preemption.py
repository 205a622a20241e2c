"""Stopping on request: SIGTERM or SIGUSR1 (what SLURM sends before a time limit or a preemption)
makes every rank stop at the next step boundary, after a checkpoint, with REQUEUE_EXIT_CODE.

A handler only records the signal; each training step hands the recorded signal to the step's
collective (train/step.py), so that every rank stops after the same step even when the signal
reached only one.
"""

from __future__ import annotations

import signal

# EX_TEMPFAIL of sysexits.h, "try again later": the run saved a checkpoint and wants to be
# started again (the sbatch scripts requeue the job on it; the run then resumes by itself).
REQUEUE_EXIT_CODE = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self):
        self.received = 0  # the number of the last stop signal this process received, 0 for none
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.received = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
