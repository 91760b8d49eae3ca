"""``python -m studies``: tune refresh strategies with Optuna, join studies as workers, write reports.

    python -m studies tune --strategy cbp --benchmark bit-flipping --trials 40 --study cbp-bf --out runs/studies
    python -m studies worker --study cbp-bf --storage postgresql://USER@HOST:PORT/DB --trials 40
    python -m studies report --study cbp-bf --out runs/studies

Exit status: 0 the study reached its target, 1 it is short of it (trials stuck RUNNING hold the rest; the
message names them and the fix), 2 bad input or an unreachable storage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import optuna

from dst import benchmarks
from dst.config import parse_assignments
from dst.errors import ConfigError, DSTError
from dst.interrupt import sigterm_interrupts

from . import storage as storages
from .objectives import OBJECTIVES, directions, parse_objectives
from .report import write_report
from .sampler import SAMPLERS
from .space import build_space
from .study import (
    PRUNERS,
    TargetNotReached,
    check_batch,
    check_target,
    counts,
    open_study,
    requeue_running,
    run_study,
)
from .trial import StudySettings
from .workers import ALIVE, running_trials

__all__ = ["main"]

log = logging.getLogger(__name__)
DEFAULT_OUT = "runs/studies"


def _common(parser: argparse.ArgumentParser, *, study_required: bool) -> None:
    parser.add_argument("--study", required=study_required, help="study name")
    parser.add_argument(
        "--storage", default=None,
        help="journal file path, sqlite:///FILE.db or postgresql://USER@HOST:PORT/DB (default: OUT/STUDY.journal)",
    )
    parser.add_argument("--out", default=None, help=f"trial run directories go to OUT/STUDY/trial-N (default: {DEFAULT_OUT})")


def _running(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=None, help="target of finished (complete + pruned) trials")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--batch", type=int, default=1, metavar="B",
                        help="ask B trials at once and train all their seeds as one population (every tuned "
                             "setting a numeric strategy setting or lr; default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (default: %(default)s)")
    parser.add_argument("--sampler-seed", type=int, default=None,
                        help="seed of the sampler; a rerun continues its sequence of proposals (default: random)")
    parser.add_argument("--heartbeat-interval", type=int, default=storages.HEARTBEAT_INTERVAL, metavar="S",
                        help="RDB storages: seconds between a running trial's heartbeats (default: %(default)s)")
    parser.add_argument("--grace-period", type=int, default=storages.GRACE_PERIOD, metavar="S",
                        help="RDB storages: seconds of silence after which a trial is failed and re-queued "
                             "(default: %(default)s)")
    parser.add_argument("--requeue-running", action="store_true",
                        help="mark trials left RUNNING by a killed process FAIL and queue them again (journal "
                             "storage has no heartbeat); only while no other worker runs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studies", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tune = commands.add_parser("tune", help="create or continue a study and run trials")
    _common(tune, study_required=False)
    _running(tune)
    tune.add_argument("--strategy", default="cbp", help="registered strategy to tune (default: %(default)s)")
    tune.add_argument("--benchmark", default="bit-flipping", help="benchmark (default: %(default)s)")
    tune.add_argument("--steps", type=int, default=None, help="training steps per run (default: the benchmark's)")
    tune.add_argument("--bench", action="append", default=[], metavar="KEY=VALUE", help="fixed benchmark setting")
    tune.add_argument("--seed", type=int, default=0, help="first seed of every trial (default: %(default)s)")
    tune.add_argument("--seeds", type=int, default=1, help="seeds per trial, values averaged (default: %(default)s)")
    tune.add_argument("--objective", default="late_window",
                      help=f"one or comma-separated objectives: {', '.join(OBJECTIVES)} (default: %(default)s)")
    tune.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                      help="low:high[:log], a,b,c, a fixed value, or bench.NAME=...; repeatable")
    tune.add_argument("--only", default=None, help="comma-separated fields to tune (others at their defaults)")
    tune.add_argument("--pruner", choices=PRUNERS, default="median", help="(default: %(default)s)")
    tune.add_argument("--warmup", type=float, default=0.5,
                      help="fraction of a run before the pruner may stop it (default: %(default)s)")
    tune.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: 1)")
    worker = commands.add_parser("worker", help="join an existing study and run trials until its target")
    _common(worker, study_required=True)
    _running(worker)
    report = commands.add_parser("report", help="best settings, trials, importances and plots of a study")
    _common(report, study_required=True)
    return parser


def _steps(args: argparse.Namespace, bench: dict) -> int:
    if args.steps is not None:
        if args.steps <= 0:
            raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
        return args.steps
    built = benchmarks.build(args.benchmark, **bench)
    return built.default_steps(built.make_stream((args.seed,), "cpu"))


def _open(args: argparse.Namespace, spec: storages.StorageSpec, create: bool):
    return storages.open_storage(spec, create=create, heartbeat_interval=args.heartbeat_interval,
                                 grace_period=args.grace_period)


def _run(args: argparse.Namespace, spec, storage, study, settings, out: str) -> None:
    target = args.trials if args.trials is not None else study.user_attrs.get("target")
    if target is None or target < 1:
        raise ConfigError("give --trials N, the number of finished trials the study should reach")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    check_batch(settings, args.batch)
    if args.requeue_running:
        requeue_running(study)
    finished, running = counts(study)
    print(f"study {study.study_name!r} in {spec.display}: {finished} of {target} trials finished, "
          f"{running} running; {max(0, target - finished - running)} to run", flush=True)
    heartbeat = storages.has_heartbeat(storage)
    if not heartbeat:
        _note_stuck(study)
    workers = getattr(args, "workers", 1)
    if workers > 1:
        codes = _spawn_workers(args, spec, study.study_name, target, out, workers)
        check_target(study, target, heartbeat=heartbeat)  # short: what holds the rest (a killed worker?)
        failed = [code for code in codes if code not in (0, 1)]  # 1: ended short, as check_target says
        if failed:
            raise DSTError(f"{len(failed)} of {workers} workers failed (exit codes {codes})")
    else:
        run_study(study, settings, storage, target=target, out=out, device=args.device, batch=args.batch)
    _print_result(study, spec, out)


def _note_stuck(study: optuna.Study) -> None:
    """Name the RUNNING trials whose worker is not known to run (a storage without heartbeat keeps them)."""
    stuck = [t for t in running_trials(study) if t.status != ALIVE]
    if stuck:
        print(f"note: RUNNING: {'; '.join(t.explain() for t in stuck)}. This storage has no heartbeat: a trial "
              "whose worker was killed stays RUNNING until --requeue-running (given while no other worker "
              "runs) fails it and queues its parameters again", flush=True)


def _spawn_workers(args, spec, name: str, target: int, out: str, workers: int) -> list[int]:
    """``workers`` processes of ``studies worker`` on this machine sharing the study; waits for them and
    returns their exit statuses."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    command = [sys.executable, "-m", "studies", "worker", "--study", name, "--storage", spec.url,
               "--trials", str(target), "--out", out, "--device", args.device, "--threads", str(threads),
               "--sampler", args.sampler, "--heartbeat-interval", str(args.heartbeat_interval),
               "--grace-period", str(args.grace_period), "--batch", str(args.batch)]
    if args.sampler_seed is not None:  # one seed for all: each trial's proposal is seeded by its own index
        command += ["--sampler-seed", str(args.sampler_seed)]
    processes = [subprocess.Popen(command) for _ in range(workers)]
    try:
        codes = [p.wait() for p in processes]
    except KeyboardInterrupt:  # let each worker mark its trial FAIL (as Optuna does on Ctrl-C), then stop it
        for p in processes:  # SIGTERM, which a worker takes as Ctrl-C: a SIGINT may be ignored (nohup, &)
            p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        raise
    return codes


