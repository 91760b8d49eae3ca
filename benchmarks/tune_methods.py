"""Tune each plasticity method's one or two main settings with ``python -m studies``, a fixed budget each.

    python benchmarks/tune_methods.py --protocol bit-flipping --out benchmarks/results/tune-methods
    python benchmarks/tune_methods.py --protocol permuted-mnist --bench data_dir=../shared/data/mnist
    python benchmarks/tune_methods.py --methods upgd,snr --trials 8 --steps 50000   # a few, smaller
    python benchmarks/tune_methods.py --methods cbp,redo --threads 1 &   # two tunings side by side, one core
    python benchmarks/tune_methods.py --methods upgd,snr --threads 1 &   # each (tuned.json: rerun with all)

Every method gets the same budget: ``--trials`` finished Optuna trials (TPE), each ``--seeds`` seeds, trials
asked ``--batch`` at a time and trained as one population; the objective is the late-window error (loss on
bit-flipping, 1 - accuracy on permuted MNIST), minimised. The protocols are the ``methods`` comparison's
(``comparisons.presets.methods``), shortened to ``--steps``. Each study lives in OUT/PROTOCOL/METHOD.journal
(rerunning continues it). At the end the script prints the best settings of every method and the
``python -m comparisons`` command that runs the tuned methods at the comparison's full length, and writes
them to OUT/PROTOCOL/tuned.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

#: each method's main settings, searched over their declared ranges (or the range given here)
MAIN_SETTINGS: dict[str, dict[str, str | None]] = {
    "cbp": {"replacement_rate": None, "maturity_threshold": None},
    "redo": {"tau": None, "period": None},
    "regrama": {"tau": None, "window": "1:1000:log"},
    "snr": {"percentile": None, "threshold": None},
    "shrink-perturb": {"weight_decay": None, "noise_std": None},
    "l2-init": {"strength": None},
    "upgd": {"sigma": None, "beta_utility": None},
    "weight-clipping": {"kappa": None},
    "parseval": {"strength": None},
    "spectral-reg": {"strength": None},
    "hare-tortoise": {"beta": None, "reset_every": None},
}
PROTOCOLS = {  # the methods preset's benchmark settings
    "bit-flipping": {"bench": ["hidden=5"], "steps": 300_000},
    "permuted-mnist": {"bench": ["lr=0.003", "batch_size=1", "examples_per_task=10000", "hidden=100,100,100"],
                       "steps": 100_000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="bit-flipping")
    parser.add_argument("--methods", default=",".join(MAIN_SETTINGS), help="comma-separated (default: all)")
    parser.add_argument("--trials", type=int, default=16, help="finished trials per method (default 16)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per trial (default 3)")
    parser.add_argument("--batch", type=int, default=8, help="trials per population (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="steps per trial (default: 300k / 100k)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: the cores over the workers; give 1 when several "
                             "tunings share the cores, or they oversubscribe them)")
    parser.add_argument("--bench", action="append", default=[], metavar="KEY=VALUE", help="extra benchmark setting")
    parser.add_argument("--out", default="benchmarks/results/tune-methods")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(MAIN_SETTINGS))
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; tunable: {', '.join(MAIN_SETTINGS)}")
    protocol = PROTOCOLS[args.protocol]
    steps = args.steps or protocol["steps"]
    out = Path(args.out) / args.protocol
    best: dict[str, dict] = {}
    for method in methods:
        settings = MAIN_SETTINGS[method]
        journal = out / f"{method}.journal"
        command = [sys.executable, "-m", "studies", "tune", "--strategy", method, "--benchmark", args.protocol,
                   "--study", method, "--storage", str(journal), "--out", str(out), "--trials", str(args.trials),
                   "--seeds", str(args.seeds), "--batch", str(args.batch), "--steps", str(steps),
                   "--workers", str(args.workers), "--sampler-seed", "0", "--device", "cpu",
                   "--only", ",".join(settings)] + (["--threads", str(args.threads)] if args.threads else [])
        command += [f"--bench={b}" for b in protocol["bench"] + args.bench]
        command += [f"--param={name}={spec}" for name, spec in settings.items() if spec is not None]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        report = out / method / "report"
        subprocess.run([sys.executable, "-m", "studies", "report", "--study", method, "--storage", str(journal),
                        "--out", str(report)], check=True, stdout=subprocess.DEVNULL)
        record = json.loads((report / "best.json").read_text())["best"]
        best[method] = {"params": record["params"], "late_window": record["values"]["late_window"],
                        "seconds": round(time.perf_counter() - start)}
        print(f"{method}: {record['params']} -> late window {best[method]['late_window']:.4f} "
              f"({best[method]['seconds']} s)", flush=True)
    sets = [f"--set {method}.{name}={value}" for method, entry in best.items() for name, value in entry["params"].items()]
    benches = " ".join(f"--bench {b}" for b in protocol["bench"] + args.bench)
    run = (f"python -m comparisons --benchmark {args.protocol} --strategies {','.join(best)} --seeds 10 "
           f"{benches} {' '.join(sets)} --out results/methods-tuned-{args.protocol}")
    (out / "tuned.json").write_text(json.dumps({"budget": vars(args) | {"steps": steps}, "best": best,
                                                "command": run}, indent=2))
    print(f"\nthe tuned methods at full length (add --steps 1000000 for bit-flipping, tasks=30 for MNIST):\n{run}")


if __name__ == "__main__":
    main()
