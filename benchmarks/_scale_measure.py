"""The measurements of ``benchmarks/scale.py`` on one store at one number of tasks.

Every function takes what it measures (an engine, a store URL, inputs) and returns plain
numbers; times are medians (the machine is shared), latencies in milliseconds.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.harness import ROOT, interleaved_medians, median_seconds, timed
from taps_cl.data import preprocess
from taps_cl.engine import Engine
from taps_cl.routing import TaskRouter

BASE = "efficientnet_lite0"


def open_engine(url: str, max_loaded: int = 16) -> Engine:
    return Engine(BASE, store=url, device="cpu", max_loaded=max_loaded)


def store_bytes(engine: Engine, url: str) -> int:
    """Bytes the store occupies: the SQLite file (and its WAL), or PostgreSQL's schema."""
    from sqlalchemy import create_engine, text

    if url.startswith("sqlite"):
        with create_engine(url).connect() as conn:  # the WAL's pages into the file first
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        path = Path(url.split("///", 1)[1])
        return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))

    sql = (
        "select coalesce(sum(pg_total_relation_size(c.oid)), 0) from pg_class c "
        "join pg_namespace n on n.oid = c.relnamespace "
        "where n.nspname = current_schema() and c.relkind in ('r', 'm')"
    )
    with create_engine(url).connect() as conn:
        return int(conn.execute(text(sql)).scalar())


def cold_loads(url: str, names: list[str], samples: int, seed: int) -> dict:
    """Load times of ``samples`` random tasks, each the first load of that task on its engine
    (store read, checks, merge). A store with fewer tasks than ``samples`` gets a fresh engine
    per pass over its tasks, so every N has the same number of samples: p99 of 40 includes
    Python's full garbage collection (it runs every few dozen loads whatever N is), which the
    max of 10 samples would mostly miss."""
    rng = random.Random(seed)
    times = []
    while len(times) < samples:
        engine = open_engine(url)
        engine.server.model  # noqa: B018 - the loader model is built once per engine
        engine.server.task_records()
        picks = rng.sample(names, min(samples - len(times), len(names)))
        times += [1e3 * timed(lambda n=n, e=engine: e.server.served(n))[1] for n in picks]
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return {"cold_load_p50_ms": statistics.median(times), "cold_load_p99_ms": p99}


def latencies(engines: dict[int, Engine], name: str, inputs: dict, repeats: int) -> dict:
    """Per store (``engines`` by size), interleaved: ``tasks()``, ``versions()``, a warm predict
    of one image, and ``Engine.route`` of 64 images from one real task and from two (32 + 32).
    A round of these takes longer than ``version_ttl``, so each call also re-reads the task list
    once; the warm predict and ``tasks()`` are measured again back to back."""
    a, b = list(inputs)
    one, two = inputs[a][:64], torch.cat([inputs[a][:32], inputs[b][:32]])
    fns, groups = {}, {}
    for n, engine in engines.items():
        engine.predict(name, one[:1])
        engine.route(one)  # routers built, tasks loaded
        groups[n] = [len(set(engine.route(batch).tasks)) for batch in (one, two)]
        fns[(n, "tasks_ms")] = engine.tasks
        fns[(n, "versions_ms")] = lambda e=engine: e.versions(name)
        fns[(n, "warm_predict_1_ms")] = lambda e=engine: e.predict(name, one[:1])
        fns[(n, "route64_1task_ms")] = lambda e=engine: e.route(one)
        fns[(n, "route64_2tasks_ms")] = lambda e=engine: e.route(two)
    times = interleaved_medians(fns, repeats, warmup=1)
    out: dict[int, dict] = {n: {"route64_tasks_in_batch": groups[n]} for n in engines}
    for n, engine in engines.items():  # back to back: within version_ttl, the list is cached
        engine.refresh()
        warm = median_seconds(lambda e=engine: e.predict(name, one[:1]), 2 * repeats, warmup=1)
        out[n]["warm_predict_cached_1_ms"] = 1e3 * warm
        # the listing back to back too: interleaved, each call follows another store's routed
        # batch, whose pass over every class's row leaves the CPU caches cold (larger N, colder)
        listing = median_seconds(engine.tasks, 2 * repeats, warmup=1)
        out[n]["tasks_back_to_back_ms"] = 1e3 * listing
    for (n, key), seconds in times.items():
        out[n][key] = 1e3 * seconds
    return out