def _print_result(study: optuna.Study, spec, out: str) -> None:
    finished, running = counts(study)
    print(f"{finished} finished trials ({running} running)")
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if completed and len(study.directions) == 1:
        best = study.best_trial
        print(f"best: trial {best.number}, value {best.value:.6g}, params {best.params}")
    elif completed:
        print(f"Pareto front: trials {[t.number for t in study.best_trials]}")
    print(f"report: python -m studies report --study {study.study_name} --storage {spec.display} "
          f"--out {os.path.join(out, study.study_name, 'report')}")
    print(f"browse: optuna-dashboard {spec.display}")


def _check_sampler_seed(args: argparse.Namespace) -> None:
    if args.sampler_seed is not None and args.sampler_seed < 0:
        raise ConfigError(f"--sampler-seed must be a non-negative integer, got {args.sampler_seed}")


def _tune(args: argparse.Namespace) -> int:
    _check_sampler_seed(args)
    if args.trials is None or args.trials < 1:
        raise ConfigError("give --trials N (N >= 1): the number of finished trials the study should reach")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    if not 0.0 <= args.warmup < 1.0:
        raise ConfigError(f"--warmup is a fraction of a run in [0, 1), got {args.warmup}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    out = args.out or DEFAULT_OUT
    name = args.study or f"{args.strategy}-{args.benchmark}"
    spec = storages.resolve(args.storage, out, name)
    storages.check_parallel(spec, args.workers, "tune")
    bench = parse_assignments(args.bench, "--bench setting")
    only = args.only.split(",") if args.only is not None else None
    space = build_space(args.strategy, args.benchmark, args.param, only, bench)
    objectives = parse_objectives(args.objective)
    settings = StudySettings(
        strategy=args.strategy, benchmark=args.benchmark, steps=_steps(args, bench), seed=args.seed,
        seeds=args.seeds, objectives=tuple(objectives),
        directions=tuple(directions(objectives, args.benchmark, bench)), space=space.to_dict(),
        pruner="none" if len(objectives) > 1 else args.pruner, warmup=args.warmup,
    )
    if len(objectives) > 1 and args.pruner != "none":
        print("note: multi-objective study: trials are not pruned (Optuna cannot prune them)", flush=True)
    storage = _open(args, spec, create=True)
    study, settings = open_study(spec, storage, name, settings, sampler=args.sampler,
                                 sampler_seed=args.sampler_seed)
    study.set_user_attr("target", args.trials)  # a worker's default --trials
    study.set_user_attr("out", out)  # a worker's default --out
    print("tuning " + "; ".join(p.describe() for p in space.params), flush=True)
    with storages.reporting_lost_storage(spec):
        _run(args, spec, storage, study, settings, out)
    return 0


def _worker(args: argparse.Namespace) -> int:
    _check_sampler_seed(args)
    spec = storages.resolve(args.storage, args.out or DEFAULT_OUT, args.study)
    storages.check_parallel(spec, 1, "worker")
    storage = _open(args, spec, create=False)
    study, settings = open_study(spec, storage, args.study, sampler=args.sampler, sampler_seed=args.sampler_seed)
    out = args.out or study.user_attrs.get("out") or DEFAULT_OUT
    with storages.reporting_lost_storage(spec):
        _run(args, spec, storage, study, settings, out)
    return 0


def _report(args: argparse.Namespace) -> int:
    out = args.out or DEFAULT_OUT
    spec = storages.resolve(args.storage, out, args.study)
    storage = storages.open_storage(spec, create=False)
    study, _ = open_study(spec, storage, args.study)
    for path in write_report(study, out):
        print(f"wrote {path}")
    print(f"storage: {spec.display}  (browse it with: optuna-dashboard {spec.display})")
    return 0


class _NoTracebackForUserErrors(logging.Filter):
    """Optuna logs a failed trial's exception with its traceback; for a DSTError (a setting the user can
    fix, said in one line by ``main``) the traceback is noise, so the record keeps only its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DSTError):
            record.exc_info = None
        return True


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoTracebackForUserErrors) for f in optimize_log.filters):
        optimize_log.addFilter(_NoTracebackForUserErrors())
    args = _parser().parse_args(argv)
    with sigterm_interrupts():
        try:
            return {"tune": _tune, "worker": _worker, "report": _report}[args.command](args)
        except TargetNotReached as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except DSTError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: finished trials are kept in the storage; run again to continue", file=sys.stderr)
            return 130
