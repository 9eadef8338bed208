"""How the defaults of TrainConfig/TAPSConfig were chosen (issue 13, item 4), and a check of them
on a task they were not tuned on.

A staged coordinate search on the *tuning* tasks (real Lite0, 64 px, 3 epochs, AdamW), one knob
at a time from the previous defaults, then the winners on the *held-out* task at three batch
sizes, against the previous defaults and full fine-tuning:

1. lr in {1e-3, 3e-3} x norm statistics in {"base", "reset"}
2. lam in {0.25, 0.5, 1.0}
3. the score-lr rule scaled by {0.5, 1, 2} (the rule itself scales with the step count, so it
   is not tied to one dataset or batch size)
4. dense deltas vs delta_rank 8 / 16 (kept only if it wins)
5. norm statistics again on a long run (10 epochs)

A knob's winner maximises ``mean accuracy - exchange * mean share of the base`` over the tuning
tasks (``--exchange`` 0.05: one accuracy point is worth 20% of the base's parameters, close to
the rate at which full fine-tuning buys accuracy over the feature extractor on this suite, see
``docs/benchmarks.md``; a configuration below that rate buys accuracy more dearly than
fine-tuning does). Without the size term every
knob that keeps more layers (lower lam, slower scores) would win. Ties within ``--tolerance``
go to the previous default.

Held-out check: on the held-out task, every value tried for every knob, varied one at a time
from the chosen defaults, with the same objective; then the chosen defaults at batch sizes 16,
32 and 64 against full fine-tuning at the same batch size.

    python benchmarks/defaults.py        # writes benchmarks/results/defaults.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

import taps_cl.training.loop as train_mod
from benchmarks.harness import RESULTS, parser, print_table, save
from benchmarks.transfer import _prepared, _taps_row
from taps_cl.bases import load_base
from taps_cl.cli.tables import fmt_pct
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.training.baselines import fit_baseline

_RULE = train_mod.auto_score_lr
KNOBS = {  # tried in this order, each from the winners so far
    "lr": [1e-3, 3e-3],
    "norm_stats": ["base", "reset"],
    "lam": [0.25, 0.5, 1.0],
    "score_scale": [0.5, 1.0, 2.0],
    "rank": [None, 8, 16],
}


def _data(base, name: str, image_size: int, max_train: int | None):
    return _prepared(base, name, argparse.Namespace(fast=False, max_train=max_train,
                                                    image_size=image_size))  # fmt: skip


def run_taps(base, data, taps: TAPSConfig, train: TrainConfig, score_scale: float) -> dict:
    """One TAPS task trained and finalised (accuracy of the stored form), with the score-lr
    rule scaled by ``score_scale``."""
    spec, train_ds, test_ds = data

    def scaled(*args, **kw):
        return score_scale * _RULE(*args, **kw)

    train_mod.auto_score_lr = scaled
    try:
        row = _taps_row(base, "t", spec, train_ds, test_ds, train, taps, "taps")
    finally:
        train_mod.auto_score_lr = _RULE
    return {k: row[k] for k in ("accuracy", "share", "layers", "seconds")}


def _setting(s: dict) -> tuple[TAPSConfig, TrainConfig, float]:
    taps = TAPSConfig(lam=s["lam"], norm_stats=s["norm_stats"], delta_rank=s["rank"])
    train = TrainConfig(epochs=s["epochs"], lr=s["lr"], batch_size=s["batch"],
                        image_size=s["image_size"], seed=0)  # fmt: skip
    return taps, train, s["score_scale"]


class Search:
    def __init__(self, base, datasets: dict, tolerance: float, exchange: float) -> None:
        self.base, self.datasets, self.tolerance = base, datasets, tolerance
        self.exchange = exchange
        self.rows: list[dict] = []
        self._done: dict[tuple, dict] = {}  # (setting, task) -> result: a stage's incumbent

    def evaluate(self, stage: str, setting: dict, tasks: list[str]) -> dict:
        results = {}
        for name in tasks:
            key = (tuple(sorted(setting.items(), key=str)), name)
            if key in self._done:
                results[name] = self._done[key]
                continue
            res = run_taps(self.base, self.datasets[name], *_setting(setting))
            self.rows.append({"stage": stage, "task": name, **setting, **res})
            results[name] = self._done[key] = res
            print(
                f"  {stage:>10} {name:>13} {setting} -> {fmt_pct(res['accuracy'])} "
                f"share {fmt_pct(res['share'])} ({res['seconds']:.0f} s)",
                flush=True,
            )
        n = len(results)
        acc = sum(r["accuracy"] for r in results.values()) / n
        share = sum(r["share"] for r in results.values()) / n
        return {"accuracy": acc, "share": share, "objective": acc - self.exchange * share}

    def choose(
        self, stage: str, current: dict, key: str, values: list, tasks: list[str]
    ) -> tuple[dict, dict]:
        """Try ``values`` of ``key`` from ``current``; the setting with the winner, and every
        value's mean accuracy, share and objective."""
        scores = {}
        for v in values:
            scores[v] = self.evaluate(stage, {**current, key: v}, tasks)
        best = max(s["objective"] for s in scores.values())
        ties = [v for v, s in scores.items() if s["objective"] >= best - self.tolerance]
        winner = (
            current[key]
            if current[key] in ties
            else max(ties, key=lambda v: scores[v]["objective"])
        )
        tried = ", ".join(
            f"{v}: {fmt_pct(s['accuracy'])} at {fmt_pct(s['share'])} -> {100 * s['objective']:.2f}"
            for v, s in scores.items()
        )
        print(f"{stage}: {key} = {winner!r} ({tried})", flush=True)
        return {**current, key: winner}, {str(v): s for v, s in scores.items()}


