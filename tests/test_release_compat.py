"""A store written by the release before the size knob (commit 96e0f35, migrations 0001-0003)
opens with this code: every version it holds gives the same logits, bit for bit, and routing
makes the same decisions (tasks, classes, versions) as that release did; tasks added with the
new default live beside them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "release_expected.json").read_text())


def _maker():
    path = FIXTURES / "make_release_store.py"
    spec = importlib.util.spec_from_file_location("make_release", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def release(tmp_path: Path):
    path = tmp_path / "release.db"
    shutil.copyfile(FIXTURES / "release_store.db", path)  # the committed file stays as made
    maker = _maker()
    return maker, maker.engine(f"sqlite:///{path}")


def _routes_as_before(engine, x: torch.Tensor) -> None:
    for method, want in EXPECTED["route"].items():
        routed = engine.route(x, method=method)
        assert routed.tasks == want["tasks"], method
        assert routed.labels.tolist() == want["labels"], method
        assert routed.versions == want["versions"], method
        # Routed rows now run through one mixed-task forward (W x + dW x instead of the merged
        # (W + dW) x): the same decisions, confidences equal to float rounding. Bit for bit is
        # the per-task path's property (the logits above).
        got = torch.tensor([float(c) for c in routed.confidence], dtype=torch.float64)
        assert torch.allclose(
            got, torch.tensor(want["confidence"], dtype=torch.float64), rtol=1e-5, atol=1e-6
        ), method


def test_every_version_of_the_previous_release_is_served_bit_for_bit(release):
    maker, engine = release
    assert engine.fingerprint == EXPECTED["fingerprint"]
    x = maker.probe_inputs()
    assert len(EXPECTED["logits"]) == 6  # five tasks, one with two versions
    for key, want in EXPECTED["logits"].items():
        name, version = key.split("/")
        got = engine.predict(name, x, logits=True, version=int(version))
        assert got.double().tolist() == want, key  # the same floats, bit for bit
    _routes_as_before(engine, x)


def test_new_default_tasks_route_beside_the_previous_releases(release):
    maker, engine = release
    x = maker.probe_inputs()
    new_x, new_y = (
        torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
        (torch.arange(40) % 2),
    )
    record = engine.add_task((1 - new_x * 0.1, new_y), name="new", quiet=True)  # the default
    patch = engine.store.load("new")
    assert not patch.kind("delta")  # low rank (if any layer was worth adapting) ...
    assert all(t.dtype == torch.int8 for t in patch.kind("lora_a").values())  # ... in int8
    assert 0 < record.route_bytes < record.nbytes <= 1024**2
    engine.remove_task("new")
    _routes_as_before(engine, x)
