"""A run directory: the files a run writes, and the checks that keep what is already there safe.

    metrics.csv    one row per bin (at least a header once the run has stopped)
    config.json    every resolved setting; a resumed run must find the same ones
    checkpoint.pt  model, optimizer, strategy and RNG state at the last checkpoint
    summary.json   the run's summary, written last: it marks a finished run
    failure.json   why a run stopped early (``kind``, ``error``, ``step``), e.g. a NaN loss

A population run (``--seeds``) writes one such directory per member, ``seed-<s>/`` (without a
checkpoint), and beside them ``checkpoint.pt`` for the whole population and ``population.json``: the
seeds and the settings as given (per-member lists included), from which ``--resume`` rebuilds it.

docs/architecture.md ("Failures and recovery") lists the states a directory can be in and the way
forward from each.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["CHECKPOINT", "METRICS", "CONFIG", "SUMMARY", "FAILURE", "RESUME_MAY_CHANGE", "check_output_dir",
           "read_config", "check_config", "write_failure", "setting_differences", "POPULATION", "read_population",
           "write_population", "write_metrics", "append_metrics"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
CONFIG = "config.json"
SUMMARY = "summary.json"
FAILURE = "failure.json"
POPULATION = "population.json"
#: Settings a resumed run may change: it may be extended, moved to another device or library version.
RESUME_MAY_CHANGE = frozenset({"steps", "device", "versions"})


def check_output_dir(out_dir: str | os.PathLike, *, resume: bool = False) -> Path:
    """Create ``out_dir`` and make sure it is writable and holds no run that would be overwritten."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write to output directory {str(path)!r} ({err.strerror or err}); "
            "choose another --out"
        ) from None
    if not resume and (path / METRICS).exists():
        if (path / CHECKPOINT).exists():
            how = "pass --resume to continue it from its checkpoint"
        else:
            how = ("it has no checkpoint (it stopped before its first one): pass --resume to run it again "
                   "from step 0 in place")
        raise ConfigError(
            f"{str(path)!r} already holds a run ({METRICS}); {how}, or choose a new --out (nothing was overwritten)"
        )
    return path


def setting_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: saved X, now Y`` for every setting that differs (nested settings as ``bench.hidden``)."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            lines += setting_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: saved {old!r}, now {new!r}")
    return lines


def read_config(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The resolved settings of the run in ``out_dir`` (its config.json), or {} when it has none."""
    path = Path(out_dir) / CONFIG
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume: cannot read {str(path)!r} ({err}); move the run away or start a new --out") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {str(path)!r} is not a run's config; move it away or start a new --out")
    return saved


def check_config(out_dir: Path, metadata: dict[str, Any], *, resume: bool) -> None:
    """Write ``config.json``; when resuming, first refuse settings that differ from the saved ones, naming
    each difference (another benchmark or strategy has other settings: then that change alone is named)."""
    path = out_dir / CONFIG
    if resume and path.exists():
        saved = read_config(out_dir)
        current = json.loads(json.dumps(metadata, default=str))
        keys = [k for k in ("benchmark", "strategy") if saved.get(k) != current.get(k)]
        keys = keys or sorted((set(saved) | set(current)) - RESUME_MAY_CHANGE)
        diff = setting_differences({k: saved.get(k) for k in keys}, {k: current.get(k) for k in keys})
        if diff:
            raise ConfigError(
                f"--resume: settings differ from the saved run in {str(out_dir)!r} ({'; '.join(diff)}). "
                f"Resume with the saved settings (flags left out are read from its {CONFIG}), or start a new --out."
            )
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")


def write_failure(out_dir: Path, kind: str, error: str, step: int) -> None:
    """Say in ``failure.json`` why and where the run stopped."""
    failure = {"kind": kind, "error": error, "step": step}
    (out_dir / FAILURE).write_text(json.dumps(failure, indent=2) + "\n")


def read_population(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The population record in ``out_dir`` (its population.json), or {} when it has none."""
    path = Path(out_dir) / POPULATION
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {str(path)!r} ({err}); move the run away or start a new --out") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("seeds"), list):
        raise ConfigError(f"{str(path)!r} is not a population record; move it away or start a new --out")
    return saved


def write_population(out_dir: str | os.PathLike, record: dict[str, Any], *, resume: bool) -> None:
    """Write ``population.json`` (seeds and settings as given); a resume must keep the seeds, and a fresh
    run refuses a directory that already holds a population."""
    path = Path(out_dir)
    saved = read_population(path)
    if saved and not resume:
        raise ConfigError(
            f"{str(path)!r} already holds a population run ({POPULATION}); pass --resume to continue it, or "
            "choose a new --out (nothing was overwritten)"
        )
    if saved and saved["seeds"] != list(record["seeds"]):
        raise ConfigError(
            f"--resume: the population in {str(path)!r} has seeds {saved['seeds']}, not {list(record['seeds'])}; "
            "resume with its seeds (leave --seeds out), or start a new --out"
        )
    check_output_dir(path, resume=resume)
    tmp = path / (POPULATION + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path / POPULATION)


def write_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``metrics.csv`` holding exactly ``rows`` (an empty file for none)."""
    with (out_dir / METRICS).open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n", restval="")
            writer.writeheader()
            writer.writerows(rows)


def append_metrics(out_dir: Path, row: dict[str, Any], columns: list[str]) -> None:
    """Append ``row`` to ``metrics.csv`` (with the header ``columns`` first, if the file is empty)."""
    with (out_dir / METRICS).open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n", restval="")
        if handle.tell() == 0:
            writer.writeheader()
        writer.writerow(row)