def router_costs(engine: Engine, extra: tuple[str, object], z: torch.Tensor) -> dict:
    """Router build from every task's statistics (store read apart from the math: one bulk
    read, as a server building its router does; build = the router plus its first route of
    ``z``), and adding one task to the built router until it routes (derive, then the first
    route: stale, only the added task's classes solved; and with ``exact=True``, every class
    solved again), and removing one (stale)."""
    wanted = {r.name: r.current_version for r in engine.tasks() if r.routable}
    records, read = timed(lambda: engine.store.route_stats_many(wanted, base=engine.fingerprint))
    stats = {n: rec.stats for n, rec in records.items()}
    router, build = timed(lambda: TaskRouter(stats))
    _, first = timed(lambda: router.route(z))
    derived, derive = timed(lambda: router.derive({extra[0]: extra[1]}))
    _, ready = timed(lambda: derived.route(z))
    exact, exact_derive = timed(lambda: router.derive({extra[0]: extra[1]}, exact=True))
    _, exact_ready = timed(lambda: exact.route(z))
    removed, remove = timed(lambda: router.derive(remove=[list(wanted)[-1]]))
    _, remove_ready = timed(lambda: removed.route(z))
    return {
        "route_stats_read_ms": 1e3 * read,
        "router_build_ms": 1e3 * (build + first),
        "router_add_one_pool_ms": 1e3 * derive,
        "router_add_one_ready_ms": 1e3 * (derive + ready),
        "router_add_one_exact_ms": 1e3 * (exact_derive + exact_ready),
        "router_remove_one_ready_ms": 1e3 * (remove + remove_ready),
        "router_bytes": derived.nbytes,
        "router_classes": int(derived._table().task_of.numel()),
    }


def routed_components(engine: Engine, x: torch.Tensor, k: int, repeats: int) -> dict:
    """A batch of 64 routed to ``k`` tasks, in parts: base features, the router's scores over
    every stored task, and each of the ``k`` tasks' forward on its 64 / k rows (warm)."""
    server = engine.server
    names = [r.name for r in engine.tasks() if r.routable][:k]
    cand = engine.routing.candidates(None)
    prep = next(iter(cand.preps.values()))
    xs = preprocess(x[:64], prep, prep.input_size)
    z = server.features(xs)
    groups = xs.tensor_split(k)
    for n in names:
        server.served(n)

    def forwards() -> None:
        for n, g in zip(names, groups, strict=True):
            server.task_logits(n, cand.versions[n], g)

    return {
        f"route64_{k}tasks_features_ms": 1e3 * median_seconds(lambda: server.features(xs), repeats),
        f"route64_{k}tasks_scores_ms": 1e3 * median_seconds(lambda: cand.router.route(z), repeats),
        f"route64_{k}tasks_forwards_ms": 1e3 * median_seconds(forwards, repeats),
    }


def task_id(engine: Engine, tests: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Share of each real task's test images routed to that task among all stored tasks."""
    out = {}
    for name, (x, _) in tests.items():
        routed = engine.route(x)
        out[name] = sum(t == name for t in routed.tasks) / len(routed.tasks)
    return {"task_id": out, "task_id_mean": statistics.mean(out.values())}


def rss_child(url: str, images: str, loads: int) -> dict:
    """Resident memory of a fresh process serving the store with ``max_loaded=16``: router
    built (a routed batch), ``loads`` tasks served in turn (the LRU keeps 16)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from benchmarks._scale_measure import _rss_main;"
        "print(json.dumps(_rss_main(*sys.argv[2:])))"
    )
    args = [sys.executable, "-c", code, str(ROOT), url, images, str(loads)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_main(url: str, images: str, loads: str) -> dict:
    import psutil
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    proc = psutil.Process()
    engine = open_engine(url, max_loaded=16)
    x = load_file(images)["x"]
    engine.server.model  # noqa: B018 - the loader model
    start = proc.memory_info().rss
    engine.route(x)
    routed = proc.memory_info().rss
    names = [r.name for r in engine.tasks()]
    for name in names[: int(loads)]:
        engine.server.served(name)
    return {
        "rss_base_mb": start / 1e6,
        "rss_routed_mb": routed / 1e6,
        "rss_served_mb": proc.memory_info().rss / 1e6,
        "loaded": len(engine.server.loaded()),
    }
