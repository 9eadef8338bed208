"""How a task's head starts and ends (issue 19, item 1): TAPSConfig.head_init x head_refit.

On the real ImageNet-pretrained EfficientNet-Lite0, per task of the transfer suite (Fashion-MNIST,
digits) at 32 px, short and long runs (``--max-trains``: training images per task, ``--epochs``):

- ``probe``: the closed-form ridge head on the frozen base features, nothing trained (the
  start of ``head_init="ridge"``);
- ``random`` / ``ridge`` head at the start, each with and without the closed-form refit on the
  trained features after the last step. Accuracy is the stored form's, on the test split.

With ``--cache FILE`` (JSON lines) finished rows are kept, so an interrupted run resumes.

    python benchmarks/head_init.py                 # writes benchmarks/results/head_init.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks.harness import RESULTS, parser, print_table, save
from benchmarks.transfer import RowCache, _prepared, _taps_row
from taps_cl.bases import load_base
from taps_cl.cli.tables import fmt_pct
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.taps.model import TAPSModel
from taps_cl.training import evaluate
from taps_cl.training.heads import fit_heads

VARIANTS = {  # label -> (head_init, head_refit)
    "random": ("random", False),
    "random+refit": ("random", True),
    "ridge": ("ridge", False),
    "ridge+refit": ("ridge", True),
}


def probe_row(base, data, train: TrainConfig) -> dict:
    """The ridge probe alone: a fresh task's head set in closed form, nothing trained."""
    spec, train_ds, test_ds = data
    model = TAPSModel(copy.deepcopy(base.module), TAPSConfig())
    model.add_task("t", spec.num_classes, seed=0)
    start = time.perf_counter()
    fit_heads(model, {"t": train_ds}, train)
    acc = evaluate(model, "t", test_ds, train)["accuracy"]
    return {"accuracy": acc, "seconds": time.perf_counter() - start, "layers": "-"}


def run(base, args: argparse.Namespace, cache: RowCache) -> list[dict]:
    rows = []
    for name in args.tasks:
        for max_train in args.max_trains:
            ns = argparse.Namespace(fast=False, max_train=max_train, image_size=args.image_size)
            data = _prepared(base, name, ns)
            n = len(data[1].dataset)
            for epochs in args.epochs:
                train = TrainConfig(epochs=epochs, image_size=args.image_size, seed=0)
                where = {"task": name, "train": n, "epochs": epochs}
                key = f"{name}/{max_train}/{epochs}"
                if epochs == args.epochs[0]:
                    row = cache.get(f"{name}/{max_train}/probe",
                                    lambda d=data, t=train: probe_row(base, d, t))  # fmt: skip
                    rows.append({**where, "epochs": 0, "variant": "probe", **row})
                for label, (init, refit) in VARIANTS.items():
                    taps = TAPSConfig(head_init=init, head_refit=refit)

                    def make(t=taps, d=data, c=train) -> dict:
                        r = _taps_row(base, "t", d[0], d[1], d[2], c, t, "taps")
                        return {k: r[k] for k in ("accuracy", "seconds", "layers")}

                    rows.append({**where, "variant": label, **cache.get(f"{key}/{label}", make)})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__, out=RESULTS / "head_init.json")
    p.add_argument("--tasks", nargs="+", default=["fashion_mnist", "digits"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=lambda s: [int(t) for t in s.split(",")], default=[1, 3])
    p.add_argument(
        "--max-trains",
        type=lambda s: [None if t == "none" else int(t) for t in s.split(",")],
        default=[96, None],
        help="training images per task: 96 = the short regime, none = the transfer caps",
    )
    p.add_argument("--cache", default=None, help="JSON-lines file of finished rows (resume)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    base = load_base("efficientnet_lite0")
    signature = {"image_size": args.image_size, "train": TrainConfig().to_dict(),
                 "taps": TAPSConfig().to_dict()}  # fmt: skip
    rows = run(base, args, RowCache(args.cache, signature))
    print_table(["task", "train", "epochs", "variant", "accuracy", "layers", "time"], [
        (r["task"], r["train"], r["epochs"], r["variant"], fmt_pct(r["accuracy"]), r["layers"],
         f"{r['seconds']:.0f} s")
        for r in rows
    ])  # fmt: skip
    means = summary(rows)
    print("\nmean accuracy over the trained runs:", {k: round(v, 4) for k, v in means.items()})
    save(args, {"args": vars(args), "rows": rows, "mean_accuracy": means})


def summary(rows: list[dict]) -> dict[str, float]:
    """Each variant's mean accuracy over every (task, size, epochs) run, the probe's over the
    trained runs' settings (so the two compare)."""
    out: dict[str, float] = {}
    for label in ["probe", *VARIANTS]:
        if label == "probe":
            probes = {(r["task"], r["train"]): r["accuracy"] for r in rows if r["variant"] == label}
            accs = [probes[(r["task"], r["train"])] for r in rows if r["variant"] == "random"]
        else:
            accs = [r["accuracy"] for r in rows if r["variant"] == label]
        out[label] = sum(accs) / len(accs) if accs else float("nan")
    return out


if __name__ == "__main__":
    main()
