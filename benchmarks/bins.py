"""Per-bin error of a finished (or partly finished) comparison, arm by arm.

    python benchmarks/bins.py results/sbf                  # windows: first 5 bins, bins 26-50, last 5
    python benchmarks/bins.py results/sbf --every 5        # also the mean per bin, every 5th bin
    python benchmarks/bins.py results/sbf --windows 1-5,26-50,46-50

Reads every finished run under OUT (the layout ``python -m comparisons`` writes, ``runs/<arm>/seed-<s>/``)
and prints, per arm, the mean over seeds of the per-bin loss in each window of bins (1-based, inclusive)
with its 95% interval over seeds (``comparisons.tables.INTERVAL``, a percentile bootstrap), each seed's
window means, and optionally the per-bin means themselves.
"""

from __future__ import annotations

import argparse

import pandas as pd

from comparisons.tables import INTERVAL, bootstrap_interval, combined_table


def _windows(text: str) -> list[tuple[int, int]]:
    windows = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        windows.append((int(first), int(last or first)))
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the comparison's output folder")
    parser.add_argument("--windows", default="1-5,26-50,46-50", help="bin windows, 1-based and inclusive")
    parser.add_argument("--every", type=int, default=0, help="print the mean per bin for every N-th bin")
    parser.add_argument("--metric", default="loss", help="the per-bin column (default: loss)")
    args = parser.parse_args()

    data = combined_table(args.out)
    data = data[data["finished"]] if "finished" in data else data
    if data.empty:
        raise SystemExit(f"no finished runs under {args.out}")
    data = data.sort_values(["arm", "seed", "step"])
    data["bin"] = data.groupby(["arm", "seed"]).cumcount() + 1
    arms = list(dict.fromkeys(data["arm"]))
    windows = _windows(args.windows)
    pd.set_option("display.width", 200)

    print(f"mean {args.metric} per bin over seeds, by window of bins [{INTERVAL}]")
    rows = []
    for arm in arms:
        runs = data[data["arm"] == arm]
        row = {"arm": arm, "seeds": runs["seed"].nunique()}
        for first, last in windows:
            per_seed = runs[(runs["bin"] >= first) & (runs["bin"] <= last)].groupby("seed")[args.metric].mean()
            mean, low, high, _ = bootstrap_interval(per_seed)
            row[f"bins {first}-{last}"] = f"{mean:.3f} [{low:.3f}, {high:.3f}]"
        rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False))

    print("\nper seed, window means")
    for arm in arms:
        runs = data[data["arm"] == arm]
        parts = []
        for seed, run in runs.groupby("seed"):
            means = [run[(run["bin"] >= a) & (run["bin"] <= b)][args.metric].mean() for a, b in windows]
            parts.append(f"s{seed} " + "/".join(f"{m:.3f}" for m in means))
        print(f"  {arm}: " + ", ".join(parts))

    if args.every:
        table = data.pivot_table(index="bin", columns="arm", values=args.metric, aggfunc="mean")[arms]
        table = table[(table.index % args.every == 0) | (table.index == 1)]
        print(f"\nmean {args.metric} per bin over seeds (every {args.every}th bin)")
        print(table.to_string(float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
