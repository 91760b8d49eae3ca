"""Ablations of refresh strategies: which keeps plasticity best, and at what cost?

A comparison runs arms (a labelled strategy with its settings and benchmark overrides) x seeds on one
benchmark through dst's one experiment loop (:func:`dst.runner.run`), in parallel worker processes and
resumably, then writes a combined table, per-arm means with 95% confidence intervals (percentile
bootstrap over seeds: :func:`bootstrap_interval`), plots and a markdown report::

    from comparisons import preset, run_comparison
    result = run_comparison(preset("quick")[0], "results/quick")
    print(result["summary"])

The command line is ``python -m comparisons`` (see :mod:`comparisons.cli`).
"""

from __future__ import annotations

from .api import Prepared, prepare_comparison, run_comparison, run_prepared
from .presets import PRESETS, build_arms, describe_presets, free_form, preset
from .report import format_summary, write_report
from .spec import Arm, Comparison, ResolvedArm, UnexpectedError, resolve
from .tables import bootstrap_interval, combined_table, run_summaries, summarize_runs

__all__ = [
    "Arm",
    "Comparison",
    "PRESETS",
    "Prepared",
    "ResolvedArm",
    "UnexpectedError",
    "bootstrap_interval",
    "build_arms",
    "combined_table",
    "describe_presets",
    "format_summary",
    "free_form",
    "prepare_comparison",
    "preset",
    "resolve",
    "run_comparison",
    "run_prepared",
    "run_summaries",
    "summarize_runs",
    "write_report",
]
