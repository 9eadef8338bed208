"""Packed versions (one safetensors blob per part), the store generation and the cached task
listing, and the bulk read of route statistics (SQLite and PostgreSQL); a store holding
versions from before packing beside packed ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from sqlalchemy import create_engine, event, select, update

from taps_cl.errors import StoreIntegrityError, UnknownTaskError
from taps_cl.storage import BulkRouteStats, TaskStore
from taps_cl.storage.models import BlobRow, VersionPartRow, VersionTensorRow
from tests._store_child import make_patch
from tests.test_store_routes import route_stats, routed_patch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _parts(url: str) -> dict[str, bytes]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(VersionPartRow.part, BlobRow.data).join(
                BlobRow, BlobRow.sha256 == VersionPartRow.blob_sha256
            )
        )
        out = {part: bytes(data) for part, data in rows}
    engine.dispose()
    return out


def test_parts_are_standard_safetensors_and_bytes_split_by_part(store, store_url):
    patch = routed_patch()
    store.commit(patch)
    parts = _parts(store_url)
    assert set(parts) == {"patch", "route"}
    route = {k: v for k, v in patch.tensors.items() if k.startswith("route.")}
    assert _same(load_safetensors(parts["route"]), route)  # any safetensors reader reads them
    assert _same(load_safetensors(parts["patch"]), patch.without("route").tensors)
    (rec,) = store.versions("flowers")
    assert rec.nbytes == patch.nbytes and rec.patch_bytes == patch.without("route").nbytes
    assert rec.route_bytes == sum(t.numel() * t.element_size() for t in route.values())
    assert rec.added_bytes == sum(map(len, parts.values()))
    assert _same(store.load("flowers").tensors, patch.tensors)


def test_route_stats_added_to_a_packed_version_replace_its_route_part(store, store_url):
    patch = make_patch()
    store.commit(patch)
    store.add_route_stats("flowers", route_stats())
    first = _parts(store_url)["route"]
    store.add_route_stats("flowers", route_stats(1), replace=True)
    assert store.route_stats("flowers").calibration.energy_mean == -4.0
    loaded = store.load("flowers")
    assert _same(loaded.without("route").tensors, patch.tensors)
    blobs = set(_blobs(store_url))
    assert len(blobs) == 2 and first not in {bytes(d) for d in _blobs(store_url).values()}
    (rec,) = store.versions("flowers")
    assert rec.routable and rec.nbytes == loaded.nbytes and rec.route_bytes > 0


def _blobs(url: str) -> dict[str, bytes]:
    engine = create_engine(url)
    with engine.connect() as conn:
        out = {sha: bytes(data) for sha, data in conn.execute(select(BlobRow.sha256, BlobRow.data))}
    engine.dispose()
    return out


def test_route_stats_many_reads_many_versions_in_a_few_queries(store, store_url):
    names = [f"t{i:02d}" for i in range(30)]
    for i, name in enumerate(names):
        store.commit(routed_patch(name, seed=i), config={"image_size": 32 + i})
    store.commit(make_patch("plain"))
    assert isinstance(store, BulkRouteStats)
    wanted = {n: 1 for n in names}
    statements = []

    def count(conn, cursor, statement, *rest) -> None:  # noqa: ANN001
        statements.append(statement)

    event.listen(store._read_engine, "before_cursor_execute", count)
    got = store.route_stats_many(wanted, base=make_patch().base_fingerprint)
    event.remove(store._read_engine, "before_cursor_execute", count)
    assert len(statements) <= 4, statements  # versions, parts (+ transaction statements)
    for i, name in enumerate(names):
        one = store.route_stats(name)
        assert _same(got[name].stats.to_tensors(), one.to_tensors())
        assert (got[name].version, got[name].config["image_size"]) == (1, 32 + i)
    base = make_patch().base_fingerprint
    with pytest.raises(UnknownTaskError, match="'t00' with version 2"):
        store.route_stats_many({"t00": 2}, base=base)
    with pytest.raises(ValueError, match="'plain' version 1 has no route statistics"):
        store.route_stats_many({"plain": 1, "t01": 1}, base=base)
    engine = create_engine(store_url)
    with engine.begin() as conn:  # a damaged route part is found by the bulk read too
        sha = conn.scalar(select(VersionPartRow.blob_sha256).where(VersionPartRow.part == "route"))
        data = conn.scalar(select(BlobRow.data).where(BlobRow.sha256 == sha))
        bad = bytes(data[:-1]) + bytes([data[-1] ^ 1])
        conn.execute(update(BlobRow).where(BlobRow.sha256 == sha).values(data=bad))
    engine.dispose()
    with pytest.raises(StoreIntegrityError, match="part 'route'.*sha256"):
        store.route_stats_many(wanted, base=base)


def test_listing_is_cached_until_any_writer_changes_the_store(store_url, tmp_path):
    a, b = TaskStore(store_url), TaskStore(store_url)
    a.commit(make_patch("cars"))
    first, again = a.list_tasks(), a.list_tasks()
    assert first == again and first is not again and first[0] is again[0]  # cached records
    b.commit(make_patch("birds"))  # another connection (as another process would)
    assert [t.name for t in a.list_tasks()] == ["birds", "cars"]
    b.add_route_stats("birds", route_stats())
    assert next(t for t in a.list_tasks() if t.name == "birds").routable
    b.register_base(make_patch().base_fingerprint, "renamed")
    assert {t.base_name for t in a.list_tasks()} == {"renamed"}
    b.delete("cars")
    assert [t.name for t in a.list_tasks()] == ["birds"]
    (tmp_path / "go").touch()
    child = subprocess.run(
        [sys.executable, "-m", "tests._store_child", "commit-loop", store_url, "deer", "1",
         str(tmp_path / "ready"), str(tmp_path / "go")],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        check=True, timeout=300,
    )  # fmt: skip
    assert child.stdout.split() == ["1"]
    assert [t.name for t in a.list_tasks()] == ["birds", "deer"]  # another process's commit
    a.close(), b.close()


def test_listing_threads_see_whole_commits(store_url):
    store = TaskStore(store_url)
    seen, errors, done = [], [], threading.Event()

    def lister() -> None:
        try:
            while not done.is_set():
                seen.append(len(store.list_tasks()))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=lister) for _ in range(3)]
    for t in threads:
        t.start()
    store.commit_many([make_patch(f"t{i}", seed=i) for i in range(3)])
    store.commit_many([make_patch(f"u{i}", seed=i) for i in range(3)])
    done.set()
    for t in threads:
        t.join()
    assert not errors and set(seen) <= {0, 3, 6}  # all of a commit or none of it
    assert len(store.list_tasks()) == 6
    store.close()


def test_store_with_versions_from_before_packing_and_packed_ones(tmp_path):
    path = tmp_path / "release.db"
    shutil.copyfile(FIXTURES / "release_store.db", path)
    store = TaskStore(path)
    records = store.list_tasks()
    base = records[0].base_fingerprint
    old = {(r.name, v.version): store.load(r.name, v.version) for r in records
           for v in store.versions(r.name)}  # fmt: skip
    patch = routed_patch("packed", seed=3)
    patch.base_fingerprint = base
    store.commit(patch)
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.scalar(select(VersionTensorRow.version_id).limit(1)) is not None
    engine.dispose()
    for (name, version), before in old.items():  # unchanged, bit for bit
        assert _same(store.load(name, version).tensors, before.tensors)
    wanted = {r.name: r.current_version for r in store.list_tasks() if r.routable}
    assert "packed" in wanted and len(wanted) == len(records) + 1
    got = store.route_stats_many(wanted, base=base)
    for name in wanted:
        assert _same(got[name].stats.to_tensors(), store.route_stats(name).to_tensors())
    store.delete("packed")
    store.delete(records[0].name)
    stats = store.stats()
    assert stats.logical_bytes >= stats.blob_bytes > 0 and stats.tasks == len(records) - 1
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        used = set(conn.scalars(select(VersionTensorRow.blob_sha256)))
        used |= set(conn.scalars(select(VersionPartRow.blob_sha256)))
    engine.dispose()
    assert set(_blobs(f"sqlite:///{path}")) == used  # nothing left unreferenced
    store.close()
