"""The paper's Table 1 at small scale on the offline suite: feature extractor, full fine-tuning and
TAPS on the real ImageNet-pretrained EfficientNet-Lite0, same epochs and optimizer budget.

Per task: accuracy, stored bytes all in (patch + routing statistics), layers, time; plus the
mean. TAPS twice: in paper mode (the previous default) and with this release's defaults.

    python benchmarks/transfer.py                      # the documented run (all-in bytes)
    python benchmarks/transfer.py --fast               # a quick smoke run
    python benchmarks/transfer.py --budgets 0.05,0.1,0.2,0.35 --image-size 48
        # budget sweep (issue 13): TAPS per budget (dense fp32, int8, low rank, both), last-k
        # fine-tuning at the same parameter count and PEFT LoRA; writes transfer_budget.json/.png
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks.harness import RESULTS, RowCache, parser, print_table, save
from taps_cl.bases import load_base
from taps_cl.cli.tables import fmt_bytes, fmt_pct
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.data import prepare
from taps_cl.scenarios import get_task
from taps_cl.taps.model import TAPSModel
from taps_cl.training.baselines import fit_baseline, lastk_parameters
from taps_cl.training.loop import fit_task

CAPS = {"fashion_mnist": (2000, 1000), "digits": (None, None), "lfw_faces": (None, None)}


def _prepared(base, name: str, args: argparse.Namespace):
    max_train, max_test = CAPS[name] if not args.fast else (300, 150)
    if args.max_train:
        max_train = args.max_train if max_train is None else min(max_train, args.max_train)
    spec = get_task(name, max_train=max_train, max_test=max_test)
    train = prepare(spec.train, preprocessing=base.preprocessing, image_size=args.image_size)
    test = prepare(spec.test, preprocessing=base.preprocessing, image_size=args.image_size)
    return spec, train, test


VARIANTS = {  # label -> TAPSConfig fields in the budget sweep (size None: the share budget and
    # these fields alone decide, as when the sweep was run)
    "taps": {"size": None, "delta_rank": None},
    "taps-int8": {"size": None, "delta_rank": None, "delta_dtype": "int8"},
    "taps-r8": {"size": None, "delta_rank": 8},
    "taps-r8-int8": {"size": None, "delta_rank": 8, "delta_dtype": "int8"},
    "taps-r32-int8": {"size": None, "delta_rank": 32, "delta_dtype": "int8"},
    "taps-bf16": {"size": None, "delta_rank": None, "delta_dtype": "bfloat16"},
}


def hash_config(taps: TAPSConfig) -> str:
    return hashlib.sha256(taps.to_json().encode()).hexdigest()[:12]


def run_budget_task(base, name: str, args: argparse.Namespace, cache: RowCache) -> list[dict]:
    """Every configuration of the budget sweep on one task (rows with method@budget names).
    Every method runs at every ``--lrs`` (the caller keeps each method's better lr, as the
    issue's LoRA comparison did)."""
    from benchmarks._compact import fit_lora

    spec, train, test = _prepared(base, name, args)
    rows = []
    sizes = lastk_parameters(base.module, spec.num_classes)
    n_base = base.num_parameters
    for lr in args.lrs:
        cfg = TrainConfig(epochs=args.epochs, image_size=args.image_size, lr=lr, seed=0)

        def baseline(mode: str, label: str, k: int = 0, cfg: TrainConfig = cfg) -> dict:
            res = fit_baseline(base.module, spec.num_classes, train, test, cfg, mode=mode,
                               last_k=k)  # fmt: skip
            return _row(name, label, res.accuracy, res.task_parameters, res.nbytes, res.seconds)

        for mode in ("linear", "finetune"):
            rows.append({**cache.get(f"{name}/{mode}/{lr}", lambda m=mode: baseline(m, m)),
                         "lr": lr})  # fmt: skip
        for rank in args.lora_ranks:

            def lora(rank: int = rank, cfg: TrainConfig = cfg) -> dict:
                r = fit_lora(base.module, spec.num_classes, train, test, cfg, rank)
                return _row(name, f"lora@r{rank}", r["accuracy"], r["params"], r["bytes"],
                            r["seconds"])  # fmt: skip

            rows.append({**cache.get(f"{name}/lora{rank}/{lr}", lora), "lr": lr})
        for budget in args.budgets:
            k = max(i for i, size in enumerate(sizes) if size <= budget * n_base or i == 0)
            row = cache.get(f"{name}/lastk{budget}/{lr}",
                            lambda b=budget, k=k: baseline("lastk", f"lastk@{b}", k))  # fmt: skip
            rows.append({**row, "budget": budget, "layers": f"k={k}", "lr": lr})
    for lr in args.lrs:
        cfg = TrainConfig(epochs=args.epochs, image_size=args.image_size, lr=lr, seed=0)
        for budget in args.budgets:
            for label in args.variants:
                taps = TAPSConfig(budget=budget, **VARIANTS[label])
                key = f"{name}/{label}/{budget}/{lr}/{hash_config(taps)}"
                row = cache.get(key,
                                lambda t=taps, lb=label, c=cfg: _taps_row(
                                    base, name, spec, train, test, c, t, lb))  # fmt: skip
                rows.append({**row, "budget": budget, "lr": lr})
    return rows


def _taps_row(base, name, spec, train, test, cfg, taps: TAPSConfig, label: str) -> dict:
    model = TAPSModel(copy.deepcopy(base.module), taps)
    model.add_task(name, spec.num_classes, seed=0)
    start = time.perf_counter()
    fit = fit_task(model, name, train, test, cfg, quiet=True)  # accuracy of the stored form
    patch = model.finalize_task(name)
    row = _row(name, f"{label}@{taps.budget}", fit.accuracy, patch.num_parameters, patch.nbytes,
               time.perf_counter() - start)  # fmt: skip
    row["layers"] = f"{len(patch.active_layers)}/{patch.num_layers}"
    row["share"] = patch.num_parameters / base.num_parameters
    return row


def best_lr(rows: list[dict]) -> tuple[list[dict], dict[str, float]]:
    """Each baseline method at its better learning rate by mean accuracy over the tasks (one lr
    per method, not per task: picking per task would tune on the test split)."""
    chosen: dict[str, float] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        lrs: dict[float, list[float]] = {}
        for r in rows:
            if r["method"] == method:
                lrs.setdefault(r["lr"], []).append(r["accuracy"])
        chosen[method] = max(lrs, key=lambda lr: (sum(lrs[lr]) / len(lrs[lr]), -lr))
    return [r for r in rows if r["lr"] == chosen[r["method"]]], chosen


def budget_sweep(base, args: argparse.Namespace) -> None:
    from benchmarks._compact import mean_rows, plot, targets

    signature = {k: getattr(args, k) for k in ("epochs", "image_size", "max_train", "fast")}
    signature["defaults"] = TrainConfig().to_dict()  # TAPS rows' keys carry their TAPSConfig
    cache = RowCache(args.cache, signature)
    rows = [r for name in args.tasks for r in run_budget_task(base, name, args, cache)]
    rows, lrs = best_lr(rows)
    means = mean_rows(rows)
    n_base = base.num_parameters
    print_table(["task", "method", "lr", "accuracy", "% of base", "stored", "layers", "time"], [
        (r["task"], r["method"], f"{lrs[r['method']]:g}", fmt_pct(r["accuracy"]),
         fmt_pct(r["params"] / n_base), fmt_bytes(r["bytes"]), r.get("layers", "-"),
         f"{r['seconds']:.0f} s")
        for r in rows + means
    ])  # fmt: skip
    goals = targets(means, rows, n_base)
    print(f"\nTAPS runs over budget by more than 10%: {len(goals['share_over_budget_by_10pct'])}")
    print(json.dumps({k: v for k, v in goals.items() if not k.startswith("share_")}, indent=1))
    print(f"TAPS runs under budget by more than 10%: {len(goals['share_under_budget_by_10pct'])}")
    out = save(args, {"args": vars(args), "base_parameters": n_base, "lrs": lrs,
                      "targets": goals, "rows": rows, "means": means},
               path=Path(args.out).with_name("transfer_budget.json"))  # fmt: skip
    plot(means, str(out.with_suffix(".png")), 4 * n_base)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _row(task, method, acc, params, nbytes, seconds) -> dict:
    return {"task": task, "method": method, "accuracy": acc, "params": params,
            "bytes": nbytes, "seconds": seconds}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, out=RESULTS / "transfer.json")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="None: the rule (lr_for)")
    p.add_argument("--lam", type=float, default=TAPSConfig.lam)
    p.add_argument("--penalty", default=TAPSConfig.penalty, choices=["uniform", "weighted"])
    p.add_argument("--tasks", nargs="+", default=list(CAPS))
    p.add_argument("--budgets", type=_floats, default=[], help="e.g. 0.05,0.1,0.2,0.35")
    p.add_argument(
        "--variants",
        default="taps,taps-int8,taps-r8,taps-r8-int8,taps-r32-int8",
        help=f"TAPS configurations of the sweep, from {list(VARIANTS)}",
    )
    p.add_argument(
        "--lrs",
        type=_floats,
        default=[1e-3, 3e-3],
        help="budget sweep: every method runs at each and keeps its better",
    )
    p.add_argument("--cache", default=None, help="JSON-lines file of finished sweep rows")
    p.add_argument("--lora-ranks", type=_ints, default=[4, 16], help="PEFT LoRA ranks")
    p.add_argument("--max-train", type=int, default=None, help="cap on training samples")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown --variants {unknown}; known: {list(VARIANTS)}")
    if args.fast:
        args.epochs = 1
    return args


