"""SIGTERM stops a command line as Ctrl-C does.

A batch scheduler at its time limit, ``kill PID``, or a job started in the background with ``nohup``
(where the shell ignores SIGINT) stops a process with SIGTERM, whose default ends it on the spot: no
wall-time row, no worker told to stop, no trial marked failed. Inside :func:`sigterm_interrupts` a
SIGTERM raises :class:`KeyboardInterrupt` instead, so the command's Ctrl-C path runs: finished work is
kept, workers are stopped, and the process exits with 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["sigterm_interrupts"]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (in the main thread; elsewhere a no-op, since
    only the main thread may set handlers). The previous handler is restored on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
