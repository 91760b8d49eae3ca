"""The one call behind the CLI: validate everything, run what is not finished, write the report."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dst.errors import ConfigError

from .execute import is_finished, plan, record_comparison, run_jobs
from .report import write_report
from .spec import Comparison, ResolvedArm, validate
from .tables import check_format

__all__ = ["prepare_comparison", "run_comparison"]

log = logging.getLogger(__name__)


def prepare_comparison(comparison: Comparison, out: str | os.PathLike) -> list[ResolvedArm]:
    """Every check that can fail before a run starts: settings, sparse needs, finished runs that
    disagree with the spec, and (without writing) an arm recorded in ``out`` with other settings."""
    resolved = validate(comparison)
    record_comparison(comparison, resolved, out, dry_run=True)
    for job in plan(comparison, out, resolved):
        is_finished(job)  # raises when a finished run there holds another spec
    return resolved


def run_comparison(
    comparison: Comparison,
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    progress: bool = True,
    fmt: str = "csv",
    command: str = "",
    resolved: Sequence[ResolvedArm] | None = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Run every (arm, seed) of ``comparison`` not yet finished under ``out``, then write the report.

    Returns ``{"outcomes": [RunOutcome, ...], "summary": DataFrame, "states": DataFrame, "paths": [Path, ...]}``.
    Runs that fail (a NaN loss, a dead worker) are reported in ``outcomes``; the others still finish. A run
    that diverged before (its ``failure.json``) is reported failed again, not redone, unless ``retry_failed``.
    """
    check_format(fmt)
    resolved = list(resolved) if resolved is not None else prepare_comparison(comparison, out)
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create output directory {str(out)!r}: {err.strerror or err}") from None
    record_comparison(comparison, resolved, out, command=command)
    outcomes = run_jobs(plan(comparison, out, resolved), workers=workers, progress=progress,
                        retry_failed=retry_failed)
    failed = sum(outcome.status == "failed" for outcome in outcomes)
    if failed:
        log.warning("%d of %d runs failed (see the outcomes)", failed, len(outcomes))
    result = write_report(out, fmt)
    return {"outcomes": outcomes, **result}
