"""``python -m dst``: run one experiment, list strategies and benchmarks.

    python -m dst run --benchmark bit-flipping --strategy bp --steps 100000 --seed 0 --out runs/x
    python -m dst run --strategy cbp --set replacement_rate=1e-5 --bench hidden=100 --bench density=0.1
    python -m dst run --out runs/x --steps 1000000 --resume
    python -m dst run --strategy cbp --seeds 0:100 --steps 1000000 --out runs/pop
    python -m dst run --strategy cbp --seeds 0:3 --set replacement_rate=1e-5,1e-4,1e-3
    python -m dst strategies
    python -m dst benchmarks
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import pandas as pd

from . import benchmarks, strategies
from .config import Config, parse_assignments
from .errors import ConfigError, DSTError, NonFiniteLossError
from .interrupt import sigterm_interrupts
from .population import check_seeds
from .rundir import FAILURE, METRICS, read_config, read_population
from .runner import RunSpec, member_dir, run

__all__ = ["main"]

#: What ``run`` uses for a flag that is not given (a resumed run uses its own config.json instead).
DEFAULTS = {"benchmark": "bit-flipping", "strategy": "bp", "seed": 0}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dst", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="train one strategy on one benchmark and log metrics")
    run_parser.add_argument(
        "--benchmark", default=None,
        help=f"benchmark name (default: {DEFAULTS['benchmark']}; with --resume the run's own)",
    )
    run_parser.add_argument(
        "--strategy", default=None, help=f"strategy name (default: {DEFAULTS['strategy']}; with --resume the run's own)"
    )
    run_parser.add_argument(
        "--steps", type=int, default=None,
        help="training steps (default: the benchmark's: 100000 for bit-flipping, `tasks` whole tasks for MNIST; "
        "with --resume the run's own, and a larger value extends it)",
    )
    run_parser.add_argument(
        "--seed", type=int, default=None,
        help=f"seed of stream, net, masks and strategy (default: {DEFAULTS['seed']}; with --resume the run's own)",
    )
    run_parser.add_argument(
        "--seeds", default=None, metavar="A:B|A,B,C",
        help="train a population, one member per seed, in one batched pass: A:B is seeds A..B-1, or list "
        "them; member s writes OUT/seed-<s>/. A numeric --set value (and --bench lr) may then hold one "
        "comma-separated value per member",
    )
    run_parser.add_argument(
        "--out", default=None,
        help="output directory (default: runs/BENCHMARK-STRATEGY-sSEED, or -seedsA-B for a population)",
    )
    run_parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="strategy setting, repeatable (see `python -m dst strategies`)",
    )
    run_parser.add_argument(
        "--bench", action="append", default=[], metavar="KEY=VALUE",
        help="benchmark setting, repeatable (see `python -m dst benchmarks`)",
    )
    run_parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA if present)")
    run_parser.add_argument(
        "--checkpoint-every", type=int, default=100_000, metavar="N",
        help="steps between checkpoints, rounded up to whole bins; 0 disables (default: %(default)s)",
    )
    run_parser.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its checkpoint (from step 0 if it has none), with the settings "
        "in its config.json; flags given as well must agree with them",
    )
    run_parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    commands.add_parser("strategies", help="list registered strategies with their settings")
    commands.add_parser("benchmarks", help="list registered benchmarks with their settings")
    return parser


def _describe(registry_module) -> str:
    lines = []
    for name in registry_module.available():
        entry = registry_module.get(name)
        lines.append(f"{name}: {entry.summary}")
        presets = getattr(entry.cls, "presets", {})
        for preset, values in presets.items():
            settings = ", ".join(f"{k}={v}" for k, v in values.items())
            lines.append(f"    preset {preset} (--bench preset={preset}): {settings}")
        config: type[Config] = entry.config
        fields = config.describe()
        if not fields:
            lines.append("    (no settings)")
        for field in fields:
            extra = f"  {field['range']}" if field["range"] else ""
            help_text = f"  - {field['help']}" if field["help"] else ""
            lines.append(f"    {field['name']} = {field['default']!r} ({field['type']}){extra}{help_text}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _table(df: pd.DataFrame) -> str:
    columns = [c for c in ("seed", "step", "task", "friction", "episodic_return", "loss", "accuracy", "test_accuracy",
                           "units_replaced", "connections_regrown", "seconds_per_step") if c in df.columns]
    formats = {"loss": "{:.4f}".format, "accuracy": "{:.4f}".format, "test_accuracy": "{:.4f}".format,
               "friction": "{:.4f}".format, "episodic_return": "{:.1f}".format, "seconds_per_step": "{:.2e}".format}
    return df[columns].to_string(index=False, formatters=formats)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``A:B`` (seeds A..B-1), ``A,B,C`` or ``A`` -> the seeds."""
    try:
        if ":" in text:
            low, high = (int(part) for part in text.split(":"))
            if high <= low:
                raise ConfigError(
                    f"--seeds {text}: the range {low}:{high} is empty (A:B means seeds A..B-1, so B must exceed A)"
                )
            return tuple(range(low, high))
        return check_seeds([int(part) for part in text.split(",")], distinct=True)
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--seeds {text!r}: give a range A:B (seeds A..B-1) or a list A,B,C of integers") from None


