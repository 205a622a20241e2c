"""The launcher's exit code (fsdpqlora/launcher/agent.py exit_code) from torchelastic's result of a
run: 0 when it succeeded, 2 when a worker refused the configuration (wins over everything), 75 when
it was stopped after a checkpoint (a stop signal, or a worker exiting 75) so SLURM requeues it, else 1."""

from __future__ import annotations

import signal

import pytest
from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from fsdpqlora.errors import USER_ERROR_EXIT_CODE
from fsdpqlora.launcher.agent import exit_code
from fsdpqlora.train.preemption import REQUEUE_EXIT_CODE


def failed(*exitcodes: int) -> RunResult:
    failures = {
        rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="/nonexistent/error.json")
        for rank, code in enumerate(exitcodes)
    }
    return RunResult(state=WorkerState.FAILED, failures=failures)


def test_the_exit_codes_are_the_documented_numbers():
    assert (USER_ERROR_EXIT_CODE, REQUEUE_EXIT_CODE) == (2, 75)


@pytest.mark.parametrize("stop_signal", [None, signal.SIGTERM])
def test_a_run_that_succeeded_exits_0(stop_signal):
    assert exit_code(RunResult(state=WorkerState.SUCCEEDED, return_values={0: None, 1: None}), stop_signal) == 0


@pytest.mark.parametrize(
    "exitcodes, stop_signal, expected",
    [
        ((2, 2), None, 2),
        ((2, 1), None, 2),  # one rank refused the configuration, the other died of it
        ((75, 2), None, 2),  # a configuration error wins over a requeue
        ((1, 2), signal.SIGUSR1, 2),  # even when stopped
        ((75, 75), None, 75),
        ((75, 1), None, 75),
        ((1, -15), signal.SIGTERM, 75),  # stopped by a signal: the workers' own codes do not matter
        ((-9,), signal.SIGUSR1, 75),
        ((1, 1), None, 1),
        ((-9, 0), None, 1),  # killed (OOM killer)
        ((3,), None, 1),
    ],
)
def test_a_failed_run(exitcodes, stop_signal, expected):
    assert exit_code(failed(*exitcodes), stop_signal) == expected


def test_a_second_ctrl_c_exits_130_whatever_the_workers_did():
    assert exit_code(failed(-9, -9), signal.SIGINT, interrupted=True) == 130
    assert exit_code(failed(75, -9), signal.SIGINT, interrupted=True) == 130
    assert exit_code(failed(75, 75), signal.SIGINT) == 75  # once: they saved and stopped
