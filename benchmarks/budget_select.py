"""How budget mode chooses its gates (issue 13): the knapsack rule and when it runs.

TAPS at budget 0.1 (real Lite0, 64 px, 3 epochs, lr 1e-3, batch 32) on Fashion-MNIST (2,000 /
1,000) and digits, for: greedy by importance per stored number vs the exact knapsack, and the
share of steps before the choice (``TAPSConfig.budget_select``; at least 8 steps either way).

    python benchmarks/budget_select.py   # writes benchmarks/results/budget_select.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

import taps_cl.taps.budget as budget_mod
from benchmarks.harness import RESULTS, parser, print_table, save
from benchmarks.transfer import _prepared, _taps_row
from taps_cl.bases import load_base
from taps_cl.cli.tables import fmt_pct
from taps_cl.config import TAPSConfig, TrainConfig

EXACT = budget_mod.knapsack


def greedy(values: dict, sizes: dict, room: int) -> list[str]:
    """The first version's rule: most importance per stored number first, while it fits."""
    chosen = []
    for n in sorted(values, key=lambda n: values[n] / sizes[n], reverse=True):
        if values[n] > 0 and sizes[n] <= room:
            chosen.append(n)
            room -= sizes[n]
    return chosen


RULES = {"greedy": greedy, "exact": EXACT}
SETTINGS = [("greedy", 0.3), ("exact", 0.3), ("exact", 0.15), ("exact", 0.1), ("exact", 0.0)]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=RESULTS / "budget_select.json")
    p.add_argument("--tasks", nargs="+", default=["fashion_mnist", "digits"])
    p.add_argument("--budget", type=float, default=0.1)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    base = load_base("efficientnet_lite0")
    data_args = argparse.Namespace(fast=False, max_train=None, image_size=64)
    cfg = TrainConfig(epochs=3, image_size=64, lr=1e-3, seed=0)
    rows = []
    for task in args.tasks:
        spec, train, test = _prepared(base, task, data_args)
        for rule, select in SETTINGS:
            budget_mod.knapsack = RULES[rule]
            try:
                taps = TAPSConfig(budget=args.budget, budget_select=select)
                row = _taps_row(base, task, spec, train, test, cfg, taps, f"{rule}/{select}")
            finally:
                budget_mod.knapsack = EXACT
            rows.append({**row, "rule": rule, "budget_select": select})
            print(f"{task} {rule} {select}: {fmt_pct(row['accuracy'])} at "
                  f"{fmt_pct(row['share'])}", flush=True)  # fmt: skip
    print_table(["task", "rule", "select", "accuracy", "share", "layers"], [
        (r["task"], r["rule"], r["budget_select"], fmt_pct(r["accuracy"]), fmt_pct(r["share"]),
         r["layers"]) for r in rows
    ])  # fmt: skip
    save(args, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
