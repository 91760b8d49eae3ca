"""Run every (arm, seed) of a comparison through ``dst.runner.run``, in worker processes, resumably.

Each run owns ``OUT/runs/<arm>/seed-<k>/``. A run is *finished* when its ``summary.json`` exists and its
``config.json`` matches the spec; finished runs are never redone. A run that *failed* (dst left a
``failure.json``: its loss became NaN or infinite) with the spec's ``config.json`` is not redone either,
since a diverging run diverges again; ``retry_failed`` clears and redoes it. Any other unfinished run
with a checkpoint resumes from it; one without a checkpoint is cleared and started again. So Ctrl-C or
a killed worker loses only the work since the last checkpoint of the runs in flight, and rerunning the
same command carries on. ``OUT/comparison.json`` records the arms; rerunning into the same OUT may add
arms, but an arm whose label is already recorded with other settings is an error, never a silent mix.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dst import benchmarks
from dst.errors import ConfigError, NonFiniteLossError
from dst.rundir import CHECKPOINT, CONFIG, FAILURE, SUMMARY, read_population
from dst.runner import RunSpec

from .spec import Comparison, ResolvedArm, dir_name, jsonable

__all__ = ["Job", "Population", "populations", "RunOutcome", "plan", "record_comparison", "write_record", "run_jobs", "run_dir", "read_failure",
           "earlier_failure", "COMPARISON_FILE"]

log = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.json"


@dataclass(frozen=True)
class Job:
    """One run to do: the arm's label, the seed, where it goes and the dst spec."""

    label: str
    seed: int
    out_dir: Path
    spec: RunSpec

    @property
    def expected(self) -> dict[str, Any]:
        """The ``config.json`` entries a finished run of this job has (the spec's settings are resolved)."""
        spec = self.spec
        expected = {"benchmark": spec.benchmark, "strategy": spec.strategy, "seed": spec.seed,
                    "bench": spec.bench, "settings": spec.settings}
        return expected if spec.steps is None else {**expected, "steps": spec.steps}


@dataclass(frozen=True)
class RunOutcome:
    """What became of one job: ``finished`` (just now), ``skipped`` (already done) or ``failed``."""

    label: str
    seed: int
    status: str
    seconds: float = 0.0
    error: str = ""


def run_dir(out: str | os.PathLike, label: str, seed: int) -> Path:
    return Path(out) / "runs" / dir_name(label) / f"seed-{seed}"


