"""Stores written before compact routing statistics route exactly as they did, new versions
store compact statistics and route beside old ones, and removing a task through the Engine
routes as if it had never been added."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_engine import tiny_engine
from tests.test_route import bright, dark

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "old_route_expected.json").read_text())


def _maker():
    spec = importlib.util.spec_from_file_location("make_old", FIXTURES / "make_old_route_store.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def old_store(tmp_path: Path) -> str:
    path = tmp_path / "old.db"
    shutil.copyfile(FIXTURES / "old_route_store.db", path)  # the committed file stays as made
    return f"sqlite:///{path}"


def _assert_as_before(engine, x: torch.Tensor) -> None:
    for method, want in EXPECTED["route"].items():
        routed = engine.route(x, method=method)
        assert routed.tasks == want["tasks"], method
        assert routed.labels.tolist() == want["labels"], method
        # Routing is exact (tasks, labels); the confidence comes through the mixed forward,
        # a float computation stated to a tolerance (tests/test_mixed.py), not bit for bit.
        got = torch.tensor([float(c) for c in routed.confidence], dtype=torch.float64)
        want_c = torch.tensor(want["confidence"], dtype=torch.float64)
        torch.testing.assert_close(got, want_c, rtol=1e-6, atol=1e-9, msg=method)


def test_a_store_of_the_previous_release_routes_exactly_as_it_did(old_store):
    engine = tiny_engine(old_store)
    assert engine.fingerprint == EXPECTED["fingerprint"]
    x = _maker().probe_inputs()
    features = engine.server.features(engine.preprocess(x)).double()
    assert features.tolist() == EXPECTED["features"]  # same base, same inputs
    assert not any(engine.store.route_stats(n).compact for n in ("dark", "bright"))
    _assert_as_before(engine, x)


def test_new_versions_store_compact_stats_and_route_beside_old_ones(old_store):
    engine = tiny_engine(old_store)
    x = _maker().probe_inputs()
    grey, y = (torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 0.2 + 0.4,
               torch.arange(48) % 2)  # fmt: skip
    engine.add_task((grey, y), name="grey", quiet=True)
    new = engine.store.load("grey").tensors
    assert {"route.basis", "route.diag"} <= set(new) and "route.scatter" not in new
    assert engine.store.route_stats("grey").compact
    assert "route.scatter" in engine.store.load("dark").tensors  # old versions are untouched
    routed = engine.route(torch.cat([x, grey[:8]]))
    assert set(routed.tasks[-8:]) == {"grey"} and len(routed) == len(x) + 8
    engine.remove_task("grey")
    _assert_as_before(engine, x)  # back to only full statistics: exactly the previous routing


def test_removing_a_task_routes_as_if_it_had_never_been_added(tmp_path):
    with_third = tiny_engine(f"sqlite:///{tmp_path / 'a.db'}")
    never = tiny_engine(f"sqlite:///{tmp_path / 'b.db'}")
    for engine in (with_third, never):
        engine.add_task(dark(48, seed=1), name="dark", quiet=True)
    mid = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 0.3 + 0.35
    with_third.add_task((mid, torch.arange(48) % 3), name="mid", quiet=True)
    for engine in (with_third, never):
        engine.add_task(bright(48, seed=2), name="bright", quiet=True)
    x = torch.cat([dark(10, seed=7)[0], bright(10, seed=8)[0], mid[:6]])
    assert "mid" in with_third.route(x).tasks
    with_third.remove_task("mid")
    for method in ("lda", "ncm"):
        a, b = with_third.route(x, method=method), never.route(x, method=method)
        assert a.tasks == b.tasks and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.confidence, b.confidence, rtol=1e-10, atol=1e-12)
