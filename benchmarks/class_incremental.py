"""Class-incremental (task-free) TAPS against Avalanche's strategies and training-free heads,
one global label space.

Streams (``--scenarios``; task label 0 everywhere, global class ids; ``--generator avalanche``
builds the same data with Avalanche's ``nc_benchmark`` instead of taps_cl.scenarios):
``split_fmnist`` (Fashion-MNIST 5 x 2), ``split_fmnist10`` (10 x 1), ``split_digits`` (digits
5 x 2), ``split_digits10`` (10 x 1) and ``multi_domain`` (Fashion-MNIST 0-9, digits 10-19,
faces 20-21). Every method gets a copy of the same base (EfficientNet-Lite0, ImageNet weights,
offline), resolution, epochs, minibatch size and lr; Avalanche strategies are evaluated on the
WHOLE test stream after each experience.

- ``taps``: task-free TAPS, one patch per experience, routed on base features (``route_method``).
- ``naive``, ``ewc``, ``lwf``, ``replay`` (200 exemplars), ``cumulative`` (upper bound): one
  ``nn.Linear`` head over all classes on the base's (fine-tuned) features.
- ``ncm``: class means of the frozen base's features, cosine (nothing trained).
- ``ranpac``: RanPAC-style head, random ReLU projection (M = 2000) of the frozen features and
  ridge over all classes seen from the accumulated Gram, lambda from training data (nothing
  trained).
- ``joint``: upper bound, TAPS with every experience's task trained together and each test
  sample answered by its true task's patch (oracle task id).

Reported per stream and method: final accuracy, forgetting, task identification (TAPS routed;
RanPAC and NCM: the task owning their best class), within-task accuracy with the true task
given (TAPS; and a closed-form ridge head on base features, for reference), ECE (15 bins) of
TAPS's routed confidence, bytes per task, and the issue-19 targets met or missed.

    python benchmarks/class_incremental.py --fast --out /tmp/ci_fast.json   # ~5 min, idle
    python benchmarks/class_incremental.py                                  # ~25 min, idle
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/class_incremental.py --fast \
        --out /tmp/ci.json --experiment taps-ci           # one MLflow run per strategy
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

# isort: split
from benchmarks._ci_baselines import frozen_features, ridge_within_task, run_ncm, run_ranpac
from benchmarks._ci_report import print_cost, print_results, print_targets, targets
from benchmarks._ci_streams import GENERATORS, STREAMS, batches, make_stream, num_classes
from benchmarks._ci_taps import run_joint, taps_report
from benchmarks.harness import RESULTS, log_strategies, median_seconds, write_json
from taps_cl.bases import load_base
from taps_cl.config import TAPSConfig
from taps_cl.routing import TaskRouter
from taps_cl.scenarios.streams import class_incremental_from_suite
from taps_cl.scenarios.suite import digits, split_fashion_mnist
from taps_cl.strategies import TAPS
from taps_cl.strategies.classinc import ClassIncremental
from taps_cl.strategies.multihead import split_head

STRATEGIES = ("taps", "naive", "ewc", "lwf", "replay", "cumulative", "ncm", "ranpac", "joint")
FAST_STRATEGIES = ("taps", "cumulative", "ncm", "ranpac", "joint")  # what the targets need
SCENARIOS = tuple(STREAMS)
FULL_STRATEGIES = ("taps", "replay", "cumulative", "ncm", "ranpac", "joint")  # naive/ewc/lwf: ask
SETTINGS = {
    # caps per experience (multi_domain: per dataset), input side, epochs, default strategies
    "fast": dict(max_train=48, max_test=20, image_size=32, epochs=1,
                 strategies=",".join(FAST_STRATEGIES)),
    "full": dict(max_train=100, max_test=50, image_size=32, epochs=3,
                 strategies=",".join(FULL_STRATEGIES)),
}  # fmt: skip
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
    within_task_accuracy: float | None = None  # the true task given
    ece: float | None = None  # of the routed confidence, end to end
    task_id_ece: float | None = None  # of the router's task probability
    extra: dict[str, Any] = field(default_factory=dict)


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
    # TAPS drops a last minibatch of one itself; the others need it too (train-mode BatchNorm)
    kw = {} if name == "taps" else {"drop_last": True}
    for exp in bench.train_stream:
        strategy.train(exp, **kw)
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
        for key, value in taps_report(strategy, bench).items():
            setattr(result, key, value)
        result.bytes_per_task = taps_bytes(strategy)
    return result


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


def run_stream(base: Any, bench: Any, args: argparse.Namespace) -> list[Result]:
    """Every chosen method on one stream; the frozen features are computed once for all the
    training-free heads."""
    names = args.strategies.split(",")
    frozen = frozen_features(base.module, bench) if {"ncm", "ranpac", "taps"} & set(names) else None
    results = []
    for name in names:
        if name in ("ncm", "ranpac"):
            out = (run_ncm if name == "ncm" else run_ranpac)(frozen)
            result = Result(scenario=args.scenario, **_known(out))
        elif name == "joint":
            result = Result(scenario=args.scenario, **_known(run_joint(base.module, bench, args)))
        else:
            result = run_avalanche(name, base.module, bench, args)
        if name == "taps":
            result.extra["ridge_within_task_accuracy"] = ridge_within_task(frozen)
        results.append(result)
        print(f"  {name}: acc {result.final_avg_accuracy:.4f} in {result.wall_time_s:.0f}s",
              flush=True)  # fmt: skip
    return results


def _known(out: dict[str, Any]) -> dict[str, Any]:
    """A baseline's result dict as ``Result`` fields; the rest goes to ``extra``."""
    fields = set(Result.__dataclass_fields__)
    extra = {k: v for k, v in out.items() if k not in fields}
    out = {k: v for k, v in out.items() if k in fields}
    out.setdefault("wall_time_s", 0.0)
    return {**out, "extra": extra}


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
    for key in ("task_id_accuracy", "within_task_accuracy", "ece", "task_id_ece"):
        if getattr(r, key) is not None:
            summary[key] = getattr(r, key)
    if r.bytes_per_task:
        summary["stored_bytes_per_task"] = r.bytes_per_task["total"]
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = strategy_parser(
        __doc__, STRATEGIES, out=None, experiment_help="MLflow experiment prefix (logs if given)",
        fast_help="smaller caps, 32 px, 1 epoch, the strategies the targets need (~5 min)",
        mem_size=200,
    )  # fmt: skip
    p.set_defaults(strategies=None)  # from the preset
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument(
        "--generator",
        default="taps_cl",
        choices=GENERATORS,
        help="build the streams with taps_cl.scenarios or Avalanche's nc_benchmark",
    )
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    base = load_base("efficientnet_lite0")
    results: list[Result] = []
    for scenario in args.scenarios.split(","):
        args.scenario = scenario
        bench = make_stream(scenario, base.preprocessing, args)
        print(f"{scenario}: {len(bench.train_stream)} experiences, {num_classes(bench)} classes")
        results += run_stream(base, bench, args)
    cost = None if args.no_cost or "taps" not in args.strategies else routing_cost(base, args)
    print_results(results)
    met = targets(results)
    print_targets(met)
    if cost:
        print_cost(cost, ROUTING_TASKS)
    params = {k: v for k, v in vars(args).items() if k != "scenario"}
    payload = {"settings": params, "results": [asdict(r) for r in results],
               "targets": met, "routing_cost": cost}  # fmt: skip
    write_json(args.out, payload)
    if args.experiment:
        log_results(results, args.experiment, params)
    return payload


if __name__ == "__main__":
    main()