def _config_differs(job: Job) -> list[str] | None:
    """The entries of ``job.expected`` that the run's ``config.json`` disagrees on; None when it is unreadable."""
    try:
        saved = json.loads((job.out_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    return sorted(k for k, v in job.expected.items() if jsonable(saved.get(k)) != v)


def is_finished(job: Job) -> bool:
    """``summary.json`` is there and ``config.json`` says it ran this spec (else an error naming the dir)."""
    if not (job.out_dir / SUMMARY).exists():
        return False
    differ = _config_differs(job)
    if differ is None:
        return False  # a summary without a readable config: redo it
    if differ:
        raise ConfigError(
            f"{str(job.out_dir)!r} holds a finished run with other {', '.join(differ)} than arm {job.label!r} "
            "asks for; move it away or choose a new --out (nothing was overwritten)"
        )
    return True


def read_failure(run: str | os.PathLike) -> str | None:
    """Why the run in ``run`` failed, from the ``failure.json`` dst leaves there; None when it has none.

    A corrupt file still marks a failure and is described, never raised: a report must not crash on it.
    """
    path = Path(run) / FAILURE
    if not path.exists():
        return None
    try:
        failure = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"{FAILURE} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(failure, dict) or not failure.get("error"):
        return f"{FAILURE} holds no error message"
    return str(failure["error"])


def earlier_failure(job: Job) -> str | None:
    """The recorded reason when an earlier attempt at ``job`` (same settings in its ``config.json``) failed:
    such a run is deterministic, so redoing it would fail again. None when there is no such failure."""
    reason = read_failure(job.out_dir)
    return reason if reason is not None and _config_differs(job) == [] else None


def plan(arms: Sequence[ResolvedArm], seeds: Sequence[int], out: str | os.PathLike) -> tuple[Job, ...]:
    """Every (arm, seed) job under ``out``, in arm then seed order: each arm's spec with the seed set."""
    return tuple(Job(arm.label, seed, run_dir(out, arm.label, seed), replace(arm.spec, seed=seed))
                 for arm in arms for seed in seeds)


def _identity(arm: dict[str, Any]) -> dict[str, Any]:
    return {"strategy": arm["strategy"], "settings": arm["resolved_settings"], "bench": arm["resolved_bench"]}


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changed = []
    if before["strategy"] != after["strategy"]:
        changed.append(f"strategy {before['strategy']} -> {after['strategy']}")
    for part in ("settings", "bench"):
        old, new = before[f"resolved_{part}"], after[f"resolved_{part}"]
        changed += [f"{part}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
    return changed


def record_comparison(comparison: Comparison, arms: Sequence[ResolvedArm], out: str | os.PathLike,
                      command: str = "") -> dict[str, Any]:
    """What ``OUT/comparison.json`` holds once ``comparison`` (its resolved ``arms``) ran with ``command``:
    the recorded comparison, if any, with these arms, seeds and command added. A recorded arm label with
    other settings, another benchmark or another run length is a :class:`ConfigError`. Writes nothing
    (:func:`write_record` does), so that it is one of the checks before any run."""
    path = Path(out) / COMPARISON_FILE
    record = {"name": comparison.name, "benchmark": comparison.benchmark, "steps": comparison.steps,
              "seeds": list(comparison.seeds), "arms": [arm.record() for arm in arms]}
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("benchmark", "steps"):
            if old.get(key) != record[key]:
                raise ConfigError(
                    f"{str(out)!r} holds a comparison with {key}={old.get(key)!r}, this one has "
                    f"{key}={record[key]!r}; choose a new --out (runs of different {key} are not mixed)"
                )
        old_arms = {arm["label"]: arm for arm in old["arms"]}
        for arm in record["arms"]:
            before = old_arms.get(arm["label"])
            if before is not None and _identity(before) != _identity(arm):
                changed = _differences(before, arm)
                raise ConfigError(
                    f"arm {arm['label']!r} is recorded in {str(path)!r} with other settings "
                    f"({'; '.join(changed)}); runs of both would mix under one label: "
                    "rename the arm, or choose a new --out"
                )
        merged = {**old_arms, **{arm["label"]: arm for arm in record["arms"]}}
        record["arms"] = list(merged.values())
        record["seeds"] = sorted(set(old.get("seeds", [])) | set(record["seeds"]))
        commands = old.get("commands", [])
        record["commands"] = commands + [command] if command and command not in commands else commands
    else:
        record["commands"] = [command] if command else []
    return record


def write_record(out: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``record`` (:func:`record_comparison`) as ``OUT/comparison.json``."""
    (Path(out) / COMPARISON_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")


@dataclass(frozen=True)
class Population:
    """Unfinished jobs of one arm trained as one population (:mod:`dst.population`): one batched pass for
    their seeds, each member writing its job's run directory, exactly the run the job alone would be.
    Its checkpoint and ``population.json`` go to ``out_dir`` (``runs/<arm>/.population-<seeds>/``),
    removed once the population has finished."""

    label: str
    jobs: tuple[Job, ...]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(job.seed for job in self.jobs)

    @property
    def out_dir(self) -> Path:
        seeds = self.seeds
        contiguous = seeds == tuple(range(seeds[0], seeds[0] + len(seeds)))
        name = f"{seeds[0]}-{seeds[-1]}" if contiguous else hashlib.sha1(repr(seeds).encode()).hexdigest()[:12]
        return self.jobs[0].out_dir.parent / f".population-{name}"


def populations(jobs: Sequence[Job], workers: int) -> list[Job | Population]:
    """The jobs as populations: each arm's jobs in ``ceil(workers / arms)`` populations (so that every worker
    has one) when its benchmark can batch members, else (and for an arm with one job left) one by one."""
    by_arm: dict[str, list[Job]] = {}
    units: list[Job | Population] = []
    for job in jobs:
        if benchmarks.get(job.spec.benchmark).cls.batchable:
            by_arm.setdefault(job.label, []).append(job)
        else:
            units.append(job)
    parts = max(1, math.ceil(workers / max(1, len(by_arm))))
    for label, arm_jobs in by_arm.items():
        count = min(parts, len(arm_jobs))
        size, extra = divmod(len(arm_jobs), count)
        start = 0
        for part in range(count):
            chunk = tuple(arm_jobs[start : start + size + (part < extra)])
            start += len(chunk)
            units.append(chunk[0] if len(chunk) == 1 else Population(label, chunk))
    return units


def execute_population(population: Population) -> list[RunOutcome]:
    """Run ``population``, resuming it from its checkpoint when an earlier attempt at the same seeds left one
    (else its member folders are cleared and it starts afresh); one outcome per member."""
    from dst import runner

    start = time.perf_counter()
    directory, jobs = population.out_dir, population.jobs
    try:
        saved = read_population(directory)
    except ConfigError:
        saved = {}
    resume = saved.get("seeds") == list(population.seeds) and (directory / CHECKPOINT).exists()
    if not resume:
        for folder in (directory, *(job.out_dir for job in jobs)):
            if folder.exists():
                log.info("clearing %s: unfinished and without a population checkpoint", folder)
                shutil.rmtree(folder)
    spec = replace(jobs[0].spec, seeds=population.seeds)
    try:
        runner.run(spec, directory, member_dirs=[job.out_dir for job in jobs], resume=resume, progress=False)
    except NonFiniteLossError:
        pass  # every member diverged: each has its failure.json, reported below
    seconds = time.perf_counter() - start
    outcomes = []
    for job in jobs:
        reason = read_failure(job.out_dir)
        outcomes.append(RunOutcome(job.label, job.seed, "failed", seconds, reason) if reason is not None
                        else RunOutcome(job.label, job.seed, "finished", seconds))
    if directory.exists():  # finished: the members' run directories hold everything
        shutil.rmtree(directory)
    return outcomes


def execute_job(job: Job) -> RunOutcome:
    """Do one job in this process: skip it if finished, resume it from its checkpoint, or start it afresh."""
    from dst import runner

    if is_finished(job):
        return RunOutcome(job.label, job.seed, "skipped")
    start = time.perf_counter()
    resume = (job.out_dir / CHECKPOINT).exists()
    if not resume and job.out_dir.exists():
        log.info("clearing %s: unfinished and without a checkpoint", job.out_dir)
        shutil.rmtree(job.out_dir)
    runner.run(job.spec, job.out_dir, resume=resume, progress=False)
    return RunOutcome(job.label, job.seed, "finished", time.perf_counter() - start)


def _worker_init(level: int) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: intra-op threads would only fight each other
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _jobs(unit: Job | Population) -> tuple[Job, ...]:
    return unit.jobs if isinstance(unit, Population) else (unit,)


def _worker(unit: Job | Population) -> list[RunOutcome]:
    try:
        return execute_population(unit) if isinstance(unit, Population) else [execute_job(unit)]
    except Exception as err:  # report and go on: one diverging run must not stop the others
        return [RunOutcome(job.label, job.seed, "failed", error=f"{type(err).__name__}: {err}") for job in _jobs(unit)]


def run_jobs(jobs: Sequence[Job], workers: int | None = None, progress: bool = True,
             retry_failed: bool = False, population: bool = True) -> list[RunOutcome]:
    """Run the jobs, ``workers`` at a time (default: one per core); finished ones are skipped.

    With ``population`` each arm's unfinished seeds train as populations (:func:`populations`), else
    one process per run. A job that failed before (:func:`earlier_failure`) is reported failed again
    without running, unless ``retry_failed``: then its folder is cleared and it starts afresh.
    ``workers=1`` runs in this process (no pool), which keeps tests and debugging simple.
    """
    from tqdm.auto import tqdm

    done: list[RunOutcome] = []
    todo: list[Job] = []
    for job in jobs:
        if is_finished(job):
            done.append(RunOutcome(job.label, job.seed, "skipped"))
        elif (reason := earlier_failure(job)) is not None and not retry_failed:
            done.append(RunOutcome(job.label, job.seed, "failed", error=f"{reason} (an earlier run, not redone)"))
        else:
            if reason is not None:
                log.info("clearing %s to retry it: it failed before (%s)", job.out_dir, reason)
                shutil.rmtree(job.out_dir)
            todo.append(job)
    workers = workers or os.cpu_count() or 1
    units: list[Job | Population] = populations(todo, workers) if population else list(todo)
    workers = max(1, min(workers, len(units) or 1))
    bar = tqdm(total=len(jobs), initial=len(done), unit="run", desc="runs", disable=not progress,
               dynamic_ncols=True)
    outcomes = list(done)
    try:
        if workers == 1:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for unit in units:
                    outcomes += _worker(unit)
                    bar.update(len(_jobs(unit)))
            finally:
                torch.set_num_threads(threads)
        else:
            outcomes += _run_pool(units, workers, bar)
    finally:
        bar.close()
    return outcomes


def _context() -> multiprocessing.context.BaseContext:
    """Fork after torch has started threads can deadlock, so workers never fork from this process: a
    forkserver (a fresh process that imports dst once, then forks each worker: seconds faster per
    worker than spawn) where the platform has one, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _run_pool(todo: Sequence[Job | Population], workers: int, bar: Any) -> list[RunOutcome]:
    context = _context()
    level = logging.getLogger().getEffectiveLevel()
    outcomes: list[RunOutcome] = []
    pool = futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(level,))
    try:
        pending = {pool.submit(_worker, unit): unit for unit in todo}
        for future in futures.as_completed(pending):
            jobs = _jobs(pending[future])
            try:
                outcomes += future.result()
            except futures.process.BrokenProcessPool:
                outcomes += [RunOutcome(job.label, job.seed, "failed",
                                        error="its worker process died (killed, or out of memory)") for job in jobs]
            bar.update(len(jobs))
    except BaseException:  # Ctrl-C or an error here: stop the runs in flight now, keep what is finished
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return outcomes