def _spec(args: argparse.Namespace) -> RunSpec:
    """The run the flags ask for; with --resume, flags not given come from the run's config.json (or a
    population's population.json), so that ``--resume --out X`` alone continues any run, and flags given
    must agree with it (checked on start)."""
    if args.seed is not None and args.seeds is not None:
        raise ConfigError("give --seed N (one run) or --seeds A:B (a population), not both")
    population = read_population(args.out) if args.resume and args.out else {}
    if population:
        return _population_spec(args, population)
    saved = read_config(args.out) if args.resume and args.out else {}
    if args.seeds is not None:
        return _population_spec(args, {})

    def pick(name):
        given = getattr(args, name)
        return given if given is not None else saved.get(name, DEFAULTS.get(name))

    benchmark, strategy = pick("benchmark"), pick("strategy")
    # the saved settings belong to the saved benchmark and strategy; for another one the check names the change
    saved_bench = saved.get("bench", {}) if benchmark == saved.get("benchmark") else {}
    saved_settings = saved.get("settings", {}) if strategy == saved.get("strategy") else {}
    return RunSpec(
        benchmark=benchmark,
        strategy=strategy,
        steps=pick("steps"),
        seed=pick("seed"),
        bench={**saved_bench, **parse_assignments(args.bench, "--bench setting")},
        settings={**saved_settings, **parse_assignments(args.settings, "--set setting")},
        device=args.device,
        checkpoint_every=args.checkpoint_every or None,
    )


def _population_spec(args: argparse.Namespace, saved: dict) -> RunSpec:
    """A population's spec: flags over its population.json (settings as given, per-member lists included)."""
    seeds = parse_seeds(args.seeds) if args.seeds is not None else tuple(saved["seeds"])
    if saved and list(seeds) != list(saved["seeds"]):
        raise ConfigError(
            f"--resume: the population in {args.out!r} has seeds {saved['seeds']}, not {list(seeds)}; leave "
            "--seeds out to resume it, or start a new --out"
        )

    def pick(name):
        given = getattr(args, name)
        return given if given is not None else saved.get(name, DEFAULTS.get(name))

    return RunSpec(
        benchmark=pick("benchmark"),
        strategy=pick("strategy"),
        steps=pick("steps"),
        seeds=seeds,
        bench={**saved.get("bench", {}), **parse_assignments(args.bench, "--bench setting")},
        settings={**saved.get("settings", {}), **parse_assignments(args.settings, "--set setting")},
        device=args.device,
        checkpoint_every=args.checkpoint_every or None,
    )


def _run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if spec.seeds is None:
        out = args.out or f"runs/{spec.benchmark}-{spec.strategy}-s{spec.seed}"
    else:
        out = args.out or f"runs/{spec.benchmark}-{spec.strategy}-seeds{spec.seeds[0]}-{spec.seeds[-1]}"
    try:
        result = run(spec, out, resume=args.resume, progress=not args.no_progress)
    except NonFiniteLossError as err:
        where = f"{out}/{METRICS}, {out}/{FAILURE}" if spec.seeds is None else f"{out}/seed-*/{FAILURE}"
        print(f"error: {err} ({where})", file=sys.stderr)
        return 3
    if spec.seeds is None:
        print(_table(result))
        print(f"\nwrote {out}/{METRICS} ({len(result)} rows) and {out}/config.json")
        return 0
    return _report_population(spec, out, result)


def _report_population(spec: RunSpec, out: str, frames: list[pd.DataFrame]) -> int:
    """Each member's last row in one table; the members stopped by a non-finite loss, named."""
    failed = [seed for seed in spec.seeds or () if (member_dir(out, seed) / FAILURE).exists()]
    last = [frame.iloc[[-1]].assign(seed=seed) for seed, frame in zip(spec.seeds or (), frames)
            if len(frame) and seed not in failed]
    if last:
        print(_table(pd.concat(last, ignore_index=True)))
    print(f"\nwrote {len(frames)} member runs under {out}/seed-<s>/ ({METRICS}, config.json, summary.json) "
          f"and {out}/checkpoint.pt")
    if failed:
        for seed in failed:
            print(f"error: seed {seed} stopped on a non-finite loss ({member_dir(out, seed) / FAILURE})",
                  file=sys.stderr)
        return 3
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    with sigterm_interrupts():
        try:
            if args.command == "run":
                return _run(args)
            if args.command == "strategies":
                sys.stdout.write(_describe(strategies))
                return 0
            if args.command == "benchmarks":
                sys.stdout.write(_describe(benchmarks))
                return 0
        except DSTError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: rows written so far are kept; --resume continues from the last checkpoint",
                  file=sys.stderr)
            return 130
    return 2
