"""``python -m comparisons``: strategies x seeds x one benchmark -> tables, plots and a report.

    python -m comparisons --preset quick --out results/quick
    python -m comparisons --benchmark bit-flipping --strategies bp,cbp,rigl --seeds 5 --steps 50000 --out DIR
    python -m comparisons --strategies bp,cbp --grid cbp.replacement_rate=1e-6,1e-5,1e-4 --out DIR
    python -m comparisons presets                 (or --list-presets)
    python -m comparisons --preset sparse-budget --arms 'b1x-*' --seeds 0-9 --out DIR   (a part of a preset)
    python -m comparisons report --out DIR        (tables, plots and report.md from the finished runs)

``--bench key=value`` applies to every arm, ``--bench NAME.key=value`` to the arms of strategy (or preset
arm) NAME; ``--set NAME.key=value`` sets a strategy setting; ``--grid NAME.key=v1,v2,...`` makes one arm
per value (several --grid of one strategy: their cartesian product). ``--arms`` runs only the arms whose names
match its patterns, and ``--seeds`` only some seeds, so a long preset can be run in parts into one OUT (the
report covers every finished run there). Everything is validated before any
run starts; bad input exits with status 2 and a one-line message. Rerunning a command skips finished runs
and resumes unfinished ones from their checkpoints; a run that diverged (its ``failure.json``) stays failed
unless ``--retry-failed`` is given. Exit status: 0, 1 when some run failed (``report`` too), 2 bad input,
3 an unexpected error while resolving an arm (a bug: the message names the arm and asks to report it),
130 interrupted.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from dst.errors import ConfigError, DSTError
from dst.interrupt import sigterm_interrupts

from .api import Prepared, prepare_comparison, run_prepared
from .execute import CHECKPOINT, Population, earlier_failure, is_finished, populations
from .presets import PRESETS, describe_presets, free_form, preset
from .report import format_summary, write_report
from .spec import Comparison, UnexpectedError

__all__ = ["main"]


class _UsageError(Exception):
    """argparse's complaint, turned into our one-line error instead of usage + exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _run_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m comparisons", description=__doc__.split("\n\n")[0],
                     epilog="subcommands: `presets` lists the presets; `report --out DIR` rewrites the report.")
    parser.add_argument("--preset", choices=list(PRESETS), help="a named comparison (see `presets`)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--benchmark", help="benchmark of a free-form comparison (default: bit-flipping)")
    parser.add_argument("--strategies", help="comma-separated strategies of a free-form comparison (default: bp,cbp)")
    parser.add_argument("--seeds", help="number of seeds (0..N-1), a comma-separated list or a range A-B "
                                        "(default: 3, or the preset's)")
    parser.add_argument("--arms", help="run only the arms whose names match these comma-separated shell "
                                       "patterns ('cbp,b5x-*'; `presets` lists the names)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: the preset's / the benchmark's)")
    parser.add_argument("--bench", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                        help="benchmark setting for every arm, or for NAME's arms; repeatable")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="strategy setting of NAME's arms; repeatable")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME.KEY=V1,V2,...",
                        help="one arm per value (';' separates values of list settings); repeatable")
    parser.add_argument("--out", help="output folder (default: results/<preset or benchmark>)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"parallel runs (default: one per core, here {os.cpu_count()})")
    parser.add_argument("--population", choices=("on", "off"), default="on",
                        help="on: each arm's seeds train as populations, one batched pass each, where the benchmark "
                             "can batch them (default); off: one process per run. The run folders are the same")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA if present)")
    parser.add_argument("--format", dest="fmt", choices=("csv", "parquet"), default="csv",
                        help="format of the combined table runs.<format> (parquet needs pyarrow)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="redo runs that failed before (diverged: their failure.json) from scratch; "
                             "without it they stay failed, since a rerun would diverge again")
    parser.add_argument("--checkpoints", type=int, default=10,
                        help="checkpoints per run, for resuming (default: %(default)s; 0: none)")
    parser.add_argument("--estimate", action="store_true",
                        help="train each arm briefly, print the comparison's expected time, and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each run does")
    return parser


def _report_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m comparisons report",
                     description="Write runs.csv, summary.csv, the plots and report.md from the finished runs; "
                                 "exit status 1 when some run failed.")
    parser.add_argument("--out", required=True, help="the comparison's output folder")
    parser.add_argument("--format", dest="fmt", choices=("csv", "parquet"), default="csv")
    return parser


def _seeds(text: str | None, default: Sequence[int]) -> tuple[int, ...]:
    if text is None:
        return tuple(default)
    first, dash, last = text.strip().partition("-")
    try:
        if "," in text:
            return tuple(int(s) for s in text.split(",") if s.strip())
        seeds = tuple(range(int(first), int(last) + 1)) if dash else None
        count = int(text) if not dash else len(seeds)
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (5), a list (0,3,7) or a range (10-19)") from None
    if dash:
        if not seeds:
            raise ConfigError(f"--seeds {text!r}: a range A-B needs A <= B")
        return seeds
    if count <= 0:
        raise ConfigError(f"--seeds {text!r}: give at least one seed")
    return tuple(range(count))


def _select_arms(comparisons: Sequence[Comparison], text: str | None) -> list[Comparison]:
    """Each comparison with only the arms whose names match one of the comma-separated patterns of
    ``--arms`` (all of them without it); a pattern that matches no arm is an error listing the names."""
    if text is None:
        return list(comparisons)
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise ConfigError("--arms: give at least one arm name or pattern, e.g. --arms 'cbp,b5x-*'")
    names = list(dict.fromkeys(arm.name for c in comparisons for arm in c.arms))
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(f"--arms {pattern!r} matches no arm; the arms: {', '.join(names)}")
    return [replace(c, arms=tuple(a for a in c.arms if any(fnmatch.fnmatchcase(a.name, p) for p in patterns)))
            for c in comparisons]


