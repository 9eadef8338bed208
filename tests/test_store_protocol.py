"""The store seam: an Engine trains, serves and routes on any object implementing TaskStoreAPI.

``MemoryStore`` is a second backend in a few dozen lines (everything in dicts); nothing in it
is SQL, and the engine never notices the difference."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest
import torch

from taps_cl.bases import Base, Preprocessing
from taps_cl.config import TAPSConfig
from taps_cl.engine import Engine
from taps_cl.errors import UnknownBaseError, UnknownTaskError
from taps_cl.routing import RouteStats
from taps_cl.storage import BaseRecord, StoredTask, TaskStore, TaskStoreAPI, VersionRecord
from tests.test_engine import FAST
from tests.test_route import bright, dark
from tests.tiny import tiny_cnn

NOW = datetime(2024, 1, 1, tzinfo=timezone.utc)


class MemoryStore:
    """Versions in a dict; ``load`` hands out copies (the caller owns what it gets)."""

    url = "memory://"
    readonly = False

    def __init__(self) -> None:
        self.bases: dict[str, BaseRecord] = {}
        self.layouts: dict[str, dict] = {}
        self.tasks: dict[tuple[str, str], dict[int, tuple]] = {}  # (fp, name) -> v -> row

    def register_base(self, fingerprint, name, source="", num_parameters=None, *, layout=None):
        self.bases[fingerprint] = BaseRecord(fingerprint, name, source, num_parameters, False, NOW)
        if layout is not None:
            self.layouts[fingerprint] = dict(layout)
        return self.bases[fingerprint]

    def base(self, fingerprint):
        if fingerprint not in self.bases:
            raise UnknownBaseError(f"no base {fingerprint}")
        return self.bases[fingerprint]

    def base_layout(self, fingerprint):
        return self.layouts.get(self.base(fingerprint).fingerprint)

    def set_base_layout(self, fingerprint, layout):
        self.layouts[self.base(fingerprint).fingerprint] = dict(layout)

    def load_base_weights(self, fingerprint):
        raise UnknownBaseError("this store keeps no base weights")

    def commit(self, patch, *, metrics=None, config=None):
        return self.commit_many([patch], metrics={patch.name: metrics or {}}, config=config)[0]

    def commit_many(self, patches, *, metrics=None, config=None, base_weights=None):
        if base_weights is not None:
            raise NotImplementedError("this store keeps no base weights")
        out = []
        for patch in patches:
            rows = self.tasks.setdefault((patch.base_fingerprint, patch.name), {})
            version = max(rows, default=0) + 1
            tensors = {k: v.detach().clone() for k, v in patch.tensors.items()}
            cfg = {**patch.config, **(config or {})}
            rows[version] = (patch, tensors, dict((metrics or {}).get(patch.name, {})), cfg)
            out.append(version)
        return out

    def _rows(self, name, base):
        found = [(fp, n) for fp, n in self.tasks if n == name and base in (None, fp)]
        if not found:
            raise UnknownTaskError(f"no task {name!r} in {self.url}")
        return found[0][0], self.tasks[found[0]]

    def load(self, name, version=None, *, base=None):
        _, rows = self._rows(name, base)
        version = version or max(rows)
        patch, tensors, _, config = rows[version]
        copied = {k: v.clone() for k, v in tensors.items()}
        return dataclasses.replace(patch, tensors=copied, config=dict(config), version=version)

    def list_tasks(self, *, base=None):
        out = []
        for (fp, name), rows in sorted(self.tasks.items(), key=lambda kv: kv[0][1]):
            if base in (None, fp):
                p, tensors, _, _ = rows[max(rows)]
                counts = (max(rows), len(rows), p.num_classes, p.class_names, p.num_parameters)
                routable = RouteStats.has_stats(tensors)
                out.append(StoredTask(name, fp, "tiny", *counts, p.nbytes, NOW, NOW, routable))
        return out

    def versions(self, name, *, base=None):
        fp, rows = self._rows(name, base)
        return [
            VersionRecord(
                name,
                v,
                fp,
                p.num_classes,
                p.num_layers,
                list(p.active_layers),
                p.num_parameters,
                p.nbytes,
                p.nbytes,
                m,
                c,
                NOW,
                RouteStats.has_stats(t),
            )  # fmt: skip
            for v, (p, t, m, c) in sorted(rows.items())
        ]

    def route_stats(self, name, version=None, *, base=None):
        _, rows = self._rows(name, base)
        tensors = rows[version or max(rows)][1]
        return RouteStats.from_tensors({k: v for k, v in tensors.items() if k.startswith("route.")})

    def delete(self, name, version=None, *, base=None):
        fp, rows = self._rows(name, base)
        gone = [version] if version else sorted(rows)
        for v in gone:
            del rows[v]
        if not rows:
            del self.tasks[(fp, name)]
        return gone

    def stats(self):
        raise NotImplementedError

    def add_route_stats(self, name, stats, version=None, *, base=None, replace=False):
        raise NotImplementedError

    def export(self, name, path, version=None, *, base=None, allow_symlink=False):
        raise NotImplementedError

    def import_file(self, path, *, allow_new_base=False, layout=None):
        raise NotImplementedError


def _base() -> Base:
    return Base(tiny_cnn(), "tiny", "tests.tiny", Preprocessing(input_size=16))


def test_engine_trains_serves_and_routes_on_another_store_backend():
    store = MemoryStore()
    assert isinstance(store, TaskStoreAPI)
    engine = Engine(_base(), store=store, train=FAST, config=TAPSConfig(lam=0.5))
    assert engine.store is store and store.bases[engine.fingerprint].name == "tiny"
    assert store.base_layout(engine.fingerprint) == engine.patch_layout()
    (xa, ya), (xb, yb) = dark(48), bright(48)
    rec = engine.add_task((xa, ya), name="dark", quiet=True)
    engine.add_task((xb, yb), name="bright", quiet=True)
    assert rec.version == 1 and store.versions("dark")[0].routable
    logits = engine.predict("dark", xa, logits=True)
    assert logits.shape == (48, 3)
    with torch.no_grad():  # served from the store's copy: what the merged module computes
        merged = engine.model("dark")(engine.preprocess(xa, "dark"))
    assert torch.allclose(merged, logits, atol=1e-5)
    routed = engine.route(torch.cat([dark(20, seed=7)[0], bright(20, seed=8)[0]]))
    assert sum(t == u for t, u in zip(routed.tasks, ["dark"] * 20 + ["bright"] * 20,
                                      strict=True)) >= 36  # fmt: skip
    assert routed.versions == {"bright": 1, "dark": 1}
    fresh = Engine(_base(), store=store)  # another engine on the same store reads it back
    assert torch.equal(fresh.predict("dark", xa, logits=True), logits)
    assert engine.remove_task("bright") == [1] and [t.name for t in engine.tasks()] == ["dark"]


def test_engine_refuses_a_store_that_lacks_members(tmp_path):
    class Partial:
        url, readonly = "partial://", False

        def load(self, name):
            return None

    with pytest.raises(TypeError, match="TaskStoreAPI.*commit_many"):
        Engine(_base(), store=Partial())
    with TaskStore(tmp_path / "s.db") as sql:
        assert isinstance(sql, TaskStoreAPI)  # the SQL store is one implementation
