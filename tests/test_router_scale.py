"""The router at scale: a derived (incremental) router equals one built from scratch, the router
holds no d x d matrix per task, the server derives its router from the cached one and drops
stale ones, a server routing while another process commits never serves a mixed state, and a
200-task store keeps tasks() and routing within a constant factor of a 10-task store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks._synthetic import perturbed
from benchmarks.harness import interleaved_medians
from taps_cl.engine import Engine
from taps_cl.routing import RouteStats, RouteStatsAccumulator, TaskRouter
from tests.test_compact_routing import full_and_compact, low_rank_tasks
from tests.test_engine import tiny_engine
from tests.test_route import dark

ROOT = Path(__file__).resolve().parents[1]
# Tolerance of a derived router against one rebuilt from scratch: scores are float64 sums in
# another order (measured: relative differences around 1e-13).
RTOL, ATOL = 1e-9, 1e-7


def _assert_same_routing(a: TaskRouter, b: TaskRouter, z: torch.Tensor) -> None:
    assert a.tasks == b.tasks
    for method in ("lda", "ncm"):
        ra, rb = a.route(z, method), b.route(z, method)
        assert torch.equal(ra.task_index, rb.task_index), method
        assert torch.equal(ra.class_index, rb.class_index), method
        torch.testing.assert_close(ra.scores, rb.scores, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(ra.confidence, rb.confidence, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("form", ["compact", "mixed"])
def test_derived_router_equals_a_router_built_from_scratch(form):
    full, compact = full_and_compact(low_rank_tasks(num_tasks=8))
    stats = dict(compact)
    if form == "mixed":
        stats["task1"], stats["task6"] = full["task1"], full["task6"]
    z = torch.cat([v[0] for v in low_rank_tasks(num_tasks=8, draw=1).values()])
    current = {n: stats[n] for n in ("task0", "task1", "task2", "task3")}
    router = TaskRouter(current)
    router.route(z)  # pooled sum and projection exist: derive starts from them
    steps = [
        ({"task4": stats["task4"], "task5": stats["task5"]}, []),  # adds
        ({}, ["task1"]),  # a delete
        ({"task2": stats["task7"]}, []),  # a new version (other statistics, same name)
        ({"task6": stats["task6"], "task1": stats["task1"]}, ["task0", "task4"]),
    ]
    for add, remove in steps:
        before = router.route(z).scores.clone()
        derived = router.derive(add, remove)
        assert torch.equal(router.route(z).scores, before)  # the source is left as it was
        current = {n: s for n, s in {**current, **add}.items() if n not in remove}
        _assert_same_routing(derived, TaskRouter(current), z)
        router = derived


def _synthetic_stats(num_tasks: int, dim: int, classes: int = 10, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in range(num_tasks):
        z = torch.randn(classes * 20, dim, generator=g, dtype=torch.float64)
        y = torch.arange(classes * 20) % classes
        z += 3 * torch.randn(classes, dim, generator=g, dtype=torch.float64)[y]
        out[f"t{t:03d}"] = _stats(z, y, classes).compress()
    return out


def _stats(z: torch.Tensor, y: torch.Tensor, classes: int) -> RouteStats:
    acc = RouteStatsAccumulator(classes)
    acc.update(z, y)
    return acc.result()


def test_router_holds_no_d_by_d_matrix_per_task():
    d, n, c = 96, 40, 10
    stats = _synthetic_stats(n, d, c)
    router = TaskRouter(stats)
    router.route(torch.randn(8, d), "lda")
    router.route(torch.randn(8, d), "ncm")
    per_task = sum(s.nbytes for s in stats.values())
    assert all(s.compact and s.nbytes < 8 * d * d for s in stats.values())
    classes = n * c
    # statistics as stored + one pooled d x d sum + the class table (rows, the d x d inverse
    # they were solved with, unit means)
    bound = per_task + 2 * 8 * d * d + 2 * 8 * classes * d + 64 * classes
    assert per_task < router.nbytes <= bound
    # at d = 1280, C = 10, 1,000 tasks (rank 16) the rows are float32: 71.8 + 13.1 + 51.2 + 6.6
    # MB (+ 102.4 with "ncm")
    assert 1000 * 71_792 + 8 * 1280**2 + 4 * 10_000 * 1280 + 4 * 1280**2 < 145e6


# -- the server's router cache ---------------------------------------------------------------


def _engine_with_copies(tmp_path: Path, copies: int, **kw) -> tuple[Engine, object]:
    engine = tiny_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    if kw:
        engine = Engine(engine.base, store=engine.store, config=engine.config, **kw)
    engine.add_task(dark(48), name="dark", quiet=True)
    real = engine.load_patch("dark")
    patches = [perturbed(real, f"syn{i:03d}", seed=i) for i in range(copies)]
    if patches:
        engine.store.commit_many(patches)
    engine.refresh()
    return engine, real


def test_server_derives_its_router_and_drops_stale_ones(tmp_path, monkeypatch):
    engine, real = _engine_with_copies(tmp_path, 4)
    x = dark(12, seed=3)[0]
    engine.route(x)
    reads = []
    route_stats = engine.store.route_stats
    monkeypatch.setattr(
        engine.store,
        "route_stats",
        lambda n, v=None, **kw: reads.append(n) or route_stats(n, v, **kw),
    )
    steps = [
        lambda: engine.import_task(perturbed(real, "syn100", 100).save(tmp_path / "a.safetensors")),
        lambda: engine.remove_task("syn001"),
        lambda: engine.import_task(perturbed(real, "syn002", 7).save(tmp_path / "b.safetensors")),
    ]
    for step, expect in zip(steps, (["syn100"], [], ["syn002"]), strict=True):
        reads.clear()
        step()
        engine.refresh()
        routed = engine.route(x)
        assert reads == expect  # only the changed version is read
        cand = engine.routing.candidates(None)
        assert len(engine.routing._routers) == 1  # stale routers left the cache
        assert cand.versions == routed.versions
        fresh = TaskRouter({n: route_stats(n, v) for n, v in cand.versions.items()})
        z = engine.server.features(engine.preprocess(x))
        _assert_same_routing(cand.router, fresh, z)


# -- two processes ---------------------------------------------------------------------------


def test_routing_while_another_process_commits(tmp_path):
    """The child imports 6 new tasks and 2 new versions while we route with version_ttl=0.3 s:
    no error, every answer's versions are a set the store held, and each commit is routed to
    within version_ttl of its return."""
    ttl = 0.3
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    engine, real = _engine_with_copies(tmp_path, 2)
    engine = Engine(engine.base, store=url, config=engine.config, version_ttl=ttl)
    folder = tmp_path / "incoming"
    folder.mkdir()
    names = [f"new{i}" for i in range(6)] + ["syn000", "new2"]  # 6 tasks, then 2 new versions
    for i, name in enumerate(names):
        perturbed(real, name, seed=50 + i).save(folder / f"{i:02d}_{name}.safetensors")
    states = [{r.name: r.current_version for r in engine.tasks() if r.routable}]
    log, go = tmp_path / "log.jsonl", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "tests._route_child", url, str(folder), str(log), str(go)]
    child = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    x = dark(8, seed=4)[0]
    answers = []
    try:
        engine.route(x)  # warm, before the child starts committing
        go.touch()
        deadline = time.monotonic() + 25
        while child.poll() is None and time.monotonic() < deadline:
            start = time.time()
            answers.append((start, engine.route(x).versions))
        for _ in range(int(ttl / 0.05) + 4):  # keep routing until the last commit is seen
            answers.append((time.time(), engine.route(x).versions))
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()
        _, err = child.communicate(timeout=10)
    assert child.returncode == 0, err
    commits = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(commits) == len(names)
    states += [c["state"] for c in commits]
    for start, versions in answers:
        assert versions in states  # one consistent set that existed, never a mixture
        seen = states.index(versions)
        for i, commit in enumerate(commits, start=1):
            if start > commit["t"] + ttl + 0.05:
                assert seen >= i, (start - commit["t"], versions)  # picked up within ttl
    assert answers[-1][1] == states[-1]


# -- 200 tasks against 10 --------------------------------------------------------------------


@pytest.mark.timing
def test_200_tasks_keep_tasks_and_routing_within_a_constant_factor(tmp_path):
    """A sanity bound, not the benchmark (benchmarks/scale.py): medians of interleaved runs, the
    best of up to three rounds and generous factors, so a loaded machine does not make it flake.

    Routing and the server's task list (cached, what every predict and route reads) stay within
    5x of a 10-task store. ``tasks()`` returns every record, so it grows with the number of
    tasks: it must stay linear (within 5x of 20 times the 10-task listing)."""
    small, _ = _engine_with_copies(tmp_path / "small", 9, max_loaded=16)
    large, _ = _engine_with_copies(tmp_path / "large", 199, max_loaded=16)
    x = dark(16, seed=6)[0]
    for engine in (small, large):
        assert len(engine.tasks()) in (10, 200)
        routed = engine.route(x)  # router built, chosen tasks loaded
        assert sum(t == "dark" for t in routed.tasks) >= 12  # copies do not capture the real
    fns = {
        "tasks_small": small.tasks,
        "tasks_large": large.tasks,
        "records_small": small.server.task_records,
        "records_large": large.server.task_records,
        "route_small": lambda: small.route(x),
        "route_large": lambda: large.route(x),
    }
    limits = {"tasks": 5 * 20, "records": 5, "route": 5}
    best: dict[str, float] = {}
    for _ in range(3):
        t = interleaved_medians(fns, repeats=7, warmup=1)
        for what in limits:
            ratio = t[f"{what}_large"] / t[f"{what}_small"]
            best[what] = min(best.get(what, ratio), ratio)
        if all(best[w] <= limit for w, limit in limits.items()):
            break
    assert all(best[w] <= limit for w, limit in limits.items()), best
