"""Which worker runs a trial, and whether it still does: for storages without heartbeats.

Every trial records its worker as the user attr ``worker`` (``host:pid``). Optuna's journal storage has
no heartbeat, so a trial whose process was killed stays RUNNING for ever; on the machine that ran it
the process table tells a live worker from a killed one. A RUNNING trial is

- ``alive``: its process runs on this machine (or it started moments ago and has not yet recorded its
  worker), so it will finish;
- ``dead``: its process no longer runs on this machine (killed with ``kill -9``, crashed, or the
  machine restarted): only ``--requeue-running`` frees it;
- ``unknown``: another machine runs it (a journal file on a shared file system), or it recorded no
  worker: it may still be running there.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.trial import TrialState

__all__ = ["ALIVE", "DEAD", "UNKNOWN", "RunningTrial", "running_trials", "worker_id"]

ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"
STARTING_GRACE = 10.0  # seconds a trial may run before it has recorded its worker
CLOCK_SLACK = 2.0  # seconds of rounding between a process's start time and its trial's
STATUS_TEXT = {
    ALIVE: "its worker runs on this machine",
    DEAD: "its worker no longer runs on this machine (killed)",
    UNKNOWN: "its worker runs on another machine or was not recorded",
}


@dataclass(frozen=True)
class RunningTrial:
    """A RUNNING trial, its recorded worker (``host:pid`` or None) and whether that worker is alive."""

    number: int
    worker: str | None
    status: str  # ALIVE, DEAD or UNKNOWN

    def describe(self) -> str:
        return f"trial {self.number} (worker {self.worker or 'not recorded'})"

    def explain(self) -> str:
        """``describe()`` and what the status means, for notes."""
        return f"{self.describe()}, {STATUS_TEXT[self.status]}"


def worker_id() -> str:
    """This process as a trial's ``worker`` user attr: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def running_trials(study: optuna.Study) -> list[RunningTrial]:
    """The study's RUNNING trials, each with its worker's status (see the module docstring)."""
    now = datetime.now()
    trials = study.get_trials(deepcopy=False)
    result = []
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            worker = _own_worker(trial, trials)
            result.append(RunningTrial(trial.number, worker, _status(worker, trial.datetime_start, now)))
    return result


def _own_worker(trial: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial]) -> str | None:
    """The ``worker`` attr of ``trial``, or None before it records its own: a re-queued trial starts with
    the user attrs, the ``worker`` included, of the one it retries (system attr ``retry_history``)."""
    worker = trial.user_attrs.get("worker")
    history = trial.system_attrs.get("retry_history") or []
    if history and history[-1] < len(trials) and trials[history[-1]].user_attrs.get("worker") == worker:
        return None
    return worker


def _status(worker: str | None, started: datetime | None, now: datetime) -> str:
    if not isinstance(worker, str):
        young = started is not None and (now - started).total_seconds() < STARTING_GRACE
        return ALIVE if young else UNKNOWN
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) <= 0:
        return UNKNOWN
    since = started.timestamp() if started is not None else float("inf")
    return ALIVE if _process_alive(int(pid), since) else DEAD


def _process_alive(pid: int, since: float) -> bool:
    """Whether process ``pid`` of this machine runs and could have started a trial at ``since`` (epoch
    seconds): one that started later only reuses the number, and a zombie has ended."""
    if pid == os.getpid():
        return False  # this process runs no trial while it asks: an earlier process had its number
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    state = _proc_state(pid)
    if state is None:
        return True  # no /proc (not Linux): the process exists, which is all we can tell
    code, started = state
    return code != "Z" and started <= since + CLOCK_SLACK


def _proc_state(pid: int) -> tuple[str, float] | None:
    """Linux's state letter and start time (epoch seconds) of ``pid``, or None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        with open("/proc/stat") as handle:
            boot = next(float(line.split()[1]) for line in handle if line.startswith("btime"))
        return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None
