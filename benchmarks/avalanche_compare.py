"""TAPS against Avalanche's strategies, task-incremental, on one base and one scenario.

Every strategy gets a fresh deep copy of the same base (EfficientNet-Lite0, ImageNet weights,
offline), the same benchmark, the same epochs, minibatch size and learning rate, and one head per
task (multi-head). After each experience it is evaluated on the experiences seen so far, which
yields the accuracy matrix; Avalanche's metrics give forgetting and BWT.

    python benchmarks/avalanche_compare.py --fast                 # < 5 min on 2 CPU cores
    python benchmarks/avalanche_compare.py --out results.json     # full run, < 30 min
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/avalanche_compare.py --fast \
        --experiment taps-vs-avalanche                             # also one MLflow run each

Columns: final average accuracy (last row of the matrix), average forgetting and BWT
(Avalanche's stream metrics), task-specific parameters per task (TAPS: the patch; baselines:
the head, while the shared trunk keeps changing), bytes stored to serve every task (model or
base + patches, plus a strategy's own memory: EWC importances, replay buffer, cumulative data),
and wall time of the whole train + eval loop.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks._strategies import (  # first: it quiets avalanche's imports
    evaluator,
    parse_with_presets,
    strategy_kwargs,
    strategy_parser,
)
from benchmarks.harness import log_strategies, print_table, write_json
from taps_cl.bases import load_base
from taps_cl.config import TAPSConfig
from taps_cl.scenarios.avalanche import (
    as_avalanche_benchmark,
    task_classes,
    task_label_names,
)
from taps_cl.scenarios.suite import offline_suite, split_fashion_mnist
from taps_cl.strategies import TAPS
from taps_cl.strategies.multihead import BASELINES, build_baseline

STRATEGIES = ("taps", *BASELINES)
SETTINGS = {
    # max_train/max_test per task, input side, epochs per experience
    # two epochs so that PackNet (prune after epoch 1, fine-tune in epoch 2) has the same budget
    "fast": dict(max_train=128, max_test=100, image_size=32, epochs=2),
    "full": dict(max_train=320, max_test=200, image_size=48, epochs=2),
}


@dataclass
class Result:
    strategy: str
    final_avg_accuracy: float
    avg_forgetting: float
    bwt: float
    params_per_task: float
    stored_bytes: int
    wall_time_s: float
    accuracy_matrix: list[list[float | None]]
    metrics: dict[str, float] = field(default_factory=dict)


# -- scenario ------------------------------------------------------------------------------------


def make_suite(name: str, max_train: int, max_test: int, seed: int) -> list[Any]:
    if name == "offline":
        return offline_suite(max_train=max_train, max_test=max_test, seed=seed)
    if name == "split_fmnist":
        return split_fashion_mnist(5, max_train=max_train, max_test=max_test, seed=seed)
    raise ValueError(f"unknown scenario {name!r}; use 'offline' or 'split_fmnist'")


# -- sizes ---------------------------------------------------------------------------------------


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable through dicts, lists and ``.data`` holders."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    data = getattr(obj, "data", None)  # avalanche ParamData
    return tensor_bytes(data, seen) if isinstance(data, torch.Tensor) else 0


def sample_bytes(dataset: Any) -> int:
    return dataset[0][0].numel() * 4 if len(dataset) else 0


def baseline_sizes(name: str, strategy: Any, bench: Any) -> tuple[float, int]:
    """(task-specific parameters per task, bytes stored to serve every task)."""
    model = strategy.model
    heads = [sum(p.numel() for p in h.parameters()) for h in model.heads.values()]
    stored = tensor_bytes(model.state_dict())
    for plugin in strategy.plugins:
        if hasattr(plugin, "importances"):  # EWC keeps importances and old weights per task
            stored += tensor_bytes(plugin.importances) + tensor_bytes(plugin.saved_params)
        buffer = getattr(getattr(plugin, "storage_policy", None), "buffer", None)
        if buffer is not None:  # replay memory
            stored += len(buffer) * sample_bytes(buffer)
    if name == "cumulative":  # keeps every experience's data to retrain on
        stored += sum(len(e.dataset) * sample_bytes(e.dataset) for e in bench.train_stream)
    return sum(heads) / len(heads), stored


def taps_sizes(strategy: TAPS, base: torch.nn.Module) -> tuple[float, int]:
    """The frozen base once, plus each task's patch."""
    patches = list(strategy.patches.values())
    shared = tensor_bytes(base.state_dict())
    per_task = sum(p.num_parameters for p in patches) / len(patches)
    return per_task, shared + sum(p.nbytes for p in patches)