TABLE_METHODS = ("linear", "finetune", "lora@r16", "taps (paper)", "taps (default)")


def table_rows(base, name: str, args: argparse.Namespace, cache) -> list[dict]:
    """One task of the table: the feature extractor, full fine-tuning (lr 1e-3 and 3e-3, the
    better one counts), PEFT LoRA rank 16 (lr 3e-3) and TAPS in paper mode (the previous
    default) and with this release's defaults; bytes all in (patch + routing statistics)."""
    from benchmarks._sizes import baseline_row, taps_row

    data = _prepared(base, name, args)
    train = TrainConfig(epochs=args.epochs, batch_size=32, image_size=args.image_size, seed=0)
    at = {lr: TrainConfig.from_dict({**train.to_dict(), "lr": lr}) for lr in (1e-3, 3e-3)}
    tuned = [baseline_row(base, data, "finetune", at[lr], cache) for lr in at]
    rows = [
        baseline_row(base, data, "linear", train, cache),
        max(tuned, key=lambda r: r["accuracy"]),
        baseline_row(base, data, "lora", at[3e-3], cache, rank=16),
        {**taps_row(base, data, "paper", train, cache), "method": "taps (paper)"},
        {**taps_row(base, data, "compact", train, cache), "method": "taps (default)"},
    ]
    return rows


