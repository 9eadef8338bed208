"""Compact per-task statistics: the pooled cache is their sum, deletion is exact, and an LDA
router on compact statistics decides like the full form on synthetic data."""

from __future__ import annotations

import pytest
import torch

from taps_cl.routing.compactstats import CompactStats, PooledStats, compress, full_stats
from taps_cl.routing.ldaroute import LDARouter


def low_rank_tasks(num_tasks=4, per=60, classes=3, dim=64, rank=4, seed=0, draw=0):
    """Tasks whose within-class noise lives mostly in a few directions (as real features);
    ``seed`` fixes the tasks, ``draw`` the samples."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [
        (3.0 * torch.randn(classes, dim, generator=gen, dtype=torch.float64),
         torch.randn(rank, dim, generator=gen, dtype=torch.float64))
        for _ in range(num_tasks)
    ]  # fmt: skip
    gen = torch.Generator().manual_seed(1000 + draw)
    tasks = []
    for centres, mix in shapes:
        y = torch.arange(classes).repeat_interleave(per)
        noise = 2.0 * torch.randn(len(y), rank, generator=gen, dtype=torch.float64) @ mix
        noise += 0.5 * torch.randn(len(y), dim, generator=gen, dtype=torch.float64)
        tasks.append((centres[y] + noise, y))
    return tasks


def router_scores(stats, z):
    router = LDARouter()
    for i, s in enumerate(stats):
        router.add(f"t{i}", s)
    return router.task_scores(z)


def test_compress_keeps_the_diagonal_and_is_exact_at_full_rank():
    z, y = low_rank_tasks(1, dim=16)[0]
    full = full_stats(z, y, 3)
    comp = compress(full, 4)
    torch.testing.assert_close(
        torch.diagonal(comp.scatter_matrix()),
        torch.diagonal(full.scatter_matrix()),
        rtol=1e-6,
        atol=1e-3,
    )
    exact = compress(full, 16, basis_dtype=torch.float64, mean_dtype=torch.float64)
    torch.testing.assert_close(exact.scatter_matrix(), full.scatter_matrix(), rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(full.gram(), z.T @ z)


def test_compact_bytes_at_d1280_c10_fit_the_budget():
    comp = CompactStats(
        torch.ones(10, dtype=torch.int64), torch.zeros(10, 1280, dtype=torch.float16),
        torch.zeros(32, 1280, dtype=torch.float16), torch.zeros(1280),
    )  # fmt: skip
    assert comp.nbytes <= 128 * 1024
    back = CompactStats.from_tensors(comp.to_tensors())
    assert back.nbytes == comp.nbytes


def test_compact_statistics_decide_like_the_full_form():
    train = low_rank_tasks(seed=0)
    test = low_rank_tasks(seed=0, per=50, draw=1)  # same tasks, new samples
    full = [full_stats(z, y, 3) for z, y in train]
    comp = [compress(s, 8) for s in full]
    z = torch.cat([t[0] for t in test])
    true = torch.cat([torch.full((len(t[1]),), i) for i, t in enumerate(test)])
    a, b = router_scores(full, z).argmax(1), router_scores(comp, z).argmax(1)
    assert float((a == b).double().mean()) >= 0.95
    assert float((b == true).double().mean()) >= float((a == true).double().mean()) - 0.03


def test_deleting_a_task_equals_never_adding_it():
    tasks = [compress(full_stats(z, y, 3), 8) for z, y in low_rank_tasks()]
    pool, never = PooledStats(), PooledStats()
    for i, s in enumerate(tasks):
        pool.add(f"t{i}", s)
        if i != 2:
            never.add(f"t{i}", s)
    pool.remove("t2")
    assert pool.tasks == never.tasks and pool.count == never.count
    rel = float((pool.total - never.total).abs().max() / never.total.abs().max())
    assert rel < 1e-12
    pool.rebuild()
    never.rebuild()
    assert torch.equal(pool.total, never.total)
    for name in list(pool.tasks):
        pool.remove(name)
    assert pool.total is None and pool.nbytes == 0


def test_pool_refuses_duplicates_and_mismatched_dims():
    ((z, y),) = low_rank_tasks(1, dim=8)
    pool = PooledStats("gram")
    pool.add("a", full_stats(z, y, 3))
    with pytest.raises(ValueError, match="already"):
        pool.add("a", full_stats(z, y, 3))
    with pytest.raises(ValueError, match="d="):
        pool.add("b", full_stats(z[:, :4], y, 3))
    with pytest.raises(KeyError):
        pool.remove("zz")
    with pytest.raises(ValueError, match="kind"):
        PooledStats("cov")


def test_lda_router_forgets_a_deleted_task():
    tasks = [compress(full_stats(z, y, 3), 8) for z, y in low_rank_tasks()]
    z = torch.cat([t[0] for t in low_rank_tasks(per=10, draw=2)])
    router, never = LDARouter(), LDARouter()
    for i, s in enumerate(tasks):
        router.add(f"t{i}", s)
        if i != 1:
            never.add(f"t{i}", s)
    router.task_scores(z)
    router.remove("t1")
    assert float((router.task_scores(z) - never.task_scores(z)).abs().max()) < 1e-8
    with pytest.raises(ValueError, match="no tasks"):
        LDARouter().task_scores(z)


def test_a_one_class_task_is_pooled_and_routed():
    (z, y), (z2, y2) = low_rank_tasks(2, classes=2, seed=4)
    router = LDARouter()
    router.add("two", compress(full_stats(z, y, 2), 8))
    one = y2 == 0
    router.add("one", compress(full_stats(z2[one], y2[one], 1), 8))
    scores = router.task_scores(torch.cat([z[:5], z2[one][:5]]))
    assert scores.shape == (10, 2)
    assert router.tasks == ("one", "two")
    assert float((scores.argmax(1) == torch.tensor([1] * 5 + [0] * 5)).double().mean()) >= 0.9


def test_compress_survives_an_eigh_that_does_not_converge(monkeypatch):
    """LAPACK's syevd can fail on scatters with many repeated eigenvalues (a one-class task,
    n < d); the compact form then comes from the SVD, with the same top pairs."""
    from taps_cl.routing import compactstats

    gen = torch.Generator().manual_seed(0)
    z, y = (
        torch.randn(12, 32, generator=gen, dtype=torch.float64),
        torch.zeros(12, dtype=torch.long),
    )
    full = compactstats.full_stats(z, y, 1)
    expected = compactstats.compress(full, 4, basis_dtype=torch.float64)
    real = torch.linalg.eigh

    def failing(*args, **kwargs):
        monkeypatch.setattr(torch.linalg, "eigh", real)
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    got = compactstats.compress(full, 4, basis_dtype=torch.float64)
    s_exp = expected.basis.T @ expected.basis
    s_got = got.basis.T @ got.basis  # eigenvectors are defined up to sign: compare u u^T
    assert torch.allclose(s_exp, s_got, atol=1e-8)
    assert torch.allclose(expected.diag, got.diag, atol=1e-6)
