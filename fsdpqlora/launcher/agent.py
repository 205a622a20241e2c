"""torchrun's elastic agent, run inside the launcher with the restart policy training needs.

torchrun alone restarts a worker group whatever ended it, so a run stopped on request (exit 75,
after its checkpoint) or refused for its configuration (exit 2) would start again; its agent dies
of SIGUSR1 (the signal SLURM sends before a time limit), and on SIGTERM it gives the workers a
short grace and then kills them, mid-checkpoint. Here the launcher process is the agent:

- SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) are forwarded to every worker, which saves at its next
  step boundary and exits 75; the agent then restarts nothing and the launcher exits 75 (requeue
  me). A second Ctrl-C kills the workers at once (exit 130), keeping the last checkpoint.
- The workers die with the launcher: killed outright, its workers get SIGTERM from the kernel
  (train/preemption.py stop_with_parent) and save and stop the same way.
- A worker ending with 75 or 2 is final: nothing is restarted and the launcher exits with it.
- Any other failure (a worker killed, out of memory, a lost node) restarts the group, up to
  launch.max_restarts times; each new group resumes from the last checkpoint by itself.

Several nodes: one launcher per node, joined by the c10d rendezvous at launch.rdzv_endpoint; the
agents' own rendezvous restarts every node's workers when one node's fail. Stop requests are
collective in the workers (every rank stops after the same step), so every node ends with 75.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from dataclasses import dataclass

from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from fsdpqlora.compat import (
    ElasticAgentHooks,
    leave_stop_signals_to_us,
    quiet_expected_worker_exits,
    store_per_rendezvous_round,
)
from fsdpqlora.errors import USER_ERROR_EXIT_CODE
from fsdpqlora.train.preemption import LAUNCHER_PID_ENV, REQUEUE_EXIT_CODE, STOP_SIGNALS

# Worker exit codes after which a restart would only do the same again.
FINAL_EXIT_CODES = (REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE)
# The shell's code for a process ended by SIGINT: the launcher's after a second Ctrl-C.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a run meet: a local store for one node, the given endpoint for several."""

    nnodes: int
    endpoint: str
    run_id: str

    @classmethod
    def single_node(cls) -> Rendezvous:
        # torchrun --standalone: a c10d store on a free local port.
        return cls(1, "localhost:0", str(uuid.uuid4()))


class TrainingAgent(ElasticAgentHooks, LocalElasticAgent):
    """LocalElasticAgent that forwards stop signals to its workers and never restarts a group that
    stopped on request or on a configuration error."""

    def __init__(self, spec: WorkerSpec, **kwargs):
        super().__init__(spec, logs_specs=DefaultLogsSpecs(), start_method="spawn", **kwargs)
        self.stop_signal: int | None = None
        self.interrupted = False  # Ctrl-C twice: the workers were killed without a checkpoint

    def forward_stop(self, signum: int, frame) -> None:
        workers = [worker.id for worker in self.get_worker_group().workers if worker.id is not None]
        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            self.interrupted = True
            os.write(2, b"\n[fsdpqlora] Ctrl-C again: stopping the workers now, without a checkpoint\n")
            _send(signal.SIGKILL, workers)
            return
        if signum == signal.SIGINT:
            os.write(2, b"\n[fsdpqlora] Ctrl-C: the workers save a checkpoint after this step and stop "
                        b"(Ctrl-C again to stop at once)\n")  # fmt: skip
        self.stop_signal = signum
        _send(signum, workers)

    def workers_started(self, pids: dict[int, int]) -> None:
        if self.stop_signal is not None:  # a stop asked for while the group was (re)starting
            _send(self.stop_signal, list(pids.values()))

    def workers_checked(self, worker_group: WorkerGroup, result: RunResult) -> None:
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            codes = sorted({failure.exitcode for failure in result.failures.values()})
            if self.stop_signal is not None or any(code in FINAL_EXIT_CODES for code in codes):
                self.stop_restarting()
            elif self.remaining_restarts > 0:
                used = worker_group.spec.max_restarts - self.remaining_restarts + 1
                print(f"[fsdpqlora] workers failed (exit codes {codes}); restart {used} of "
                      f"{worker_group.spec.max_restarts}, resuming from the last checkpoint", file=sys.stderr, flush=True)  # fmt: skip


def _send(signum: int, pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # already gone
            pass


def exit_code(result: RunResult, stop_signal: int | None, interrupted: bool = False) -> int:
    """The launcher's exit code: 0, 2 (configuration), 75 (stopped after a checkpoint), 130 (stopped
    at once by a second Ctrl-C), else 1."""
    if not result.is_failed():
        return 0
    if interrupted:
        return INTERRUPTED_EXIT_CODE
    codes = {failure.exitcode for failure in result.failures.values()}
    if USER_ERROR_EXIT_CODE in codes:
        return USER_ERROR_EXIT_CODE
    if stop_signal is not None or REQUEUE_EXIT_CODE in codes:
        return REQUEUE_EXIT_CODE
    return 1


def run_workers(command: list[str], nproc_per_node: int, max_restarts: int, rendezvous: Rendezvous) -> int:
    """Start nproc_per_node workers running `command` (python and its arguments) on this node,
    restarting them per the policy above; returns the launcher's exit code."""
    # SIGTERM, SIGUSR1 and SIGINT go to forward_stop (below), which torch's own handlers would preempt or lack.
    leave_stop_signals_to_us()
    store_per_rendezvous_round()
    quiet_expected_worker_exits(FINAL_EXIT_CODES)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    parameters = RendezvousParameters(
        backend="c10d",
        endpoint=rendezvous.endpoint,
        run_id=rendezvous.run_id,
        min_nodes=rendezvous.nnodes,
        max_nodes=rendezvous.nnodes,
    )
    spec = WorkerSpec(
        role="trainer",
        local_world_size=nproc_per_node,
        entrypoint=command[0],
        args=tuple(command[1:]),
        rdzv_handler=get_rendezvous_handler(parameters),
        max_restarts=max_restarts,
        monitor_interval=0.1,
    )
    agent = TrainingAgent(spec)
    previous = {sig: signal.signal(sig, agent.forward_stop) for sig in STOP_SIGNALS}
    try:
        result = agent.run()
    except SignalException as exc:  # SIGHUP or SIGQUIT: the workers were stopped
        return 128 + exc.sigval
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    spec.rdzv_handler.shutdown()  # as torchrun: only when the agent ended by itself
    code = exit_code(result, agent.stop_signal, agent.interrupted)
    if code == 1:  # a crash, not a refusal or a stop, which the workers have explained in one line
        for rank, failure in sorted(result.failures.items()):
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            print(f"[fsdpqlora] rank {rank}: {how}", file=sys.stderr, flush=True)
    return code
