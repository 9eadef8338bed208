"""Route statistics in the task store: stored as blobs of a version, exported, deleted with it,
added later to versions of stores created before revision 0002 (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import create_engine, inspect, select

from taps_cl.config import TAPSConfig
from taps_cl.routing import Calibration, RouteStats, RouteStatsAccumulator, collect_route_stats
from taps_cl.storage import TaskStore
from taps_cl.storage.database import _alembic_config
from taps_cl.storage.models import BlobRow
from taps_cl.storage.packing import pack
from taps_cl.storage.serialize import sha256, tensor_to_bytes
from taps_cl.taps.model import TAPSModel
from tests._store_child import make_patch
from tests.tiny import tiny_cnn, tiny_images


def route_stats(seed: int = 0, classes: int = 3, dim: int = 5) -> RouteStats:
    g = torch.Generator().manual_seed(seed)
    acc = RouteStatsAccumulator(classes)
    acc.update(torch.randn(20, dim, generator=g), torch.arange(20) % classes)
    return acc.result(Calibration(20, 1.0, -3.0 - seed, 0.7))


def routed_patch(name: str = "flowers", seed: int = 0):
    patch = make_patch(name, seed=seed)
    return make_patch(name, seed=seed, tensors={**patch.tensors, **route_stats(seed).to_tensors()})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _blob_shas(url: str) -> set[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        shas = set(conn.scalars(select(BlobRow.sha256)))
    engine.dispose()
    return shas


def test_route_stats_round_trip_bit_exact_and_are_not_parameters(store):
    patch = routed_patch()
    assert patch.num_parameters == patch.without("route").num_parameters
    assert patch.nbytes > patch.without("route").nbytes
    store.commit(patch)
    loaded = store.load("flowers")
    assert _same(loaded.tensors, patch.tensors)
    (rec,) = store.versions("flowers")
    assert rec.routable and store.list_tasks()[0].routable
    assert rec.num_parameters == patch.without("route").num_parameters
    assert rec.nbytes == patch.nbytes
    stats = store.route_stats("flowers")
    assert _same(stats.to_tensors(), RouteStats.from_tensors(patch.tensors).to_tensors())
    store.commit(make_patch("plain"))
    assert not store.versions("plain")[0].routable
    with pytest.raises(ValueError, match="no route statistics"):
        store.route_stats("plain")


def test_route_stats_travel_through_export_import(store, tmp_path):
    store.commit(routed_patch())
    path = store.export("flowers", tmp_path / "flowers.safetensors")
    with TaskStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
        rec = other.import_file(path, allow_new_base=True)
        assert rec.routable
        assert _same(other.load("flowers").tensors, store.load("flowers").tensors)


def test_deleting_a_version_deletes_its_route_blobs(store, store_url):
    patch = routed_patch()
    store.commit(patch)
    route = {pack(patch.tensors)["route"].sha256}  # the packed routing statistics
    assert route <= _blob_shas(store_url)
    store.delete("flowers")
    assert not route & _blob_shas(store_url)


def test_broken_or_mismatched_route_stats_are_refused(store):
    bad = routed_patch().tensors
    bad["route.mean"] = bad["route.mean"][:2]
    with pytest.raises(ValueError, match="route mean"):
        store.commit(make_patch(tensors=bad))
    store.commit(make_patch())
    with pytest.raises(ValueError, match="for 4 classes, the task has 3"):
        store.add_route_stats("flowers", route_stats(classes=4))
    assert not store.versions("flowers")[0].routable


def _downgrade_to_0001(url: str) -> None:
    from alembic import command

    engine = create_engine(url)
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0001")
    with engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("task_versions")}
    engine.dispose()
    assert "routable" not in columns


def test_old_store_upgrades_in_place_and_gets_stats_later(store_url):
    with TaskStore(store_url) as s:
        s.commit(make_patch())
        s.commit(make_patch(seed=1))
    _downgrade_to_0001(store_url)
    with TaskStore(store_url) as s:
        assert s.schema_revision == "0004"  # through 0002, 0003 (digests computed) and 0004
        assert [v.routable for v in s.versions("flowers")] == [False, False]
        before = s.load("flowers", 1)
        assert _same(before.tensors, make_patch().tensors)
        rec = s.add_route_stats("flowers", route_stats(), version=1)
        assert rec.routable and rec.version == 1
        assert rec.num_parameters == before.num_parameters
        after = s.load("flowers", 1)
        assert _same(after.without("route").tensors, before.tensors)
        assert _same(after.kind("route"), {k[6:]: v for k, v in route_stats().to_tensors().items()})
        assert [v.routable for v in s.versions("flowers")] == [True, False]
        assert not s.list_tasks()[0].routable  # the current version is 2
        with pytest.raises(ValueError, match="already has route statistics"):
            s.add_route_stats("flowers", route_stats(1), version=1)
        old = {sha256(tensor_to_bytes(t)[0]) for t in after.kind("route").values()}
        s.add_route_stats("flowers", route_stats(1), version=1, replace=True)
        assert s.route_stats("flowers", 1).calibration.energy_mean == -4.0
        assert s.load("flowers", 1).nbytes == after.nbytes
    assert not (old - {sha256(tensor_to_bytes(route_stats(1).to_tensors()["route.count"])[0])}) & (
        _blob_shas(store_url)
    )


def test_stored_route_stats_patch_loads_into_a_model(tmp_path):
    model = TAPSModel(tiny_cnn(), TAPSConfig())
    model.add_task("a", 3)
    x, y = tiny_images(12)
    patch = model.finalize_task("a")
    stats = collect_route_stats(model, [(x, y)], "a")
    with TaskStore(tmp_path / "t.db") as s:
        s.commit(patch)
        s.add_route_stats("a", stats)
        loaded = s.load("a")
    assert "route.scatter" in loaded.tensors and loaded.num_parameters == patch.num_parameters
    fresh = TAPSModel(tiny_cnn(), TAPSConfig())
    fresh.load_patch(loaded)  # ignores the route tensors
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, task="a"), model(x, task="a"), rtol=0, atol=0)
