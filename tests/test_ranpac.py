"""RanPAC-style router: equals a closed-form ridge, routes separated tasks, degrades gracefully
on overlapping ones, and forgets a deleted task exactly."""

from __future__ import annotations

import pytest
import torch

from taps_cl.routing.closedform import one_hot
from taps_cl.routing.ranpac import RandomProjection, RanPACRouter
from taps_cl.routing.taskscore import reduce_scores, task_accuracy, task_index


def gaussian_tasks(num_tasks: int, sep: float, per=40, classes=2, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = sep * torch.randn(num_tasks, classes, dim, generator=gen)
    train, test = [], []
    for t in range(num_tasks):
        for out in (train, test):
            y = torch.arange(classes).repeat_interleave(per)
            out.append((centres[t][y] + torch.randn(len(y), dim, generator=gen), y))
    return train, test


def fitted(train, size=256, rank=None, lam=None):
    router = RanPACRouter(RandomProjection(train[0][0].shape[1], size, seed=1), rank=rank, lam=lam)
    for i, (z, y) in enumerate(train):
        router.add_data(f"t{i}", z, y, int(y.max()) + 1)
    return router


def id_accuracy(router, test):
    z = torch.cat([t[0] for t in test])
    true = torch.cat([torch.full((len(t[1]),), i) for i, t in enumerate(test)])
    return task_accuracy(router.task_scores(z), true)


def test_head_equals_closed_form_ridge_on_random_features():
    train, test = gaussian_tasks(3, 2.0)
    router = fitted(train, lam=3.0)
    h = torch.cat([router.projection(z) for z, _ in train]).double()
    targets = torch.cat([one_hot(y + 2 * i, 6) for i, (_, y) in enumerate(train)])
    w = torch.linalg.solve(h.T @ h + 3.0 * torch.eye(256, dtype=torch.float64), h.T @ targets)
    z = torch.cat([t[0] for t in test])
    torch.testing.assert_close(router.class_scores(z), router.projection(z).double() @ w)


def test_routes_separated_tasks_and_degrades_gracefully_when_they_overlap():
    accs = {}
    for sep in (3.0, 0.6, 0.25):
        train, test = gaussian_tasks(5, sep, seed=2)
        accs[sep] = id_accuracy(fitted(train), test)
    assert accs[3.0] >= 0.95  # chance is 0.2
    assert accs[3.0] >= accs[0.6] >= accs[0.25] - 0.05
    assert accs[0.25] > 0.2  # still above chance, not broken


def test_gcv_lambda_is_positive_and_router_predicts_tasks_and_classes():
    train, test = gaussian_tasks(3, 3.0)
    router = fitted(train)
    assert router.lam_value > 0
    task, cls = router.predict(torch.cat([t[0] for t in test]))
    true_cls = torch.cat([t[1] for t in test])
    assert float((cls == true_cls).double().mean()) > 0.9 and int(task.max()) == 2


def test_deleting_a_task_equals_never_adding_it():
    train, test = gaussian_tasks(4, 1.0)
    z = torch.cat([t[0] for t in test])
    for rank in (None, 8):
        router = fitted(train, rank=rank)
        router.class_scores(z)  # solved once with every task
        router.remove("t1")
        never = fitted([t for i, t in enumerate(train) if i != 1], rank=rank)
        # names differ (t2 vs t1 ...), order of tasks is the same
        a, b = router.task_scores(z), never.task_scores(z)
        assert abs(router.lam_value - never.lam_value) <= 1e-9 * never.lam_value
        assert float((a - b).abs().max()) < 1e-8


def test_compact_router_close_to_exact():
    train, test = gaussian_tasks(5, 1.0, seed=3)
    exact, compact = id_accuracy(fitted(train), test), id_accuracy(fitted(train, rank=16), test)
    assert compact >= exact - 0.05


def test_reduce_scores_and_bad_input():
    scores = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    task_of = task_index([2, 1])
    torch.testing.assert_close(
        reduce_scores(scores, task_of, "max"),
        torch.tensor([[3.0, 2.0], [0.0, 5.0]], dtype=torch.float64),
    )
    lse = reduce_scores(scores, task_of, "logsumexp")
    ratio = reduce_scores(scores, task_of, "ratio")
    assert torch.equal(lse.argmax(1), ratio.argmax(1))
    torch.testing.assert_close(ratio[:, 0], lse[:, 0] - lse[:, 1])
    with pytest.raises(ValueError, match="reduce"):
        reduce_scores(scores, task_of, "mean")
    with pytest.raises(ValueError, match="size"):
        RandomProjection(4, 0)
    with pytest.raises(ValueError, match="d="):
        RandomProjection(4, 8)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="no tasks"):
        RanPACRouter(RandomProjection(4, 8)).class_scores(torch.zeros(1, 4))
