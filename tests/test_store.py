"""The SQL task store, run against an SQLite file and a real throwaway PostgreSQL cluster."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, select, text, update

from taps_cl.bases import fingerprint
from taps_cl.errors import (
    BaseMismatchError,
    StoreIntegrityError,
    StoreVersionError,
    TAPSError,
    UnknownBaseError,
    UnknownTaskError,
)
from taps_cl.storage import TaskStore, ops
from taps_cl.storage.database import VERSION_TABLE
from taps_cl.storage.models import BlobRow, Model, VersionPartRow
from taps_cl.storage.packing import pack
from taps_cl.taps.model import TAPSModel
from tests._store_child import BASE, make_patch
from tests.tiny import tiny_cnn, tiny_images

ROOT = Path(__file__).resolve().parents[1]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _stored(tensors: dict) -> int:
    """Bytes a packed version of ``tensors`` stores (its parts' safetensors blobs)."""
    return sum(len(p.data) for p in pack(tensors).values())


def _child(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests._store_child", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- basic behaviour ---------------------------------------------------------------------------


def test_commit_load_round_trip_is_exact(store):
    patch = make_patch()
    assert store.commit(patch, metrics={"acc": 0.75}, config={"epochs": 3}) == 1
    loaded = store.load("flowers")
    assert loaded.version == 1
    assert _same(loaded.tensors, patch.tensors)  # bfloat16, float16, int64 0-d included
    assert loaded.tensors["score.conv1"].shape == ()
    assert loaded.class_names == ["a", "b", "c"] and loaded.active_layers == ["conv1", "fc"]
    assert loaded.config == {"tau": 0.1, "lam": 1.0, "epochs": 3}
    assert (loaded.num_layers, loaded.base_fingerprint) == (3, BASE)


def test_versions_count_up_and_old_ones_stay_loadable(store):
    patches = [make_patch(seed=i) for i in range(3)]
    assert [store.commit(p, metrics={"acc": i / 10}) for i, p in enumerate(patches)] == [1, 2, 3]
    records = store.versions("flowers")
    assert [r.version for r in records] == [1, 2, 3]
    assert [r.metrics["acc"] for r in records] == [0.0, 0.1, 0.2]
    assert records[0].active_layers == ["conv1", "fc"] and records[0].nbytes == patches[0].nbytes
    assert records[0].num_parameters == patches[0].num_parameters
    assert _same(store.load("flowers", 1).tensors, patches[0].tensors)
    assert store.load("flowers").version == 3
    (task,) = store.list_tasks()
    assert (task.name, task.current_version, task.num_versions) == ("flowers", 3, 3)
    assert (task.num_classes, task.base_fingerprint) == (3, BASE)


def test_recommit_stores_identical_content_once(store):
    # Versions are packed (one safetensors blob per part, storage/packing.py): identical
    # parts are stored once, a changed tensor stores its part anew.
    first = make_patch()
    store.commit(first)
    store.commit(make_patch())
    tensors = dict(first.tensors, **{"head.weight": torch.randn(3, 16)})
    store.commit(make_patch(tensors=tensors))
    v1, v2, v3 = store.versions("flowers")
    size1, size3 = _stored(first.tensors), _stored(tensors)
    assert (v1.added_bytes, v2.added_bytes, v3.added_bytes) == (size1, 0, size3)
    assert v1.nbytes == v2.nbytes == first.nbytes  # the tensors' bytes, not the blobs'
    stats = store.stats()
    assert stats.blob_bytes == size1 + size3
    assert stats.dedup_saved_bytes == size1 > first.nbytes
    assert (stats.tasks, stats.versions, stats.tensors) == (1, 3, 3 * len(first.tensors))


def test_delete_version_and_task_collects_unused_blobs(store):
    first = make_patch()
    store.commit(first)
    store.commit(make_patch(tensors=dict(first.tensors, **{"head.bias": torch.ones(3)})))
    assert store.delete("flowers", 2) == [2]
    assert store.stats().blob_bytes == _stored(first.tensors)  # the v2-only blob is gone
    assert store.commit(make_patch(seed=5)) == 3  # deleted numbers are not reused
    assert store.delete("flowers") == [1, 3]
    stats = store.stats()
    assert (stats.tasks, stats.versions, stats.blobs) == (0, 0, 0)
    with pytest.raises(UnknownTaskError):
        store.load("flowers")


def test_unknown_names_versions_and_bad_input_raise_clear_errors(store):
    store.commit(make_patch())
    with pytest.raises(UnknownTaskError, match="no task 'cars'.*flowers"):
        store.load("cars")
    with pytest.raises(UnknownTaskError, match=r"no version 7; versions: \[1\]"):
        store.load("flowers", 7)
    with pytest.raises(ValueError, match="invalid task name"):
        store.load("x'; DROP TABLE tasks; --")
    with pytest.raises(ValueError, match="version must be"):
        store.load("flowers", 0)
    with pytest.raises(ValueError, match="JSON"):
        store.commit(make_patch(), metrics={"acc": float("nan")})
    assert issubclass(UnknownTaskError, TAPSError) and issubclass(StoreIntegrityError, TAPSError)
    assert [r.version for r in store.versions("flowers")] == [1]


def test_same_task_name_on_two_bases_needs_base(store):
    other = "c" * 64
    store.commit(make_patch())
    store.commit(make_patch(seed=1, base=other))
    with pytest.raises(ValueError, match="several bases"):
        store.load("flowers")
    assert store.load("flowers", base=other).base_fingerprint == other
    assert len(store.list_tasks()) == 2 and len(store.list_tasks(base=other)) == 1


# -- atomicity and integrity -------------------------------------------------------------------


def test_error_mid_commit_leaves_no_trace(store, monkeypatch):
    store.commit(make_patch())
    before = store.stats()
    original = ops.insert_tensor_rows

    def insert_then_fail(session, version_id, encoded):
        original(session, version_id, encoded)
        raise RuntimeError("boom")

    monkeypatch.setattr(ops, "insert_tensor_rows", insert_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        store.commit(make_patch(seed=1))
    with pytest.raises(RuntimeError, match="boom"):
        store.commit(make_patch("cars", seed=2))
    assert store.stats() == before
    assert [t.name for t in store.list_tasks()] == ["flowers"]
    monkeypatch.undo()
    assert store.commit(make_patch(seed=1)) == 2


def test_commit_many_is_all_or_nothing(store, monkeypatch):
    original, calls = ops.insert_version, []

    def fail_on_second(session, prep):
        calls.append(prep.patch.name)
        if len(calls) == 2:
            raise RuntimeError("second patch failed")
        return original(session, prep)

    monkeypatch.setattr(ops, "insert_version", fail_on_second)
    patches = [make_patch("cars"), make_patch("birds", seed=1)]
    with pytest.raises(RuntimeError, match="second patch"):
        store.commit_many(patches)
    assert store.list_tasks() == [] and store.stats().blobs == 0
    monkeypatch.undo()
    assert store.commit_many(patches, metrics={"cars": {"acc": 0.5}}) == [1, 1]
    assert store.versions("cars")[0].metrics == {"acc": 0.5}
    with pytest.raises(ValueError, match="same task twice"):
        store.commit_many([make_patch("cars"), make_patch("cars", seed=3)])


def test_commit_many_with_new_base_weights_is_all_or_nothing(store, monkeypatch):
    weights = tiny_cnn(seed=7).state_dict()
    fp = fingerprint(tiny_cnn(seed=7))
    patch = make_patch("cars")
    patch.base_fingerprint = fp

    def fail(session, prep):
        raise RuntimeError("patch failed")

    monkeypatch.setattr(ops, "insert_version", fail)
    with pytest.raises(RuntimeError, match="patch failed"):
        store.commit_many([patch], base_weights=(fp, weights, "joint", "test"))
    assert store.list_bases() == [] and store.stats().blobs == 0
    monkeypatch.undo()
    assert store.commit_many([patch], base_weights=(fp, weights, "joint", "test")) == [1]
    assert store.base(fp).has_weights and store.base(fp).name == "joint"
    loaded = store.load_base_weights(fp)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


@pytest.mark.parametrize("damage", ["tamper", "truncate"])
def test_damaged_blob_raises_integrity_error_naming_the_part(store, store_url, damage):
    store.commit(make_patch())
    engine = create_engine(store_url)
    with engine.begin() as conn:
        sha, data = conn.execute(
            select(BlobRow.sha256, BlobRow.data)
            .join(VersionPartRow, VersionPartRow.blob_sha256 == BlobRow.sha256)
            .where(VersionPartRow.part == "patch")
        ).one()
        bad = data[:-4] if damage == "truncate" else bytes([data[0] ^ 1]) + data[1:]
        conn.execute(update(BlobRow).where(BlobRow.sha256 == sha).values(data=bad))
    engine.dispose()
    with pytest.raises(StoreIntegrityError, match="'flowers' version 1, part 'patch'"):
        store.load("flowers")


def test_newer_schema_is_refused(store_url):
    TaskStore(store_url).close()
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(StoreVersionError, match="'9999_future', newer than this taps_cl"):
        TaskStore(store_url)


def test_migrations_create_exactly_the_orm_schema(store, store_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(store_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert compare_metadata(ctx, Model.metadata) == []
    engine.dispose()


def test_sqlite_store_uses_wal_and_default_location(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_CL_STORE", str(tmp_path / "env.db"))
    with TaskStore() as s:
        assert s.url == f"sqlite:///{tmp_path / 'env.db'}"
        with s._read_engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        blocker = sqlite3.connect(tmp_path / "env.db", timeout=0, isolation_level=None)
        with s._writer.begin() as session:  # writes take the lock up front (BEGIN IMMEDIATE)
            session.execute(text("SELECT 1"))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                blocker.execute("BEGIN IMMEDIATE")
        blocker.close()
    monkeypatch.delenv("TAPS_CL_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    with TaskStore() as s:
        assert s.url.endswith("xdg/taps_cl/tasks.db") and (tmp_path / "xdg/taps_cl").is_dir()


# -- files, bases, models ----------------------------------------------------------------------


def test_export_import_between_stores(store, tmp_path):
    patch = make_patch()
    store.commit(make_patch(seed=7))
    store.commit(patch, metrics={"acc": 0.9})
    store.register_base(BASE, "tiny", "tests", 1234)
    path = store.export("flowers", tmp_path / "flowers.safetensors")
    with TaskStore(tmp_path / "other.db") as other:
        with pytest.raises(UnknownBaseError, match=f"base {BASE} = tiny \\(tests\\)"):
            other.import_file(path)
        other.register_base(BASE, "tiny", "tests")
        record = other.import_file(path)
        assert (record.name, record.version, record.metrics) == ("flowers", 1, {"acc": 0.9})
        assert _same(other.load("flowers").tensors, patch.tensors)
    with TaskStore(tmp_path / "third.db") as third:
        third.import_file(path, allow_new_base=True)
        assert third.base(BASE).name == "tiny" and third.base(BASE).num_parameters == 1234
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip a byte of the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreIntegrityError, match="fails its sha256"):
        store.import_file(path)


def test_base_weights_round_trip_through_blobs(store):
    model = tiny_cnn(seed=3)
    fp, state = fingerprint(model), model.state_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        store.save_base_weights("d" * 64, state)
    record = store.save_base_weights(fp, state, name="joint-base")
    assert record.has_weights and record.name == "joint-base"
    loaded = store.load_base_weights(fp)
    assert list(loaded) == list(state) and _same(loaded, dict(state))
    fresh = tiny_cnn(seed=4)
    fresh.load_state_dict(loaded)
    assert fingerprint(fresh) == fp
    with pytest.raises(UnknownBaseError):
        store.load_base_weights("e" * 64)


def _tiny_task_model() -> tuple[TAPSModel, torch.Tensor]:
    torch.manual_seed(1)
    model = TAPSModel(tiny_cnn(seed=0))
    model.add_task("digits", 3, class_names=["x", "y", "z"])
    with torch.no_grad():
        for i, (_, layer) in enumerate(model.layers()):
            layer.delta["digits"].normal_(0, 0.05)
            layer.score["digits"].fill_(0.0 if i == 1 else 0.5)  # gate of layer 1 off
        for _, norm in model.norms():
            for p in norm.tasks["digits"].parameters():
                p.add_(torch.randn_like(p) * 0.1)
    model.finalize_task("digits")
    model.eval()
    with torch.no_grad():
        return model, model(tiny_images(8)[0], task="digits")


def test_patch_round_trips_to_a_new_process_exactly(store, store_url, tmp_path):
    from safetensors.torch import save_file

    model, out = _tiny_task_model()
    patch = model.export_patch("digits")
    assert len(patch.active_layers) == model.num_layers - 1 and "delta.conv2" not in patch.tensors
    store.commit(patch)
    save_file({"out": out}, str(tmp_path / "expected.safetensors"))
    child = _child("roundtrip", store_url, "digits", str(tmp_path / "expected.safetensors"))
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    assert stdout.strip() == "EQUAL"


def test_loading_onto_another_base_raises_base_mismatch(store):
    model, _ = _tiny_task_model()
    store.commit(model.export_patch("digits"))
    other = TAPSModel(tiny_cnn(seed=1))
    with pytest.raises(BaseMismatchError, match="trained on base"):
        other.load_patch(store.load("digits"))


# -- several processes -------------------------------------------------------------------------


def test_two_processes_committing_at_once_get_distinct_versions(store, store_url, tmp_path):
    # This process and one child commit n versions each of the same task at the same time.
    n, go, ready = 8, tmp_path / "go", tmp_path / "ready"
    child = _child("commit-loop", store_url, "race", str(n), str(ready), str(go))
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and child.poll() is None, child.communicate()[1]
        time.sleep(0.01)
    go.touch()
    mine = [store.commit(make_patch("race", seed=100 + i)) for i in range(n)]
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    theirs = [int(v) for v in out.split()]
    assert sorted(mine + theirs) == list(range(1, 2 * n + 1))
    assert [r.version for r in store.versions("race")] == list(range(1, 2 * n + 1))


def test_process_killed_mid_commit_leaves_no_trace(store, store_url, tmp_path):
    store.commit(make_patch("cars"))
    before = store.stats()
    marker = tmp_path / "inside"
    child = _child("hang", store_url, "cars", str(marker))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert [r.version for r in store.versions("cars")] == [1]  # not visible while open
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert [r.version for r in store.versions("cars")] == [1]
    assert store.stats() == before
    assert store.commit(make_patch("cars", seed=3)) == 2