def held_out(search: Search, cur: dict, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """On the held-out task: every knob's values one at a time from the chosen defaults, and
    the chosen defaults at three batch sizes against full fine-tuning at the same size."""
    held_knobs = {}
    for key, values in KNOBS.items():
        _, held_knobs[key] = search.choose(f"held-{key}", cur, key, values, [args.held_out])
    held = []
    spec, held_train, held_test = search.datasets[args.held_out]
    for batch in (16, 32, 64):
        res = search.evaluate("held-batch", {**cur, "batch": batch}, [args.held_out])
        held.append({"method": "taps (chosen defaults)", "batch": batch, **res})
        cfg = TrainConfig(epochs=3, lr=cur["lr"], batch_size=batch, image_size=args.image_size,
                          seed=0)  # fmt: skip
        ft = fit_baseline(search.base.module, spec.num_classes, held_train, held_test, cfg)
        held.append({"method": "finetune", "batch": batch, "accuracy": ft.accuracy, "share": 1.0})
    return held_knobs, held


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=RESULTS / "defaults.json")
    p.add_argument("--tune", nargs="+", default=["fashion_mnist", "lfw_faces"])
    p.add_argument("--held-out", default="digits")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--exchange", type=float, default=0.05, help="accuracy per unit share")
    p.add_argument("--long-epochs", type=int, default=10)
    p.add_argument("--long-max-train", type=int, default=1000)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    base = load_base("efficientnet_lite0")
    size = args.image_size
    data = {n: _data(base, n, size, None) for n in [*args.tune, args.held_out]}
    old = {"lr": TrainConfig.lr, "norm_stats": "base", "lam": 0.5, "score_scale": 1.0,
           "rank": None, "epochs": 3, "batch": 32, "image_size": size}  # fmt: skip
    search = Search(base, data, args.tolerance, args.exchange)
    cur, tuning = old, {}
    for key, values in KNOBS.items():
        cur, tuning[key] = search.choose(key, cur, key, values, args.tune)
    long_data = {n: _data(base, n, size, args.long_max_train) for n in args.tune}
    long_search = Search(base, long_data, args.tolerance, args.exchange)
    long = {**cur, "epochs": args.long_epochs}
    long_pick, tuning["long-run norm_stats"] = long_search.choose(
        "long", long, "norm_stats", KNOBS["norm_stats"], args.tune
    )
    held_knobs, held = held_out(search, cur, args)
    print_table(["held-out", "batch", "accuracy", "% of base"], [
        (h["method"], h["batch"], fmt_pct(h["accuracy"]), fmt_pct(h["share"])) for h in held
    ])  # fmt: skip
    agree = {k: max(v, key=lambda x: v[x]["objective"]) for k, v in held_knobs.items()}
    print(f"chosen on {args.tune}: {cur}; long-run norm statistics: {long_pick['norm_stats']}")
    print(f"best on held-out {args.held_out}, one knob at a time: {agree}")
    save(args, {
        "args": vars(args), "previous": old, "chosen": cur, "tuning": tuning,
        "long_run_norm_stats": long_pick["norm_stats"], "held_out_knobs": held_knobs,
        "held_out_best": agree, "held_out_batches": held,
        "rows": search.rows + long_search.rows})  # fmt: skip


if __name__ == "__main__":
    main()