def _comparisons(args: argparse.Namespace) -> list[Comparison]:
    if args.preset and (args.benchmark or args.strategies):
        raise ConfigError("--preset fixes the benchmark and the strategies; drop --benchmark/--strategies "
                          "(use --bench/--set/--grid/--steps/--seeds to adjust a preset)")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.preset:
        found = preset(args.preset, bench=args.bench, sets=args.sets, grids=args.grid)
    else:
        strategy_names = (args.strategies or "bp,cbp").split(",")
        found = [free_form(args.benchmark or "bit-flipping", strategy_names, bench=args.bench, sets=args.sets,
                           grids=args.grid)]
    result = []
    for comparison in found:
        changes = {"seeds": _seeds(args.seeds, comparison.seeds), "device": args.device,
                   "checkpoints": args.checkpoints}
        if args.steps is not None:
            changes["steps"] = args.steps
        result.append(replace(comparison, **changes))
    return result


def _start_line(prepared: Prepared, workers: int | None, retry_failed: bool, population: bool) -> str:
    """What is about to happen: runs already finished, to resume, failed before, and how they run."""
    comparison, jobs = prepared.comparison, prepared.jobs
    done = [is_finished(job) for job in jobs]
    failed_before = [not d and earlier_failure(job) is not None for job, d in zip(jobs, done)]
    note = ""
    if any(failed_before):
        note = f", {sum(failed_before)} failed before: " + (
            "to redo" if retry_failed else "kept as failed, --retry-failed redoes them")
    todo = [job for job, d, f in zip(jobs, done, failed_before) if not d and (retry_failed or not f)]
    workers = workers or os.cpu_count() or 1
    units = populations(todo, workers) if population else todo
    # a population's checkpoint is its own folder's; it resumes all its members
    resumable = sum(len(unit.jobs) if isinstance(unit, Population) else 1
                    for unit in units if (unit.out_dir / CHECKPOINT).exists())
    groups = sum(isinstance(unit, Population) for unit in units)
    how = f"{len(units)} run(s)"
    if groups:
        how = f"{groups} population(s)" + (f" and {len(units) - groups} single run(s)" if len(units) > groups else "")
    return (f"comparison {comparison.name} on {comparison.benchmark}: {len(prepared.arms)} arms x "
            f"{len(comparison.seeds)} seeds = {len(jobs)} runs ({sum(done)} already finished, {resumable} "
            f"to resume{note}): {how} on {max(1, min(workers, len(units)))} worker process(es) -> {prepared.out}")


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    comparisons = _comparisons(args)
    base = Path(args.out or f"results/{args.preset or args.benchmark or 'bit-flipping'}")
    outs = [base] if len(comparisons) == 1 else [base / c.name for c in comparisons]
    # the folders are the whole preset's, so that its parts, run one by one, land where a full run would
    chosen = [(c, out) for c, out in zip(_select_arms(comparisons, args.arms), outs) if c.arms]
    command = "python -m comparisons " + shlex.join(argv)
    prepared = [prepare_comparison(c, out, fmt=args.fmt, command=command)  # all checks, no run yet
                for c, out in chosen]
    if args.estimate:
        from .estimate import estimate, format_estimate

        workers = args.workers or os.cpu_count() or 1
        for item in prepared:
            print(format_estimate(item, estimate(item, workers, budget=60.0), workers), flush=True)
        return 0
    failed = 0
    for item in prepared:
        print(_start_line(item, args.workers, args.retry_failed, args.population == "on"), flush=True)
        result = run_prepared(item, workers=args.workers, progress=not args.no_progress,
                              retry_failed=args.retry_failed, population=args.population == "on")
        bad = [o for o in result["outcomes"] if o.status == "failed"]
        failed += len(bad)
        for error in dict.fromkeys(o.error for o in bad):  # one line per distinct error
            runs = ", ".join(f"{o.label} seed {o.seed}" for o in bad if o.error == error)
            print(f"failed: {runs}: {error}", file=sys.stderr)
        print()
        print(format_summary(result["summary"], result["states"]))
        print("\nwrote " + ", ".join(str(p) for p in result["paths"]))
    if failed:
        print(f"{failed} run(s) failed; the others are reported. Rerunning the same command retries runs that "
              "crashed or were killed (finished runs are skipped); runs that diverged stay failed unless you "
              "add --retry-failed.", file=sys.stderr)
        return 1
    return 0


def _report(argv: Sequence[str]) -> int:
    args = _report_parser().parse_args(argv)
    result = write_report(args.out, args.fmt)
    print(format_summary(result["summary"], result["states"]))
    print("\nwrote " + ", ".join(str(p) for p in result["paths"]))
    return 1 if (result["states"]["state"] == "failed").any() else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some runs failed, 2 bad input, 3 an unexpected error
    while resolving an arm, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    with sigterm_interrupts():
        try:
            if argv[:1] == ["presets"]:
                print(describe_presets())
                return 0
            if argv[:1] == ["report"]:
                return _report(argv[1:])
            args = _run_parser().parse_args(argv)
            if args.list_presets:
                print(describe_presets())
                return 0
            return _run(args, argv)
        except (DSTError, _UsageError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except UnexpectedError as err:
            if verbose:
                traceback.print_exception(err.__cause__ or err)
            print(f"error: {err}\nThis is not a setting dst checks, most likely a bug in dst or the strategy: "
                  "please report it with the command (-v shows the traceback). No run was started.", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            print("interrupted: finished runs are kept; rerun the same command to resume the others "
                  "from their checkpoints", file=sys.stderr)
            return 130
