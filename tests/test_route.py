"""Engine.route (task-free prediction) and its CLI on the tiny CNN engine with two very
different tasks: dark reddish images (task "dark") and bright images without red ("bright")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import taps_cl
from taps_cl.cli import main
from taps_cl.errors import UnknownTaskError
from taps_cl.routing import TaskRouter
from taps_cl.serving import TaskServer
from taps_cl.storage import TaskStore
from tests.test_engine import tiny_engine
from tests.tiny import tiny_images


def dark(n: int, seed: int = 1):
    x, y = tiny_images(n, 3, seed=seed)
    return x * 0.3, y


def bright(n: int, seed: int = 2):
    x, y = tiny_images(n, 2, seed=seed)
    x = 1 - x * 0.3
    x[:, 0] = 0
    return x, y


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.fixture
def engine(store):
    engine = tiny_engine(store)
    engine.add_task(dark(48), name="dark", class_names=["d0", "d1", "d2"], quiet=True)
    engine.add_task(bright(48), name="bright", quiet=True)
    return engine


class ForwardSpy:
    """Counts the server's forwards per task (None = base features) and the inputs each saw."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str | None, int]] = []
        self.mixed: list[tuple[list, list[int]]] = []  # (versions, each row's slot)
        logits, features, mixed = TaskServer.logits, TaskServer.features, TaskServer.mixed_logits

        def spy_logits(server, entry, x):
            self.calls.append((entry.name, x.shape[0]))
            return logits(server, entry, x)

        def spy_features(server, x):
            self.calls.append((None, x.shape[0]))
            return features(server, x)

        def spy_mixed(server, keys, x, rows, **kw):  # (kw: resume, the routing pass)
            self.mixed.append((list(keys), rows.tolist()))
            return mixed(server, keys, x, rows, **kw)

        monkeypatch.setattr(TaskServer, "logits", spy_logits)
        monkeypatch.setattr(TaskServer, "mixed_logits", spy_mixed)
        monkeypatch.setattr(TaskServer, "features", spy_features)


def test_route_picks_the_right_task_and_matches_predict(engine):
    (xa, _), (xb, _) = dark(40, seed=7), bright(40, seed=8)
    routed = engine.route(torch.cat([xa, xb]))
    truth = ["dark"] * 40 + ["bright"] * 40
    assert np.mean([t == u for t, u in zip(routed.tasks, truth, strict=True)]) >= 0.9
    assert routed.labels.shape == (80,) and routed.confidence.shape == (80,)
    assert bool(((routed.confidence > 0) & (routed.confidence <= 1)).all())
    x = torch.cat([xa, xb])
    for name in ("dark", "bright"):
        idx = [i for i, t in enumerate(routed.tasks) if t == name]
        assert torch.equal(routed.labels[idx], engine.predict(name, x[idx]))
    names = {t: n for t, n in zip(routed.tasks, routed.class_names, strict=True)}
    assert names["dark"] in ("d0", "d1", "d2") and names["bright"] is None
    assert routed.versions == {"bright": 1, "dark": 1}


@pytest.mark.parametrize("method", ["lda", "combined"])
def test_each_chosen_patch_runs_once_on_its_group(engine, monkeypatch, method):
    x = torch.cat([dark(6, seed=3)[0], bright(5, seed=4)[0]])
    engine.route(x, method=method)  # warm: router built, patches loaded
    spy = ForwardSpy(monkeypatch)
    routed = engine.route(x, method=method)
    assert spy.calls.count((None, 11)) == 1  # one base forward for the features
    per_task = [task for task, _ in spy.calls if task is not None]
    assert sorted(per_task) == sorted(set(per_task))  # each patch at most once
    if method == "lda":  # no merged forward per group: ONE mixed forward over every row
        assert per_task == [] and len(spy.mixed) == 1
        keys, slots = spy.mixed[0]
        assert [keys[s][0] for s in slots] == routed.tasks
        assert sorted(keys) == sorted((t, 1) for t in set(routed.tasks))


