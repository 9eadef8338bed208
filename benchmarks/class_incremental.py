"""Class-incremental (task-free) TAPS against Avalanche's strategies, one global label space.

Streams from the offline suite (task label 0 everywhere, global class ids):
``split_fmnist`` (Split Fashion-MNIST, 5 experiences x 2 classes) and ``multi_domain``
(Fashion-MNIST 0-9, digits 10-19, faces 20-21). Every strategy gets a copy of the same base
(EfficientNet-Lite0, ImageNet weights, offline), resolution, epochs, minibatch size and lr, and
is evaluated on the WHOLE test stream after each experience (Avalanche metrics).

- TAPS task-free: one patch per experience, routed by LDA on base features (``route_method``).
- Naive, EWC, LwF, Replay (200 exemplars), Cumulative (upper bound): a single ``nn.Linear``
  head over all classes on the base's (fine-tuned) features.
- NCM: class means of the frozen base's features, cosine similarity (no training).

Reported: final average accuracy (stream accuracy after the last experience), average
forgetting (Avalanche's stream forgetting; NCM from its accuracy matrix), TAPS's
task-identification accuracy, stored bytes per task (TAPS patch + route statistics), and the
routing cost: a TAPS evaluation forward over one batch vs a single-task forward on the same
batch, with 2, 5 and 10 trained tasks.

    python benchmarks/class_incremental.py --fast        # ~3 min on 2 cores
    python benchmarks/class_incremental.py               # ~10 min
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/class_incremental.py --fast \
        --experiment taps-ci                              # one MLflow run per strategy
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks._strategies import (  # first: it quiets avalanche's imports
    evaluator,
    parse_with_presets,
    strategy_kwargs,
    strategy_parser,
)
from benchmarks.harness import (
    RESULTS,
    log_strategies,
    median_seconds,
    print_table,
    write_json,
)
from taps_cl.bases import load_base
from taps_cl.config import TAPSConfig
from taps_cl.routing import TaskRouter
from taps_cl.scenarios.streams import (
    class_incremental_from_suite,
    multi_domain_ci,
    split_fashion_mnist_ci,
)
from taps_cl.scenarios.suite import digits, split_fashion_mnist
from taps_cl.strategies import TAPS
from taps_cl.strategies.classinc import ClassIncremental
from taps_cl.strategies.multihead import split_head

STRATEGIES = ("taps", "naive", "ewc", "lwf", "replay", "cumulative", "ncm")
SCENARIOS = ("split_fmnist", "multi_domain")
SETTINGS = {
    # caps per experience (split_fmnist) or per dataset (multi_domain), input side, epochs
    "fast": dict(max_train=96, max_test=60, image_size=32, epochs=1),
    "full": dict(max_train=300, max_test=200, image_size=48, epochs=2),
}
ROUTING_TASKS = (2, 5, 10)


@dataclass
class Result:
    scenario: str
    strategy: str
    final_avg_accuracy: float
    avg_forgetting: float
    wall_time_s: float
    accuracy_matrix: list[list[float]]
    task_id_accuracy: float | None = None
    bytes_per_task: dict[str, float] = field(default_factory=dict)


# -- models and strategies -----------------------------------------------------------------------


class SingleHead(nn.Module):
    """The base's features and one linear head over every global class."""

    def __init__(self, base: nn.Module, num_classes: int, seed: int) -> None:
        super().__init__()
        self.features, dim = split_head(base)
        self.features.requires_grad_(True)
        torch.manual_seed(seed)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(name: str, base: nn.Module, num_classes: int, args: argparse.Namespace) -> Any:
    from avalanche.training import EWC, LwF, Naive, Replay  # after _strategies quieted avalanche
    from avalanche.training.supervised import Cumulative

    common = strategy_kwargs(args, evaluator(), "cpu")
    if name == "taps":
        config = TAPSConfig(lam=args.lam, warmup_epochs=args.warmup_epochs)
        return TAPS(
            model=copy.deepcopy(base), lr=args.lr, config=config, mode="class",
            route_method=args.route_method, **common,
        )  # fmt: skip
    model = SingleHead(base, num_classes, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    common.update(
        model=model,
        optimizer=torch.optim.Adam(params, lr=args.lr),
        criterion=nn.CrossEntropyLoss(),
    )
    makers = {
        "naive": lambda: Naive(**common),
        "ewc": lambda: EWC(ewc_lambda=100.0, **common),
        "lwf": lambda: LwF(alpha=1.0, temperature=2.0, **common),
        "replay": lambda: Replay(mem_size=args.mem_size, **common),
        "cumulative": lambda: Cumulative(**common),
    }
    return makers[name]()


# -- running -------------------------------------------------------------------------------------


def _acc_key(j: int) -> str:
    return f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"


def run_avalanche(name: str, base: nn.Module, bench: Any, args: argparse.Namespace) -> Result:
    torch.manual_seed(args.seed)
    strategy = build(name, base, num_classes(bench), args)
    n = len(bench.train_stream)
    matrix, start = [], time.perf_counter()
    for exp in bench.train_stream:
        strategy.train(exp)
        metrics = strategy.eval(bench.test_stream)
        matrix.append([float(metrics[_acc_key(j)]) for j in range(n)])
    wall = time.perf_counter() - start
    result = Result(
        scenario=args.scenario,
        strategy=name,
        final_avg_accuracy=float(metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"]),
        avg_forgetting=float(metrics.get("StreamForgetting/eval_phase/test_stream", 0.0)),
        wall_time_s=wall,
        accuracy_matrix=matrix,
    )
    if name == "taps":
        result.task_id_accuracy = task_id_accuracy(strategy, bench)
        result.bytes_per_task = taps_bytes(strategy)
    return result


def num_classes(bench: Any) -> int:
    return 1 + max(int(c) for e in bench.train_stream for c in e.classes_in_this_experience)


def batches(dataset: Any, size: int = 128):
    loader = torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False)
    for x, y, *_ in loader:
        yield x, y


@torch.no_grad()
def task_id_accuracy(strategy: TAPS, bench: Any) -> float:
    """Fraction of test inputs routed to the task trained on their experience."""
    ci, taps = strategy.router.classinc, strategy.taps_model
    taps.eval()
    right = total = 0
    for j, exp in enumerate(bench.test_stream):
        for x, _ in batches(exp.dataset):
            names = ci.route(taps, x).task_names
            right += sum(n == f"exp{j}" for n in names)
            total += len(names)
    return right / total


def taps_bytes(strategy: TAPS) -> dict[str, float]:
    patches = list(strategy.patches.values())
    route = [sum(t.nbytes for k, t in p.tensors.items() if k.startswith("route.")) for p in patches]
    total = [p.nbytes for p in patches]
    k = len(patches)
    return {
        "patch": (sum(total) - sum(route)) / k,
        "route_stats": sum(route) / k,
        "total": sum(total) / k,
    }


@torch.no_grad()
def run_ncm(base: nn.Module, bench: Any, args: argparse.Namespace) -> Result:
    """Nearest class mean (cosine) on frozen base features; the means grow per experience."""
    features, _ = split_head(base)
    features.eval()

    def embed(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        zs, ys = zip(*((features(x), y) for x, y in batches(dataset)), strict=True)
        return nn.functional.normalize(torch.cat(zs), dim=1), torch.cat(ys)

    start = time.perf_counter()
    tests = [embed(e.dataset) for e in bench.test_stream]
    means: dict[int, torch.Tensor] = {}
    matrix = []
    for exp in bench.train_stream:
        z, y = embed(exp.dataset)
        for c in y.unique().tolist():
            means[c] = z[y == c].mean(0)
        ids = torch.tensor(sorted(means))
        table = nn.functional.normalize(torch.stack([means[c] for c in ids.tolist()]), dim=1)
        matrix.append(
            [float((ids[(zt @ table.T).argmax(1)] == yt).float().mean()) for zt, yt in tests]
        )
    sizes = [len(e.dataset) for e in bench.test_stream]
    final = sum(a * s for a, s in zip(matrix[-1], sizes, strict=True)) / sum(sizes)
    n = len(matrix)
    drops = [max(matrix[i][j] for i in range(j, n - 1)) - matrix[-1][j] for j in range(n - 1)]
    return Result(
        scenario=args.scenario,
        strategy="ncm",
        final_avg_accuracy=final,
        avg_forgetting=sum(drops) / len(drops) if drops else 0.0,
        wall_time_s=time.perf_counter() - start,
        accuracy_matrix=matrix,
    )


# -- routing cost --------------------------------------------------------------------------------


def routing_cost(base: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per batch of a routed TAPS forward vs one task's forward, for 2/5/10 tasks
    trained cheaply on a 10-experience stream (Fashion-MNIST then digits, 2 classes each)."""
    suite = split_fashion_mnist(5, max_train=24, max_test=16, seed=args.seed)
    suite += [digits(max_train=120, max_test=80, seed=args.seed)]
    bench = class_incremental_from_suite(suite, base.preprocessing, args.image_size, 2)
    quick = argparse.Namespace(**{**vars(args), "epochs": 1})
    strategy = build("taps", base.module, num_classes(bench), quick)
    for exp in bench.train_stream:
        strategy.train(exp)
    full, taps = strategy.router.classinc, strategy.taps_model
    taps.eval()
    with torch.no_grad():
        return _time_routing(full, taps, bench, args)


def _time_routing(full: ClassIncremental, taps: Any, bench: Any, args: argparse.Namespace):
    xs = [x for e in bench.test_stream for x, _ in batches(e.dataset, 8)]
    out: dict[str, Any] = {"batch_size": args.cost_batch}
    for k in ROUTING_TASKS:
        names = [f"exp{i}" for i in range(k)]
        ci = ClassIncremental(full.method)
        ci.router = TaskRouter({n: full.router.stats(n) for n in names})
        ci.classes = {n: full.classes[n] for n in names}
        ci.width = full.width
        x = torch.cat(xs[: 2 * k])  # inputs of the first k experiences
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))][: args.cost_batch]
        routed = median_seconds(lambda x=x, ci=ci: ci.forward(taps, x, None), args.repeats,
                                warmup=1)  # fmt: skip
        single = median_seconds(lambda x=x: taps(x, task="exp0"), args.repeats, warmup=1)
        out[str(k)] = {"routed_s": routed, "single_s": single, "ratio": routed / single}
    return out


# -- output --------------------------------------------------------------------------------------


def print_results(results: list[Result]) -> None:
    headers = ["scenario", "strategy", "final acc", "forgetting", "task id", "MB/task", "time s"]
    print_table(headers, [
        (r.scenario, r.strategy, f"{r.final_avg_accuracy:.4f}", f"{r.avg_forgetting:.4f}",
         None if r.task_id_accuracy is None else f"{r.task_id_accuracy:.4f}",
         f"{r.bytes_per_task['total'] / 1e6:.2f}" if r.bytes_per_task else None,
         f"{r.wall_time_s:.1f}")
        for r in results
    ])  # fmt: skip


def log_results(results: list[Result], experiment: str, params: dict[str, Any]) -> None:
    """One MLflow run per strategy, one experiment per scenario (``<experiment>-<scenario>``)."""
    for scenario in dict.fromkeys(r.scenario for r in results):
        runs = [(r.strategy, _summary(r), r.accuracy_matrix) for r in results
                if r.scenario == scenario]  # fmt: skip
        log_strategies(f"{experiment}-{scenario}", runs, params)


def _summary(r: Result) -> dict[str, float]:
    summary = {
        "final_avg_accuracy": r.final_avg_accuracy,
        "avg_forgetting": r.avg_forgetting,
        "wall_time_s": r.wall_time_s,
    }
    if r.task_id_accuracy is not None:
        summary["task_id_accuracy"] = r.task_id_accuracy
        summary["stored_bytes_per_task"] = r.bytes_per_task["total"]
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = strategy_parser(
        __doc__, STRATEGIES, out=None, experiment_help="MLflow experiment prefix (logs if given)",
        fast_help="smaller caps, 32 px, 1 epoch (~3 min)", mem_size=200,
    )  # fmt: skip
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--route-method", default="lda", choices=("lda", "ncm", "combined"))
    p.add_argument("--cost-batch", type=int, default=64, help="batch of the routing-cost timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-cost", action="store_true", help="skip the routing-cost timing")
    args = parse_with_presets(p, argv, SETTINGS, STRATEGIES)
    unknown = sorted(set(args.scenarios.split(",")) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {SCENARIOS}")
    if args.out is None:  # default: benchmarks/results/class_incremental[_fast].json
        args.out = str(RESULTS / f"class_incremental{'_fast' if args.fast else ''}.json")
    return args


def make_bench(scenario: str, base: Any, args: argparse.Namespace) -> Any:
    caps = dict(max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    if scenario == "split_fmnist":
        return split_fashion_mnist_ci(base.preprocessing, args.image_size, 5, **caps)
    return multi_domain_ci(base.preprocessing, args.image_size, **caps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    base = load_base("efficientnet_lite0")
    results: list[Result] = []
    for scenario in args.scenarios.split(","):
        args.scenario = scenario
        bench = make_bench(scenario, base, args)
        print(f"{scenario}: {len(bench.train_stream)} experiences, {num_classes(bench)} classes")
        for name in args.strategies.split(","):
            if name == "ncm":
                results.append(run_ncm(base.module, bench, args))
            else:
                results.append(run_avalanche(name, base.module, bench, args))
            r = results[-1]
            print(f"  {name}: acc {r.final_avg_accuracy:.4f} in {r.wall_time_s:.0f}s", flush=True)
    cost = None if args.no_cost else routing_cost(base, args)
    print_results(results)
    if cost:
        for k in ROUTING_TASKS:
            c = cost[str(k)]
            print(f"routing cost, {k} tasks: {c['routed_s'] * 1e3:.1f} ms vs single-task "
                  f"{c['single_s'] * 1e3:.1f} ms = {c['ratio']:.2f}x")  # fmt: skip
    params = {k: v for k, v in vars(args).items() if k != "scenario"}
    payload = {"settings": params, "results": [asdict(r) for r in results], "routing_cost": cost}
    write_json(args.out, payload)
    if args.experiment:
        log_results(results, args.experiment, params)
    return payload


if __name__ == "__main__":
    main()
