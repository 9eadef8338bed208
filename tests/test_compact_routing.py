"""Compact routing statistics and the router over them: bytes per task, decisions like the full
form, separation and overlap, deletion as if never added, incremental == rebuilt, mixed full
and compact tasks in one pool, and the method registry."""

from __future__ import annotations

import pytest
import torch

from taps_cl.routing import (
    COMPACT_RANK,
    METHODS,
    PATCHED_METHODS,
    ROUTING_METHODS,
    Calibration,
    RouteStats,
    TaskRouter,
    pack_symmetric,
    register_method,
)
from taps_cl.routing.compactstats import full_stats
from tests.test_routing import stats_of


def low_rank_tasks(num_tasks=5, classes=3, dim=48, n=90, spread=3.0, seed=0, draw=0):
    """Task -> (features, labels): class centres ``spread`` apart, within-class noise mostly in
    a few shared-per-task directions (as real features). ``draw`` picks fresh samples."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (spread * torch.randn(classes, dim, generator=gen, dtype=torch.float64),
         torch.randn(4, dim, generator=gen, dtype=torch.float64))
        for _ in range(num_tasks)
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(1000 + draw)
    out = {}
    for t, (centres, mix) in enumerate(shapes):
        y = torch.arange(n) % classes
        noise = 1.5 * torch.randn(n, 4, generator=gen, dtype=torch.float64) @ mix
        noise += 0.5 * torch.randn(n, dim, generator=gen, dtype=torch.float64)
        out[f"task{t}"] = (centres[y] + noise, y)
    return out


def full_and_compact(tasks):
    full = {name: stats_of(z, y, 3) for name, (z, y) in tasks.items()}
    return full, {name: s.compress() for name, s in full.items()}


def test_compact_bytes_per_task_within_128_kib_at_d1280_c10():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(60, 1280, generator=gen, dtype=torch.float64)
    stats = full_stats(z, torch.arange(60) % 10, 10)
    calib = Calibration(60, 1.0, -1.0, 0.5)
    full = RouteStats(stats.count, stats.mean, pack_symmetric(stats.scatter), calib)
    compact = full.compress()
    tensors = compact.to_tensors()
    assert COMPACT_RANK == 16 and set(tensors) == {
        "route.count", "route.mean", "route.basis", "route.diag", "route.calib"
    }  # fmt: skip
    d, c, k = 1280, 10, COMPACT_RANK
    formula = 8 * c + 2 * c * d + 2 * k * d + 4 * d + 32  # count, fp16 mean, fp16 U, fp32 r, calib
    assert compact.nbytes == formula == 71_792 <= 128 * 1024
    assert full.nbytes == 3_381_872  # the previous release's form, for comparison
    back = RouteStats.from_tensors(tensors)
    assert back.compact and torch.equal(back.scatter_matrix(), compact.scatter_matrix())


def test_compact_statistics_decide_like_the_full_form():
    """On fresh samples of 5 synthetic tasks (d=48, noise in a few directions), the compact
    router chooses the full router's task for >= 99% of inputs (measured: 100%)."""
    full, compact = full_and_compact(low_rank_tasks())
    test = low_rank_tasks(draw=1)
    z = torch.cat([v[0] for v in test.values()])
    a, b = TaskRouter(full).route(z), TaskRouter(compact).route(z)
    agree = (a.task_index == b.task_index).double().mean()
    assert agree >= 0.99, float(agree)
    truth = torch.arange(5).repeat_interleave(90)
    for res in (a, b):
        assert (res.task_index == truth).double().mean() >= 0.95


def _accuracy_and_confidence(spread: float) -> tuple[float, float]:
    tasks = low_rank_tasks(num_tasks=4, spread=spread, dim=32)
    router = TaskRouter(full_and_compact(tasks)[1])
    test = low_rank_tasks(num_tasks=4, spread=spread, dim=32, draw=2)
    res = router.route(torch.cat([v[0] for v in test.values()]))
    truth = torch.arange(4).repeat_interleave(90)
    return float((res.task_index == truth).double().mean()), float(res.confidence.mean())


def test_router_beats_chance_when_separated_and_degrades_gracefully_with_overlap():
    """4 tasks (chance 0.25): separated classes route almost perfectly; as the class centres
    close in, accuracy and confidence fall smoothly, never below chance."""
    spreads = (3.0, 0.5, 0.3, 0.1, 0.0)
    accuracy, confidence = zip(*[_accuracy_and_confidence(s) for s in spreads], strict=True)
    assert accuracy[0] >= 0.99 and confidence[0] >= 0.99  # measured 1.0, 1.0
    assert 0.85 <= accuracy[1] < accuracy[0]  # measured 0.93
    for near, far in zip(accuracy[1:], accuracy, strict=False):
        assert 0.25 <= near <= far + 0.02  # falls with the overlap, stays above chance
    assert all(a > b for a, b in zip(confidence, confidence[1:], strict=False))


