"""The router alone at scale, in memory: build, add one task, remove one, score, size.

``python -m benchmarks.router_micro [--tasks 1000] [--dim 1280] [--rank 32] [--threads 1 2]``

Random compact statistics (``C`` = 10 classes per task, float16 means and rank-``k`` basis, as
stored), no store and no model, so it runs in about a minute: the quick check of the router's
part of ``benchmarks/scale.py`` (``router_costs``). Timings are the best of ``--repeats`` runs
(the machine is shared). Also checks a stale derived router against one rebuilt from scratch:
task agreement and the largest class-score difference on features drawn from the classes.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from taps_cl.routing import RouteStats, TaskRouter


def random_stats(tasks: int, dim: int, rank: int, classes: int = 10, seed: int = 0) -> dict:
    """``{name: RouteStats}`` of compact form with a shared feature scale, like real tasks."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in range(tasks):
        mean = (0.1 * torch.randn(classes, dim, generator=g) + 0.5).to(torch.float16)
        basis = torch.randn(rank, dim, generator=g).to(torch.float16)
        diag = torch.rand(dim, generator=g) * 50 + 10
        count = torch.full((classes,), 50, dtype=torch.int64)
        out[f"t{t:04d}"] = RouteStats(count, mean, None, None, basis, diag)
    return out


def features(stats: dict, names: list[str], per_task: int, seed: int = 1) -> torch.Tensor:
    """Samples of ``names``' classes whose covariance is the statistics' own
    (``(U' g + sqrt(r) e) / sqrt(N - C)`` around a class mean)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for name in names:
        s = stats[name]
        c = torch.randint(0, s.mean.shape[0], (per_task,), generator=g)
        coef = torch.randn(per_task, s.basis.shape[0], generator=g)
        noise = coef @ s.basis.float() + torch.randn(per_task, s.dim, generator=g) * s.diag.sqrt()
        rows.append(s.mean.float()[c] + noise / (s.total - s.seen_classes) ** 0.5)
    return torch.cat(rows).double()


def best(fn, repeats: int) -> tuple[object, float]:
    out, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def measure(stats: dict, extra: dict, z: torch.Tensor, repeats: int) -> dict:
    """Milliseconds of build (+ first route), add one (derive + first route, stale and exact),
    remove one, a warm route of ``z``, and the router's bytes."""
    router, build = best(lambda: _ready(TaskRouter(stats), z), repeats)
    _, add = best(lambda: _ready(router.derive(extra), z), repeats)
    try:
        _, exact = best(lambda: _ready(router.derive(extra, exact=True), z), repeats)
    except TypeError:  # a release before stale derives (for comparison runs)
        exact = float("nan")
    _, remove = best(lambda: _ready(router.derive(remove=[router.tasks[7]]), z), repeats)
    _, scores = best(lambda: router.route(z), repeats)
    return {
        "build_ms": 1e3 * build,
        "add_one_ms": 1e3 * add,
        "add_one_exact_ms": 1e3 * exact,
        "remove_one_ms": 1e3 * remove,
        "route64_ms": 1e3 * scores,
        "router_mb": router.nbytes / 1e6,
    }


def _ready(router: TaskRouter, z: torch.Tensor) -> TaskRouter:
    router.route(z)
    return router


def stale_quality(stats: dict, adds: int, dim: int, rank: int) -> dict:
    """Add ``adds`` tasks one by one (stale derives) and compare with a rebuilt router."""
    new = random_stats(adds, dim, rank, seed=99)
    new = {f"new{k}": v for k, v in new.items()}
    router = TaskRouter(stats)
    z = features({**stats, **new}, list(new) + list(stats)[:20], 20)
    router.route(z)
    for name, value in new.items():
        router = router.derive({name: value})
    fresh = TaskRouter({**stats, **new})
    a, b = router.route(z), fresh.route(z)
    diff = (router.class_scores(z) - fresh.class_scores(z)).abs().max()
    return {
        "stale_adds": adds,
        "task_agreement": float((a.task_index == b.task_index).double().mean()),
        "max_class_score_diff": float(diff),
        "max_class_score": float(fresh.class_scores(z).abs().max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    stats = random_stats(args.tasks + 1, args.dim, args.rank)
    extra_name = max(stats)
    extra = {extra_name: stats.pop(extra_name)}
    z = features(stats, list(stats)[:8], 8)  # a batch of 64 from 8 tasks
    out = {"tasks": args.tasks, "dim": args.dim, "rank": args.rank}
    for threads in args.threads:
        torch.set_num_threads(threads)
        out[f"threads{threads}"] = measure(stats, extra, z, args.repeats)
    out["quality"] = stale_quality(stats, 10, args.dim, args.rank)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
