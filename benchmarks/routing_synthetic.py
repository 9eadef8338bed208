"""Task-routing accuracy of TaskRouter's methods on synthetic Gaussian features.

Each task has its own classes (Gaussian, shared covariance); a "patch" is simulated by the
task's own LDA head, fitted on that task's data only (as a real patch never sees other tasks),
and calibrated on its own training data. Settings:

- ``isotropic``: well separated class means, identity covariance (every method should win)
- ``anisotropic``: a few high-variance nuisance directions shared by every task (cosine fails)
- ``overlapping``: means close together, d large relative to samples (shrinkage matters)

Run: ``python benchmarks/routing_synthetic.py`` (a few seconds on CPU); prints a table and writes
``benchmarks/results/routing_synthetic.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from benchmarks.harness import RESULTS, parser, print_table, save
from taps_cl.routing import (
    CalibrationAccumulator,
    RouteStats,
    RouteStatsAccumulator,
    TaskRouter,
)

SETTINGS = {
    "isotropic": dict(tasks=5, classes=10, dim=64, n=200, spread=1.0, nuisance=0, noise=1.0),
    "anisotropic": dict(tasks=5, classes=10, dim=64, n=200, spread=0.5, nuisance=8, noise=0.3),
    "overlapping": dict(tasks=8, classes=5, dim=256, n=100, spread=0.25, nuisance=0, noise=1.0),
}


def make_setting(cfg: dict, seed: int = 0) -> tuple[list, list]:
    """(train, test): per task (features float64 [n, d], labels [n])."""
    g = torch.Generator().manual_seed(seed)
    d = cfg["dim"]
    scale = torch.full((d,), cfg["noise"], dtype=torch.float64)
    scale[: cfg["nuisance"]] = 30.0
    common = torch.randn(d, generator=g, dtype=torch.float64) * 2  # shared offset: cosine's foe
    train, test = [], []
    for _ in range(cfg["tasks"]):
        means = (
            common
            + torch.randn(cfg["classes"], d, generator=g, dtype=torch.float64) * (cfg["spread"])
        )
        means[:, : cfg["nuisance"]] = 0
        for out, n in ((train, cfg["n"]), (test, 4 * cfg["n"])):
            y = torch.arange(n) % cfg["classes"]
            noise = torch.randn(n, d, generator=g, dtype=torch.float64) * scale.sqrt()
            out.append((means[y] + noise, y))
    return train, test


def own_head(stats: RouteStats, z: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    cov = stats.scatter_matrix() / max(1, stats.total - stats.seen_classes)
    cov = cov + ridge * torch.eye(stats.dim, dtype=torch.float64) * cov.diagonal().mean()
    proj = torch.linalg.solve(cov, stats.mean.T).T
    return z @ proj.T - 0.5 * (proj * stats.mean).sum(1)


def run_setting(cfg: dict) -> dict[str, float]:
    train, test = make_setting(cfg)
    stats = {}
    for t, (z, y) in enumerate(train):
        acc = RouteStatsAccumulator(cfg["classes"])
        acc.update(z, y)
        s = acc.result()
        calib = CalibrationAccumulator()
        calib.update(own_head(s, z))
        stats[f"t{t}"] = s.with_calibration(calib.result())
    z_all = torch.cat([z for z, _ in test])
    truth = torch.cat([torch.full((len(z),), t) for t, (z, _) in enumerate(test)])

    def patched(name: str, idx: torch.Tensor) -> torch.Tensor:
        return own_head(stats[name], z_all[idx])

    results = {}
    routers = {"oas": TaskRouter(stats), "a=0.1": TaskRouter(stats, shrinkage=0.1)}
    for label, method, router in (
        ("lda (oas)", "lda", routers["oas"]),
        ("lda (a=0.1)", "lda", routers["a=0.1"]),
        ("ncm-cosine", "ncm", routers["oas"]),
        ("energy", "energy", routers["oas"]),
        ("combined k=2", "combined", routers["oas"]),
    ):
        res = router.route(z_all, method, patched)
        results[label] = float((res.task_index == truth).double().mean())
    results["oas a"] = routers["oas"].shrinkage_value
    return results


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__, out=RESULTS / "routing_synthetic.json").parse_args(argv)
    results = {name: run_setting(cfg) for name, cfg in SETTINGS.items()}
    cols = list(next(iter(results.values())))
    print_table(
        ["setting", *cols], [(n, *(f"{r[c]:.3f}" for c in cols)) for n, r in results.items()]
    )
    save(args, {"settings": SETTINGS, "task_accuracy": results})


if __name__ == "__main__":
    main()