@pytest.mark.parametrize("form", ["compact", "mixed"])
def test_removing_a_task_is_as_if_it_was_never_added(form):
    full, compact = full_and_compact(low_rank_tasks())
    stats = dict(compact)
    if form == "mixed":
        stats["task0"], stats["task3"] = full["task0"], full["task3"]
    z = torch.cat([v[0] for v in low_rank_tasks(draw=1).values()])
    router = TaskRouter(stats)
    router.route(z)  # the pooled sum exists, so the removal below updates it in place
    router.remove("task2")
    never = TaskRouter({k: v for k, v in stats.items() if k != "task2"})
    cov, dof = router.pooled_covariance()
    cov0, dof0 = never.pooled_covariance()
    assert dof == dof0 and router.tasks == never.tasks
    torch.testing.assert_close(cov, cov0, rtol=1e-10, atol=1e-10 * float(cov0.abs().max()))
    a, b = router.route(z), never.route(z)
    assert torch.equal(a.task_index, b.task_index) and torch.equal(a.class_index, b.class_index)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(a.confidence, b.confidence, rtol=1e-10, atol=1e-10)
    router.rebuild()
    assert torch.equal(router.pooled_covariance()[0], cov0)  # name-order sum, bit for bit


def test_incremental_updates_equal_a_rebuilt_router():
    _, compact = full_and_compact(low_rank_tasks())
    z = torch.cat([v[0] for v in low_rank_tasks(draw=1).values()])
    router = TaskRouter()
    for name in ("task3", "task0", "task4", "task1", "task2"):
        router.add(name, compact[name])
        router.route(z)  # use it after every step: each add updates the pooled sum in place
    router.add("task1", compact["task2"])  # replace one task's statistics
    router.remove("task4")
    rebuilt = TaskRouter({**compact, "task1": compact["task2"]})
    rebuilt.remove("task4")
    cov, cov0 = router.pooled_covariance()[0], rebuilt.pooled_covariance()[0]
    torch.testing.assert_close(cov, cov0, rtol=1e-10, atol=1e-10 * float(cov0.abs().max()))
    assert torch.equal(router.route(z).task_index, rebuilt.route(z).task_index)


def test_full_statistics_keep_the_previous_exact_path_in_any_order():
    full, _ = full_and_compact(low_rank_tasks())
    z = torch.cat([v[0] for v in low_rank_tasks(draw=1).values()])
    router = TaskRouter()
    for name in ("task2", "task4", "task0", "task3", "task1"):
        router.add(name, full[name])
        router.route(z)
    reference = torch.zeros(48, 48, dtype=torch.float64)
    for name in sorted(full):  # the previous release's sum: float64, task-name order
        reference += full[name].scatter_matrix()
    cov, dof = router.pooled_covariance()
    assert torch.equal(cov, reference / dof)
    a, b = router.route(z), TaskRouter(full).route(z)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.confidence, b.confidence)


def test_mixed_pool_sums_each_tasks_own_term():
    full, compact = full_and_compact(low_rank_tasks(num_tasks=2))
    router = TaskRouter({"task0": full["task0"], "task1": compact["task1"]})
    cov, dof = router.pooled_covariance()
    own = full["task0"].scatter_matrix() + compact["task1"].scatter_matrix()
    torch.testing.assert_close(cov * dof, own, rtol=1e-12, atol=1e-9)
    assert not torch.allclose(own, full["task0"].scatter_matrix() + full["task1"].scatter_matrix())


def test_route_tensors_must_be_one_form():
    _, compact = full_and_compact(low_rank_tasks(num_tasks=1))
    stats = compact["task0"]
    tensors = stats.to_tensors()
    assert tensors["route.mean"].dtype == torch.float16 and "route.scatter" not in tensors
    mixed = {**tensors, "route.scatter": torch.zeros(48 * 49 // 2)}
    with pytest.raises(ValueError, match="mix the full"):
        RouteStats.from_tensors(mixed)
    with pytest.raises(ValueError, match="missing"):
        RouteStats.from_tensors({k: v for k, v in tensors.items() if k != "route.diag"})
    with pytest.raises(ValueError, match="either a scatter"):
        RouteStats(stats.count, stats.mean)
    assert stats.compress() is stats


def test_a_routing_method_is_one_registration():
    assert tuple(METHODS) == ("lda", "ncm", "energy", "combined")
    assert tuple(PATCHED_METHODS) == ("energy", "combined")
    with pytest.raises(ValueError, match="already registered"):
        register_method("lda")(lambda *a: None)

    @register_method("first_task")
    def first(router, features, patched, top_k):
        res = router.route(features, "lda")
        return type(res)(res.tasks, res.task_index * 0, res.class_index, res.confidence, res.scores)

    try:
        assert "first_task" in METHODS and "first_task" not in PATCHED_METHODS
        _, compact = full_and_compact(low_rank_tasks(num_tasks=2))
        z = low_rank_tasks(num_tasks=2, draw=1)["task1"][0]
        assert TaskRouter(compact).route(z, "first_task").task_names == ["task0"] * len(z)
    finally:
        ROUTING_METHODS.remove("first_task")
    assert "first_task" not in METHODS
    with pytest.raises(ValueError, match="unknown routing method"):
        TaskRouter(compact).route(z, "first_task")
