"""Adding a task to a router without solving every class again: a derived router keeps its
source's factorised covariance and unchanged rows (stale) and solves only the added tasks'
classes, until the changed degrees of freedom exceed ``stale_fraction``; then, with
``stale_fraction=0``, ``exact=True`` or after ``rebuild()``, it equals a router built from
scratch. Also the float32 paths a large router takes (banded pooled sum, float32 rows)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taps_cl.routing.classtable as classtable
import taps_cl.routing.pool as pool
from taps_cl.routing import TaskRouter
from tests.test_compact_routing import full_and_compact, low_rank_tasks

TASKS = low_rank_tasks(num_tasks=24)
FULL, COMPACT = full_and_compact(TASKS)
Z = torch.cat([z for z, _ in low_rank_tasks(num_tasks=24, draw=1).values()])
# A router derived with a full solve against one built from scratch: their pooled sums differ by
# the rounding of float32 products of float16 bases (a chunk of >= 256 basis rows) against
# float64 per-task terms: relative 1e-7, so scores within 1e-6 of the largest.
EXACT = 1e-6
NAMES = sorted(COMPACT, key=lambda n: int(n[4:]))  # task0 .. task23, the order of Z's rows
# the column of each row's own task (columns follow the sorted names)
TRUE = torch.repeat_interleave(torch.tensor([sorted(NAMES).index(n) for n in NAMES]), 90)


def _stale(router: TaskRouter) -> int:
    """Degrees of freedom changed since the router's rows were last solved in full."""
    return router._table().factor(router.pooled_covariance, router.shrinkage).drift


def _rows(router: TaskRouter, name: str) -> torch.Tensor:
    """The discriminant rows of ``name``'s classes as the router's table holds them."""
    for block in router._table()._blocks:
        if name in block.names:
            i = block.names.index(name)
            start = sum(block.sizes[:i])
            return block.rows[start : start + block.sizes[i]]
    raise KeyError(name)


def _close(
    a: TaskRouter, b: TaskRouter, z: torch.Tensor, rtol: float = EXACT, decisions: bool = True
) -> None:
    """Same decisions (unless ``decisions`` is False: tasks with equal statistics tie); scores
    within ``rtol`` of the largest score."""
    ra, rb = a.route(z), b.route(z)
    assert a.tasks == b.tasks
    if decisions:
        assert torch.equal(ra.task_index, rb.task_index)
        assert torch.equal(ra.class_index, rb.class_index)
    scale = float(rb.scores.abs().max())
    torch.testing.assert_close(ra.scores, rb.scores, rtol=0, atol=rtol * scale)


def test_a_stale_derived_router_agrees_with_a_rebuilt_one():
    """One task added to 23 (4% of the degrees of freedom) without a full solve. These tasks'
    within-class noise lies in directions of their own, the hard case: the stale covariance
    lacks the added task's directions, so its own inputs score a little low."""
    base = {n: COMPACT[n] for n in NAMES[:23]}
    router = TaskRouter(base, stale_fraction=0.05)
    router.route(Z)
    router = router.derive({NAMES[23]: COMPACT[NAMES[23]]})
    assert _stale(router) > 0  # no full solve happened
    rebuilt = TaskRouter(COMPACT)
    a, b = router.route(Z), rebuilt.route(Z)
    assert float((a.task_index == b.task_index).double().mean()) >= 0.99
    accuracy = float((b.task_index == TRUE).double().mean())
    assert float((a.task_index == TRUE).double().mean()) >= accuracy - 0.01
    added = torch.arange(len(Z)) >= 23 * 90  # the added task's own inputs go to it
    assert float((a.task_index[added] == TRUE[added]).double().mean()) >= 0.95
    sa, sb = router.class_scores(Z), rebuilt.class_scores(Z)  # measured 0.075 and 3e-4:
    assert float((sa - sb).abs().median() / sb.abs().median()) <= 0.15
    assert float((a.confidence - b.confidence).abs().mean()) <= 0.01


def test_stale_fraction_zero_exact_and_rebuild_equal_a_rebuilt_router():
    base = {n: COMPACT[n] for n in NAMES[:20]}
    add = {n: COMPACT[n] for n in NAMES[20:]}
    router = TaskRouter(base)
    router.route(Z)
    rebuilt = TaskRouter(COMPACT)
    zero = TaskRouter(base, stale_fraction=0)
    zero.route(Z)
    for derived in (zero.derive(add), router.derive(add, exact=True)):
        assert _stale(derived) == 0
        _close(derived, rebuilt, Z)
    half = TaskRouter(base, stale_fraction=0.5)
    half.route(Z)
    stale = half.derive(dict(list(add.items())[:1]))
    assert _stale(stale) > 0
    stale.rebuild()
    assert _stale(stale) == 0
    _close(stale, TaskRouter({**base, **dict(list(add.items())[:1])}), Z)


def test_the_threshold_triggers_a_full_solve():
    base = {n: COMPACT[n] for n in NAMES[:20]}
    router = TaskRouter(base, stale_fraction=0.12)  # about two tasks' share of 22
    router.route(Z)
    dof = COMPACT["task0"].total - COMPACT["task0"].seen_classes
    drifts = []
    for name in NAMES[20:]:
        router = router.derive({name: COMPACT[name]})
        drifts.append(_stale(router))
    assert drifts == [dof, 2 * dof, 0, dof]  # the third add exceeds 12%: solved in full
    _close(router.derive(exact=True), TaskRouter(COMPACT), Z)