# -- running -------------------------------------------------------------------------------------


def build(name: str, base: torch.nn.Module, bench: Any, args: argparse.Namespace, names) -> Any:
    common = strategy_kwargs(args, evaluator(bwt=True), args.device)
    if name == "taps":
        # The penalty waits for a warm-up (as in the authors' code): at step 0 every delta is zero,
        # so the task gives the scores no gradient and the penalty alone would close every gate.
        config = TAPSConfig(lam=args.lam, warmup_epochs=args.warmup_epochs)
        return TAPS(
            model=copy.deepcopy(base), lr=args.lr, config=config, task_names=names, **common
        )
    return build_baseline(
        name, base, task_classes(bench), lr=args.lr, mem_size=args.mem_size, **common
    )


def run_one(name: str, base: torch.nn.Module, bench: Any, args: argparse.Namespace) -> Result:
    torch.manual_seed(args.seed)
    strategy = build(name, base, bench, args, task_label_names(args.suite))
    n = len(bench.train_stream)
    matrix: list[list[float | None]] = []
    start = time.perf_counter()
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        metrics = strategy.eval(bench.test_stream[: i + 1])
        row = [metrics.get(_acc_key(j)) for j in range(i + 1)] + [None] * (n - i - 1)
        matrix.append(row)
    wall = time.perf_counter() - start
    if name == "taps":
        per_task, stored = taps_sizes(strategy, base)
    else:
        per_task, stored = baseline_sizes(name, strategy, bench)
    last = [v for v in matrix[-1] if v is not None]
    return Result(
        strategy=name,
        final_avg_accuracy=sum(last) / len(last),
        avg_forgetting=float(metrics.get("StreamForgetting/eval_phase/test_stream", 0.0)),
        bwt=float(metrics.get("StreamBWT/eval_phase/test_stream", 0.0)),
        params_per_task=float(per_task),
        stored_bytes=int(stored),
        wall_time_s=wall,
        accuracy_matrix=matrix,
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
    )


def _acc_key(j: int) -> str:
    return f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"


# -- output --------------------------------------------------------------------------------------


def print_results(results: list[Result]) -> None:
    headers = ["strategy", "final acc", "forgetting", "BWT", "params/task", "stored MB", "time s"]
    print_table(headers, [
        (r.strategy, f"{r.final_avg_accuracy:.4f}", f"{r.avg_forgetting:.4f}", f"{r.bwt:.4f}",
         f"{r.params_per_task:,.0f}", f"{r.stored_bytes / 1e6:.2f}", f"{r.wall_time_s:.1f}")
        for r in results
    ])  # fmt: skip


def log_results(results: list[Result], experiment: str, params: dict[str, Any]) -> None:
    """MLflow hook: one run per strategy in ``experiment`` (URI from ``MLFLOW_TRACKING_URI``)."""
    skip = ("accuracy_matrix", "metrics")
    runs = [(r.strategy, {k: v for k, v in asdict(r).items() if k not in skip},
             r.accuracy_matrix) for r in results]  # fmt: skip
    log_strategies(experiment, runs, params)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = strategy_parser(
        __doc__, STRATEGIES, out=None, experiment_help="MLflow experiment (logs when given)",
        fast_help="small subsets, 32 px, 2 epochs (< 5 min)", mem_size=100,
    )  # fmt: skip
    p.add_argument("--scenario", default="offline", choices=("offline", "split_fmnist"))
    p.add_argument("--device", default="cpu")
    return parse_with_presets(p, argv, SETTINGS, STRATEGIES)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_base("efficientnet_lite0")
    args.suite = make_suite(args.scenario, args.max_train, args.max_test, args.seed)
    bench = as_avalanche_benchmark(args.suite, base.preprocessing, args.image_size)
    print(
        f"scenario {args.scenario}: {[s.name for s in args.suite]}, {args.max_train}/"
        f"{args.max_test} per task, {args.image_size} px, {args.epochs} epoch(s), base {base.name}"
    )
    results = []
    for name in args.strategies.split(","):
        results.append(run_one(name, base.module, bench, args))
        print(f"  {name}: {results[-1].final_avg_accuracy:.4f} in {results[-1].wall_time_s:.0f}s")
    print_results(results)
    params = {k: v for k, v in vars(args).items() if k != "suite"}
    if args.out:
        payload = {"settings": params, "results": [asdict(r) for r in results]}
        write_json(args.out, payload)
    if args.experiment:
        log_results(results, args.experiment, params)
    return results


if __name__ == "__main__":
    main()
