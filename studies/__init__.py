"""Optuna studies over dst refresh strategies: search spaces from config metadata, plasticity
objectives, embedded or PostgreSQL storage with many workers, and reports.

    python -m studies tune --strategy cbp --benchmark bit-flipping --trials 40 --study cbp-bf
    python -m studies worker --study cbp-bf --storage postgresql://USER@HOST:PORT/DB
    python -m studies report --study cbp-bf --storage runs/studies/cbp-bf.journal --out report/

Every trial is one or more ``dst.runner.run`` calls: studies has no training loop of its own.
"""

from .objectives import OBJECTIVES, directions, objective_values, parse_objectives
from .report import write_report
from .space import Param, SearchSpace, build_space
from .storage import StorageSpec, check_parallel, open_storage, resolve
from .study import TargetNotReached, check_target, counts, open_study, requeue_running, run_study
from .trial import StudySettings, TrialObjective

__all__ = [
    "OBJECTIVES",
    "Param",
    "SearchSpace",
    "StorageSpec",
    "StudySettings",
    "TargetNotReached",
    "TrialObjective",
    "build_space",
    "check_parallel",
    "check_target",
    "counts",
    "directions",
    "objective_values",
    "open_storage",
    "open_study",
    "parse_objectives",
    "requeue_running",
    "resolve",
    "run_study",
    "write_report",
]