def test_removal_drops_the_tasks_rows_and_shares_the_others():
    router = TaskRouter(COMPACT, stale_fraction=0.5)
    router.route(Z)
    derived = router.derive(remove=["task3", "task17"])
    assert _stale(derived) > 0 and "task3" not in derived.tasks
    table, source = derived._table(), router._table()
    assert table.task_of.numel() == source.task_of.numel() - 6
    result = derived.route(Z)
    assert not {"task3", "task17"} & set(result.task_names)
    keep = [n for n in derived.tasks]
    for name in keep:  # rows as the source had them
        assert torch.equal(_rows(derived, name), _rows(router, name)), name


def test_edge_cases_one_task_readding_and_replacing_a_version():
    one = TaskRouter({"task0": COMPACT["task0"]})
    one.route(Z)
    two = one.derive({"task1": COMPACT["task1"]})  # half the degrees of freedom: full solve
    assert _stale(two) == 0
    _close(two, TaskRouter({n: COMPACT[n] for n in ("task0", "task1")}), Z)
    assert one.derive(remove=["task0"]).tasks == ()
    router = TaskRouter(COMPACT, stale_fraction=0.5)
    router.route(Z)
    gone = router.derive(remove=["task5"])
    back = gone.derive({"task5": COMPACT["task5"]})  # the name re-added: its rows again
    _close(back, router, Z, 1e-12)
    other = router.derive({"task5": COMPACT["task9"]})  # a new version: other statistics
    assert _stale(other) > 0
    cols = other._table().task_of == other.tasks.index("task5")
    twin = other._table().task_of == other.tasks.index("task9")
    scores = other.class_scores(Z[:7])
    torch.testing.assert_close(scores[:, cols], scores[:, twin])  # from the new statistics
    torch.testing.assert_close(_rows(other, "task5"), _rows(other, "task9"))


def test_full_statistics_are_never_stale():
    base = {n: FULL[n] for n in NAMES[:20]}
    router = TaskRouter(base)
    router.route(Z)
    derived = router.derive({"task20": FULL["task20"]}, remove=["task2"])
    kept = {n: s for n, s in base.items() if n != "task2"}
    fresh = TaskRouter({**kept, "task20": FULL["task20"]})
    assert torch.equal(derived.route(Z).scores, fresh.route(Z).scores)  # bit for bit


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMES), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    fraction=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
)
def test_any_sequence_of_changes_routes_over_the_right_tasks(steps, fraction):
    current = {n: COMPACT[n] for n in NAMES[:12]}
    router = TaskRouter(current, stale_fraction=fraction)
    router.route(Z[:50])
    for name, stats_of, drop in steps:
        if drop and name in current and len(current) > 1:
            router, _ = router.derive(remove=[name]), current.pop(name)
        elif not drop:
            router = router.derive({name: COMPACT[stats_of]})
            current[name] = COMPACT[stats_of]
        result = router.route(Z[:50])
        table = router._table()
        assert router.tasks == tuple(sorted(current))
        for t, name_t in enumerate(router.tasks):  # each task's seen classes, once
            assert sorted(table.class_of[table.task_of == t].tolist()) == [0, 1, 2], name_t
        assert torch.isfinite(result.scores).all()
    fresh = TaskRouter(current)  # two names may hold the same statistics: their scores tie
    if fraction == 0.0:
        _close(router, fresh, Z, decisions=False)
    router.rebuild()
    _close(router, fresh, Z, decisions=False)


# -- what a large router does differently: float32 pooled products and rows ------------------


def test_banded_float32_pooled_sum_matches_float64(monkeypatch):
    stats = [COMPACT[n] for n in NAMES]
    exact = pool._compact_sum(stats, 48)
    monkeypatch.setattr(pool, "_WIDE_ROWS", 32)
    monkeypatch.setattr(pool, "_BAND", 20)  # bands that do not divide d
    monkeypatch.setattr(pool, "_CHUNK_TASKS", 5)
    banded = pool._compact_sum(stats, 48)
    assert torch.equal(banded, banded.T)
    torch.testing.assert_close(banded, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))


def test_float32_rows_route_as_float64_rows(monkeypatch):
    wide = TaskRouter(COMPACT)
    wide.route(Z)
    monkeypatch.setattr(classtable, "_FLOAT32_FROM", 0)
    narrow = TaskRouter(COMPACT)
    rows = narrow._table().factor(narrow.pooled_covariance, "oas").inverse
    narrow.route(Z)
    assert rows is not None and narrow._table()._blocks[0].rows.dtype == torch.float32
    _close(narrow, wide, Z, 1e-5)
    assert narrow.nbytes < wide.nbytes
    stale = TaskRouter({n: COMPACT[n] for n in NAMES[:20]}, stale_fraction=0.5)
    stale.route(Z)
    stale = stale.derive({n: COMPACT[n] for n in NAMES[20:]})
    assert _stale(stale) > 0 and stale._table()._blocks[-1].rows.dtype == torch.float32


@pytest.mark.parametrize("bad", [-0.1, 1.5, "x"])
def test_stale_fraction_is_checked(bad):
    with pytest.raises(ValueError, match="stale_fraction"):
        TaskRouter(COMPACT, stale_fraction=bad)
