"""Task-free routing: exact streaming statistics, the router's methods on synthetic Gaussians
with a known answer, clear errors, and base-feature capture on a tiny TAPSModel."""

from __future__ import annotations

import threading

import pytest
import torch

from taps_cl.config import TAPSConfig
from taps_cl.routing import (
    Calibration,
    CalibrationAccumulator,
    RouteStats,
    RouteStatsAccumulator,
    TaskRouter,
    base_features,
    collect_route_stats,
    pack_symmetric,
    unpack_symmetric,
)
from taps_cl.taps.model import TAPSModel
from tests.tiny import tiny_cnn, tiny_images


def gaussian_tasks(
    num_tasks: int = 4,
    classes: int = 3,
    dim: int = 16,
    n: int = 60,
    spread: float = 4.0,
    cov_scale: torch.Tensor | None = None,
    seed: int = 0,
    noise_seed: int = 100,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Task -> (features, labels, class means): Gaussian classes, covariance diag(cov_scale).
    The means depend on ``seed`` only, so ``noise_seed`` draws fresh samples of the same tasks."""
    g, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(noise_seed)
    scale = torch.ones(dim) if cov_scale is None else cov_scale.double()
    out = {}
    for t in range(num_tasks):
        means = torch.randn(classes, dim, generator=g).double() * spread
        y = torch.arange(n) % classes
        z = means[y] + torch.randn(n, dim, generator=noise, dtype=torch.float64) * scale.sqrt()
        out[f"task{t}"] = (z, y, means)
    return out


def stats_of(z: torch.Tensor, y: torch.Tensor, classes: int, batch: int | None = None):
    acc = RouteStatsAccumulator(classes)
    step = batch or len(z)
    for i in range(0, len(z), step):
        acc.update(z[i : i + step], y[i : i + step])
    return acc.result()


def test_streaming_stats_equal_all_at_once_and_the_definition():
    z, y, _ = gaussian_tasks(1, classes=4, dim=8, n=103)["task0"]
    whole = stats_of(z, y, 4)
    for batch in (1, 7, 50):
        part = stats_of(z, y, 4, batch)
        assert torch.equal(part.count, whole.count)
        torch.testing.assert_close(part.mean, whole.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(part.scatter, whole.scatter, rtol=1e-11, atol=1e-10)
    means = torch.stack([z[y == c].mean(0) for c in range(4)])
    centred = z - means[y]
    torch.testing.assert_close(whole.mean, means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole.scatter_matrix(), centred.T @ centred, rtol=1e-11, atol=1e-10)


def test_unseen_class_and_tensor_round_trip():
    z, y, _ = gaussian_tasks(1, classes=3, dim=6, n=30)["task0"]
    keep = y != 1
    stats = stats_of(z[keep], y[keep], 3).with_calibration(Calibration(30, 1.0, -2.0, 0.5))
    assert stats.count.tolist() == [10, 0, 10] and stats.seen_classes == 2
    tensors = stats.to_tensors()
    assert set(tensors) == {"route.count", "route.mean", "route.scatter", "route.calib"}
    assert (
        tensors["route.scatter"].dtype == torch.float32 and tensors["route.scatter"].numel() == 21
    )
    back = RouteStats.from_tensors(tensors)
    assert back.calibration == stats.calibration
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.count, stats.count)
    exact = RouteStats.from_tensors(stats.to_tensors(torch.float64))
    assert torch.equal(exact.scatter, stats.scatter)
    m = torch.randn(5, 5, dtype=torch.float64)
    m = m + m.T
    assert torch.equal(unpack_symmetric(pack_symmetric(m), 5), m)


def test_calibration_accumulator_streams_exactly():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(1)) * 3
    whole, parts = CalibrationAccumulator(2.0), CalibrationAccumulator(2.0)
    whole.update(logits)
    for i in range(0, 50, 6):
        parts.update(logits[i : i + 6])
    a, b = whole.result(), parts.result()
    energy = -2.0 * torch.logsumexp(logits.double() / 2.0, 1)
    assert a.count == b.count == 50
    assert a.energy_mean == pytest.approx(float(energy.mean()), rel=1e-12)
    assert b.energy_std == pytest.approx(float(energy.std()), rel=1e-10)


def test_lda_picks_the_task_of_separated_means():
    tasks = gaussian_tasks()
    router = TaskRouter({t: stats_of(z, y, 3) for t, (z, y, _) in tasks.items()})
    test = gaussian_tasks(n=300, noise_seed=7)  # same tasks, fresh samples
    for method in ("lda", "ncm"):
        for t, (z, y, _) in test.items():
            res = router.route(z, method)
            assert set(res.task_names) == {t}, method
            assert (res.class_index == y).double().mean() > 0.95
            assert bool((res.confidence > 0.5).all())


def anisotropic_tasks(seed: int = 0, n: int = 400) -> dict:
    """Two tasks whose class means differ only along low-variance directions, while a few
    high-variance nuisance directions dominate the norm: cosine is fooled, LDA is not."""
    g = torch.Generator().manual_seed(seed)
    dim, scale = 12, torch.ones(12) * 0.05
    scale[:3] = 25.0
    out = {}
    for t in range(2):
        means = torch.zeros(2, dim)
        means[:, 3:] = 1.0
        means[0, 3 + t] += 1.2
        means[1, 6 + t] += 1.2
        y = torch.arange(n) % 2
        z = means[y] + torch.randn(n, dim, generator=g, dtype=torch.float64) * scale.sqrt()
        out[f"task{t}"] = (z, y, means)
    return out


def test_lda_beats_ncm_cosine_under_anisotropic_covariance():
    router = TaskRouter({t: stats_of(z, y, 2) for t, (z, y, _) in anisotropic_tasks().items()})
    acc = {}
    for method in ("lda", "ncm"):
        hits = [
            (router.route(z, method).task_index == router.tasks.index(t)).double().mean()
            for t, (z, _, _) in anisotropic_tasks(seed=1).items()
        ]
        acc[method] = float(torch.stack(hits).mean())
    assert acc["lda"] > 0.97
    assert acc["lda"] > acc["ncm"] + 0.2, acc


def own_head_logits(stats: RouteStats, z: torch.Tensor) -> torch.Tensor:
    """A stand-in for a trained patch: the task's own LDA head (it never saw other tasks)."""
    cov = stats.scatter_matrix() / (stats.total - stats.seen_classes)
    cov = cov + 0.1 * torch.eye(stats.dim, dtype=torch.float64)
    proj = torch.linalg.solve(cov, stats.mean.T).T
    return z @ proj.T - 0.5 * (proj * stats.mean).sum(1)


def test_energy_and_combined_route_with_calibrated_patches():
    tasks = gaussian_tasks(num_tasks=3, spread=3.0)
    stats = {}
    for t, (z, y, _) in tasks.items():
        s = stats_of(z, y, 3)
        calib = CalibrationAccumulator()
        calib.update(own_head_logits(s, z))
        stats[t] = s.with_calibration(calib.result())
    router = TaskRouter(stats, top_k=2)
    calls = []

    def patched(name: str, idx: torch.Tensor) -> torch.Tensor:
        calls.append((name, len(idx)))
        return own_head_logits(stats[name], z_all[idx])

    fresh = gaussian_tasks(3, spread=3.0, n=200, noise_seed=7)
    z_all = torch.cat([z for z, _, _ in fresh.values()])
    truth = torch.arange(3).repeat_interleave(200)
    for method in ("energy", "combined"):
        calls.clear()
        res = router.route(z_all, method, patched)
        assert (res.task_index == truth).double().mean() > 0.9, method
        assert len(calls) == 3 and len({c[0] for c in calls}) == 3  # each patch runs once
    short = router.shortlist(z_all, 1)
    assert sum(len(i) for i in short.values()) == len(z_all)


def test_pooled_covariance_after_add_then_remove_equals_without():
    tasks = gaussian_tasks(num_tasks=3, dim=10)
    stats = {t: stats_of(z, y, 3) for t, (z, y, _) in tasks.items()}
    without = TaskRouter({k: stats[k] for k in ("task0", "task2")})
    router = TaskRouter({k: stats[k] for k in ("task2", "task0")}, shrinkage=0.1)
    cov_before, dof_before = router.pooled_covariance()
    router.add("task1", stats["task1"])
    z = tasks["task1"][0]
    assert set(router.route(z).task_names) == {"task1"}
    router.remove("task1")
    cov_after, dof_after = router.pooled_covariance()
    assert torch.equal(cov_after, cov_before) and dof_after == dof_before
    assert torch.equal(cov_after, without.pooled_covariance()[0])
    assert router.shrinkage_value == 0.1 and 0 <= without.shrinkage_value <= 1
    assert "task1" not in router.route(z).tasks


def test_bad_input_raises_clear_errors():
    z, y, _ = gaussian_tasks(1, dim=4)["task0"]
    stats = stats_of(z, y, 3)
    with pytest.raises(ValueError, match="no tasks"):
        TaskRouter().route(z)
    router = TaskRouter({"a": stats})
    with pytest.raises(ValueError, match="d=5"):
        router.route(torch.randn(3, 5))
    with pytest.raises(ValueError, match="0 rows"):
        router.route(torch.randn(0, 4))
    with pytest.raises(ValueError, match="NaN"):
        router.route(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match="needs patched_logits"):
        router.route(z, "combined")
    with pytest.raises(ValueError, match="no calibration"):
        router.route(z, "energy", lambda t, idx: torch.zeros(len(idx), 3))
    with pytest.raises(ValueError, match="unknown routing method"):
        router.route(z, "knn")
    with pytest.raises(ValueError, match="d=8"):
        router.add("b", stats_of(torch.randn(9, 8), torch.arange(9) % 3, 3))
    bad = stats.to_tensors()
    bad["route.mean"] = bad["route.mean"].clone()
    bad["route.mean"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RouteStats.from_tensors(bad)
    with pytest.raises(ValueError, match="missing"):
        RouteStats.from_tensors({"route.count": stats.count})
    with pytest.raises(ValueError, match="packed"):
        RouteStats(stats.count, stats.mean, stats.scatter[:-1])
    with pytest.raises(ValueError, match="more samples than classes"):
        TaskRouter({"a": stats_of(z[:3], y[:3], 3)}).route(z)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        RouteStatsAccumulator(3).update(z, y + 1)
    with pytest.raises(ValueError, match="no features"):
        RouteStatsAccumulator(3).result()


def _by_hand(model: TAPSModel, x: torch.Tensor) -> torch.Tensor:
    base = model.base
    with torch.no_grad():
        h = torch.relu(base.bn1(base.conv1(x)))
        h = torch.relu(base.bn2(base.conv2(h)))
        return base.pool(h).flatten(1)


def test_base_features_are_the_head_input_on_the_no_task_path():
    model = TAPSModel(tiny_cnn(), TAPSConfig())
    model.add_task("a", 3)
    x, y = tiny_images(8)
    z = base_features(model, x)
    assert z.shape == (8, 16)
    torch.testing.assert_close(z, _by_hand(model, x), rtol=0, atol=0)
    with model.using("a"), pytest.raises(ValueError, match="no-task path"):
        base_features(model, x)
    stats = collect_route_stats(model, [(x[:4], y[:4]), (x[4:], y[4:])], "a")
    assert stats.total == 8 and stats.calibration is not None and stats.dim == 16


def test_base_features_are_correct_under_two_threads():
    model = TAPSModel(tiny_cnn(), TAPSConfig())
    inputs = [tiny_images(6, seed=s)[0] for s in (1, 2)]
    expected = [_by_hand(model, x) for x in inputs]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(30):
                assert torch.equal(base_features(model, inputs[i]), expected[i])
        except BaseException as err:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not model.heads._forward_pre_hooks  # one path, the plain extractor: no hook left