def test_tasks_restriction_unknown_and_bad_input(engine):
    x = bright(8, seed=9)[0]
    assert engine.route(x, tasks=["dark"]).tasks == ["dark"] * 8
    with pytest.raises(UnknownTaskError, match="nope"):
        engine.route(x, tasks=["nope"])
    with pytest.raises(ValueError, match="channel"):
        engine.route(torch.rand(2, 5, 16, 16))
    with pytest.raises(ValueError):
        engine.route(torch.rand(0, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown routing method"):
        engine.route(x, method="vote")


def test_router_cached_until_versions_change(engine, monkeypatch):
    x = dark(4)[0]
    engine.route(x)
    first = engine.routing.candidates(None).router
    queries = []
    list_tasks = engine.store.list_tasks
    monkeypatch.setattr(
        engine.store, "list_tasks", lambda **kw: queries.append(1) or list_tasks(**kw)
    )
    engine.route(x)
    assert len(queries) == 0  # current versions are cached (version_ttl), nothing else read
    engine.refresh()
    engine.route(x)
    assert len(queries) == 1  # after refresh(): one query for the task versions
    assert engine.routing.candidates(None).router is first
    engine.add_task(dark(24, seed=5), name="dark", quiet=True)
    assert engine.route(x).versions["dark"] == 2
    assert engine.routing.candidates(None).router is not first


def test_no_routable_task_then_add_route_stats(store):
    engine = tiny_engine(store)
    x, y = dark(32)
    engine.add_task((x, y), name="dark", quiet=True)
    plain = engine.load_patch("dark").without("route")
    TaskStore(store).commit(plain)  # a version 2 stored without statistics (as before routing)
    with pytest.raises(ValueError, match="route-stats"):
        engine.route(x)
    record = engine.add_route_stats("dark", (x, y))
    assert record.version == 2 and record.routable
    assert engine.route(x).versions == {"dark": 2}


def test_tasks_trained_at_different_sizes(store):
    from taps_cl.config import TrainConfig

    engine = tiny_engine(store)
    engine.add_task(dark(48), name="dark", quiet=True)
    engine.add_task(bright(48), name="bright", quiet=True,
                    train=TrainConfig(epochs=2, batch_size=8, lr=1e-2, image_size=24))  # fmt: skip
    assert engine.image_size("bright") == 24
    (xa, _), (xb, _) = dark(20, seed=7), bright(20, seed=8)
    routed = engine.route(torch.cat([xa, xb]))
    assert np.mean([t == u for t, u in zip(routed.tasks, ["dark"] * 20 + ["bright"] * 20,
                                           strict=True)]) >= 0.9  # fmt: skip


def test_router_features_per_task_equal_shared_features():
    g = torch.Generator().manual_seed(0)
    from taps_cl.routing import RouteStatsAccumulator

    stats = {}
    for t, name in enumerate(("a", "b")):
        acc = RouteStatsAccumulator(2)
        acc.update(torch.randn(40, 4, generator=g) + 3 * t, torch.arange(40) % 2)
        stats[name] = acc.result()
    router = TaskRouter(stats)
    z = torch.randn(10, 4, generator=g)
    same = router.route({"a": z, "b": z})
    assert torch.equal(same.scores, router.route(z).scores)
    other = router.route({"a": z, "b": z + 3})
    assert torch.allclose(other.scores[:, 0], same.scores[:, 0])
    assert not torch.allclose(other.scores[:, 1], same.scores[:, 1])


def test_module_level_route(engine):
    taps_cl.configure(base=engine.base, store=engine.store)
    try:
        routed = taps_cl.route(dark(4, seed=11)[0], tasks=["dark", "bright"])
        assert isinstance(routed, taps_cl.Routed) and len(routed.tasks) == 4
    finally:
        taps_cl.configure()


def _png_folder(root: Path, x: torch.Tensor) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        path = root / f"{i}.png"
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _class_folder(root: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    for c in y.unique().tolist():
        _png_folder(root / f"c{c}", x[y == c])
    return root


def test_cli_predict_routes_without_task_and_route_stats(tmp_path, capsys):
    from taps_cl.config import TrainConfig
    from taps_cl.engine import Engine

    store = str(tmp_path / "cli.db")
    base = ["--base", "timm-random:test_efficientnet", "--store", store, "--quiet"]
    engine = Engine("timm-random:test_efficientnet", store=store,
                    train=TrainConfig(epochs=1, batch_size=8, image_size=32))  # fmt: skip
    folders = {
        "dark": _class_folder(tmp_path / "dark", *dark(24)),
        "bright": _class_folder(tmp_path / "bright", *bright(24)),
    }
    for name, folder in folders.items():
        engine.add_task(str(folder), name=name, quiet=True)
    files = sorted(str(p) for p in (tmp_path / "bright").glob("c1/*.png"))[:3]
    assert main(["predict", *files, *base]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [r[0] for r in rows] == files and all(r[1] in folders for r in rows)
    assert all(r[2] in ("c0", "c1") and 0 < float(r[3]) <= 1 for r in rows)
    assert main(["predict", "--task", "dark", *files, *base]) == 0
    with_option = capsys.readouterr().out
    assert main(["predict", "dark", *files, *base]) == 0  # the old positional form
    assert capsys.readouterr().out == with_option and len(with_option.splitlines()) == 3
    TaskStore(store).commit(engine.load_patch("dark").without("route"))
    assert main(["tasks", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert "routable" in listing and "no" in listing.split("dark")[1].split("\n")[0]
    assert main(["predict", *files, *base, "--tasks", "dark"]) == 2
    assert "route-stats" in capsys.readouterr().err
    assert main(["route-stats", "dark", "--data", str(folders["dark"]), *base]) == 0
    assert "v2 is routable" in capsys.readouterr().out
    assert TaskStore(store).versions("dark")[-1].routable
