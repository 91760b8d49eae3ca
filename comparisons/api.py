"""The calls behind the CLI: prepare a comparison (every check, each arm resolved once), then run it.

:func:`prepare_comparison` does everything that can fail before a run starts and returns a
:class:`Prepared` comparison; :func:`run_prepared` runs what is not finished and writes the report from
it; :func:`run_comparison` is the two in one call. Every call that has runs to do records its real wall
time (:mod:`comparisons.walltime`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dst.errors import ConfigError

from .execute import Job, earlier_failure, is_finished, plan, record_comparison, run_jobs, write_record
from .report import write_report
from .spec import Comparison, ResolvedArm, resolve
from .tables import check_format
from .walltime import record_wall_time

__all__ = ["Prepared", "prepare_comparison", "run_prepared", "run_comparison"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A comparison checked against ``out`` and ready to run: its arms resolved once, the
    ``comparison.json`` it will leave, its jobs, and the format of the combined table."""

    comparison: Comparison
    out: Path
    arms: tuple[ResolvedArm, ...]
    record: dict[str, Any]
    jobs: tuple[Job, ...]
    fmt: str = "csv"
    command: str = ""


def prepare_comparison(comparison: Comparison, out: str | os.PathLike, *, fmt: str = "csv",
                       command: str = "") -> Prepared:
    """Every check that can fail before a run starts, writing nothing: the table format, each arm's
    settings (resolved once: :func:`~comparisons.spec.resolve`), an arm recorded in ``out`` with other
    settings, and finished runs there that disagree with the spec. ``command`` is recorded with the arms."""
    check_format(fmt)
    arms = resolve(comparison)
    record = record_comparison(comparison, arms, out, command)
    jobs = plan(arms, comparison.seeds, out)
    for job in jobs:
        is_finished(job)  # raises when a finished run there holds another spec
    return Prepared(comparison, Path(out), arms, record, jobs, fmt, command)


def run_prepared(prepared: Prepared, *, workers: int | None = None, progress: bool = True,
                 retry_failed: bool = False, population: bool = True) -> dict[str, Any]:
    """Record the comparison, run every job of ``prepared`` not yet finished, then write the report.

    Returns ``{"outcomes": [RunOutcome, ...], "summary": DataFrame, "states": DataFrame, "paths": [Path, ...]}``.
    Runs that fail (a NaN loss, a dead worker) are reported in ``outcomes``; the others still finish. A run
    that diverged before (its ``failure.json``) is reported failed again, not redone, unless ``retry_failed``.
    With ``population`` (the default) each arm's seeds train as populations where the benchmark can batch
    them (:func:`comparisons.execute.populations`); the run directories are the same either way.
    """
    try:
        prepared.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output directory {str(prepared.out)!r}: {err.strerror or err}") from None
    write_record(prepared.out, prepared.record)
    todo = [job for job in prepared.jobs if not is_finished(job)]
    started, start = datetime.now(timezone.utc), time.perf_counter()
    outcomes = None
    try:
        outcomes = run_jobs(prepared.jobs, workers=workers, progress=progress, retry_failed=retry_failed,
                            population=population)
    finally:
        if todo:  # what the runs left on disk, so an interrupted call counts the runs it did finish
            record_wall_time(prepared.out, started, time.perf_counter() - start, len(todo),
                             finished=sum(is_finished(job) for job in todo),
                             failed=sum(earlier_failure(job) is not None for job in todo),
                             interrupted=outcomes is None, workers=workers or os.cpu_count() or 1,
                             command=prepared.command)
    failed = sum(outcome.status == "failed" for outcome in outcomes)
    if failed:
        log.warning("%d of %d runs failed (see the outcomes)", failed, len(outcomes))
    return {"outcomes": outcomes, **write_report(prepared.out, prepared.fmt)}


def run_comparison(comparison: Comparison, out: str | os.PathLike, *, workers: int | None = None,
                   progress: bool = True, fmt: str = "csv", command: str = "",
                   retry_failed: bool = False, population: bool = True) -> dict[str, Any]:
    """:func:`prepare_comparison` then :func:`run_prepared`: run every (arm, seed) of ``comparison`` not yet
    finished under ``out`` and write the report (the returned dict is :func:`run_prepared`'s)."""
    return run_prepared(prepare_comparison(comparison, out, fmt=fmt, command=command), workers=workers,
                        progress=progress, retry_failed=retry_failed, population=population)