def table_one(base, args: argparse.Namespace) -> None:
    """The paper's Table 1 with bytes: per task and the means."""
    cache = RowCache(args.cache, {"table": "sizes"})  # the rows benchmarks/defaults.py writes
    rows = [r for name in args.tasks for r in table_rows(base, name, args, cache)]
    means = [
        {"task": "MEAN", "method": m,
         **{k: sum(r[k] for r in rows if r["method"] == m) / len(args.tasks)
            for k in ("accuracy", "bytes", "seconds")}}
        for m in TABLE_METHODS
    ]  # fmt: skip
    headers = ["task", "method", "accuracy", "stored (all in)", "patch", "routing", "layers", "lr",
               "time"]  # fmt: skip
    print_table(headers, [
        (r["task"], r["method"], fmt_pct(r["accuracy"]), fmt_bytes(r["bytes"]),
         fmt_bytes(r["patch_bytes"]) if "patch_bytes" in r else "-",
         fmt_bytes(r["route_bytes"]) if "route_bytes" in r else "-", r.get("layers", "-"),
         f"{r['lr']:g}" if "lr" in r else "-", f"{r['seconds']:.0f} s")
        for r in rows + means
    ])  # fmt: skip
    by = {m["method"]: m for m in means}
    for label in ("taps (paper)", "taps (default)"):
        t = by[label]
        print(
            f"{label}: {100 * (t['accuracy'] - by['finetune']['accuracy']):+.2f} points vs the "
            f"better fine-tune, {100 * (t['accuracy'] - by['lora@r16']['accuracy']):+.2f} vs "
            f"LoRA r16, {t['bytes'] / 2**20:.2f} MiB per task all in"
        )
    time_ratio = by["taps (default)"]["seconds"] / by["taps (paper)"]["seconds"]
    print(f"training time, default / paper: {time_ratio:.2f}x")
    save(args, {"args": vars(args), "rows": rows, "means": means, "time_ratio": time_ratio})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    base = load_base("efficientnet_lite0")
    if args.budgets:
        budget_sweep(base, args)
    else:
        table_one(base, args)


if __name__ == "__main__":
    main()
