"""Task-free routing on real data: which task does each test image belong to?

Trains Fashion-MNIST, digits and LFW faces as three TAPS tasks on the real ImageNet-pretrained
EfficientNet-Lite0 (offline), small caps, then routes every task's test images among the three
and reports task-identification accuracy (and end-to-end class accuracy: right task AND right
class) of lda / ncm / energy / combined, and the time of ``Engine.route`` against a single-task
``Engine.predict`` on the same 32-image batch. Writes ``benchmarks/results/routing.json``.

    python benchmarks/routing.py                     # the documented run (~3-5 min on 2 cores)
    python benchmarks/routing.py --sizes 48,48,64    # tasks trained at different input sizes
    python benchmarks/routing.py --suite split       # harder: Fashion-MNIST split in 2 tasks

Each run is stored in the JSON under its label (suite and sizes).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks.harness import RESULTS, median_seconds, parser, print_table, save
from taps_cl.cli.tables import fmt_pct
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.engine import Engine
from taps_cl.routing import METHODS
from taps_cl.scenarios import get_task, split_fashion_mnist

TASKS = ("fashion_mnist", "digits", "lfw_faces")
CAPS = {"fashion_mnist": (600, 300), "digits": (600, 300), "lfw_faces": (None, None)}


def suite(name: str) -> dict:
    if name == "split":  # same domain: clothes 0-4 vs clothes 5-9, only the base tells them apart
        return {s.name: s for s in split_fashion_mnist(2, max_train=500, max_test=300)}
    return {n: get_task(n, max_train=CAPS[n][0], max_test=CAPS[n][1]) for n in TASKS}


def train(engine: Engine, specs: dict, sizes: list[int], args: argparse.Namespace) -> dict:
    for (name, spec), size in zip(specs.items(), sizes, strict=True):
        cfg = TrainConfig(epochs=args.epochs, image_size=size, lr=args.lr, seed=0)
        start = time.perf_counter()
        rec = engine.add_task(
            spec.train, name=name, class_names=spec.class_names, train=cfg, quiet=True
        )
        print(f"trained {name} at {size}px in {time.perf_counter() - start:.0f}s "
              f"({rec.layers_adapted} layers)")  # fmt: skip
    return specs


def identify(engine: Engine, specs: dict) -> dict:
    out = {}
    for method in METHODS:
        right = correct = total = 0
        per_task = {}
        start = time.perf_counter()
        for name, spec in specs.items():
            x, y = spec.test.tensors
            routed = engine.route(x, method=method)
            hit = torch.tensor([t == name for t in routed.tasks])
            per_task[name] = float(hit.float().mean())
            right += int(hit.sum())
            correct += int((hit & (routed.labels == y)).sum())
            total += len(y)
        out[method] = {
            "task_accuracy": right / total,
            "end_to_end_accuracy": correct / total,
            "per_task": per_task,
            "seconds": time.perf_counter() - start,
        }
    return out


def timing(engine: Engine, specs: dict, repeats: int) -> dict:
    # a mixed batch (images of every task in turn, each at its native size)
    per = -(-32 // len(specs))
    x = [img for s in specs.values() for img in s.test.tensors[0][:per]][:32]
    first = next(iter(specs))
    engine.route(x), engine.predict(first, x)  # warm: router built, patches loaded
    predict = median_seconds(lambda: engine.predict(first, x), repeats)
    out = {"batch": len(x), "predict_seconds": predict}
    for method in METHODS:
        route = median_seconds(lambda m=method: engine.route(x, method=m), repeats)
        out[f"route_{method}_seconds"] = route
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out=RESULTS / "routing.json")
    p.add_argument("--suite", default="offline", choices=["offline", "split"])
    p.add_argument("--sizes", default=None, help="train size per task, e.g. 48,48,64 (def. 48)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    specs = suite(args.suite)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [48] * len(specs)
    engine = Engine("efficientnet_lite0", store="sqlite://", config=TAPSConfig(), device="cpu")
    start = time.perf_counter()
    train(engine, specs, sizes, args)
    results = {
        "setup": {"tasks": list(specs), "sizes": sizes, "epochs": args.epochs,
                  "test_sizes": {n: len(s.test) for n, s in specs.items()},
                  "threads": torch.get_num_threads(), "machine": platform.processor()},
        "train_seconds": time.perf_counter() - start,
        "methods": identify(engine, specs),
        "timing": timing(engine, specs, args.repeats),
    }  # fmt: skip
    rows = [
        (m, fmt_pct(r["task_accuracy"]), fmt_pct(r["end_to_end_accuracy"]),
         *(fmt_pct(r["per_task"][n]) for n in specs),
         f"{results['timing'][f'route_{m}_seconds'] * 1e3:.0f} ms")
        for m, r in results["methods"].items()
    ]  # fmt: skip
    print_table(["method", "task id", "end-to-end", *specs, "route 32 imgs"], rows)
    print(f"predict (one task, 32 imgs): {results['timing']['predict_seconds'] * 1e3:.0f} ms")
    label = f"{args.suite}_" + "_".join(map(str, sizes))
    print(f"wrote {save(args, {label: results}, merge=True)} [{label}]")


if __name__ == "__main__":
    main()
