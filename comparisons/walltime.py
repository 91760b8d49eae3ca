"""The real wall time of a comparison: ``OUT/wall_times.csv``, one row per call that had runs to do.

A long comparison runs in parts (``--arms``, ``--seeds``) and is resumed after interruptions, so its real
time is the sum of its calls'. Each row: when the call started (UTC), its wall seconds, how many runs it had
to do, how many finished and failed, whether it was interrupted, the worker processes and the command.
``report.md`` lists them beside each other with their total, to stand next to ``--estimate``.
"""

from __future__ import annotations

import csv
import os
from datetime import datetime
from pathlib import Path

import pandas as pd

from dst.timing import duration

__all__ = ["WALL_TIMES", "record_wall_time", "wall_time_lines"]

WALL_TIMES = "wall_times.csv"
COLUMNS = ("started", "wall_seconds", "runs", "finished", "failed", "interrupted", "workers", "command")


def record_wall_time(out: str | os.PathLike, started: datetime, seconds: float, runs: int, *, finished: int,
                     failed: int, interrupted: bool, workers: int, command: str) -> None:
    """Append one call's row: of its ``runs`` to do, how many ``finished`` and ``failed`` (as the run
    directories say afterwards, so an ``interrupted`` call still counts the runs it finished)."""
    path = Path(out) / WALL_TIMES
    row = {"started": started.isoformat(timespec="seconds"), "wall_seconds": round(seconds, 3), "runs": runs,
           "finished": finished, "failed": failed, "interrupted": interrupted, "workers": workers,
           "command": command}
    new = not path.exists() or not path.stat().st_size
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def wall_time_lines(out: str | os.PathLike) -> list[str]:
    """``report.md``'s section on the real time, or nothing when no call has been recorded."""
    path = Path(out) / WALL_TIMES
    if not path.exists() or not path.stat().st_size:
        return []
    calls = pd.read_csv(path)
    lines = ["## Wall time", "", f"Each call that had runs to do (`{WALL_TIMES}`):", "",
             "| started (UTC) | wall time | runs to do | finished | failed | workers | command |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for call in calls.itertuples(index=False):
        ended = " (interrupted)" if bool(call.interrupted) else ""
        lines.append(f"| {call.started} | {duration(float(call.wall_seconds))}{ended} | {call.runs} | {call.finished} "
                     f"| {call.failed} | {call.workers} | `{call.command}` |")
    lines += ["", f"In all: {duration(float(calls['wall_seconds'].sum()))} of wall time over {len(calls)} call(s).", ""]
    return lines
