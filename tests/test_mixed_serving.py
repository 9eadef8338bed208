"""Mixed-task forwards in serving: routed answers against the old grouped path (one merged
module per routed group), ``Engine.predict`` with a task per row against per-task predict,
validation, version slots, the ``max_loaded`` bound and threads.

Tolerance as in tests/test_mixed.py: the mixed path agrees with each task's merged module to
float32 rounding; argmax equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taps_cl.errors import UnknownTaskError
from tests.test_engine import tiny_engine
from tests.test_route import bright, dark
from tests.test_serving import _in_threads
from tests.tiny import tiny_images

TOL = 2e-5


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    store = f"sqlite:///{Path(tmp_path_factory.mktemp('mixed')) / 'tasks.db'}"
    engine = tiny_engine(store)
    engine.add_task(dark(48), name="dark", class_names=["d0", "d1", "d2"], quiet=True)
    engine.add_task(bright(48), name="bright", quiet=True)
    return engine


def _x() -> torch.Tensor:
    return torch.cat([dark(7, seed=3)[0], bright(6, seed=4)[0], dark(3, seed=5)[0]])


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got - want).abs().max() <= TOL * (1 + want.abs().max())


def test_routed_answers_equal_the_grouped_merged_path(engine):
    x = _x()
    routed = engine.route(x)
    assert len(set(routed.tasks)) == 2  # a mixed batch
    cand = engine.routing.candidates(None)
    feats = engine.server.features(engine.preprocess(x))
    task_p = cand.router.route({n: feats for n in cand.preps}, "lda", None).confidence
    for name in set(routed.tasks):
        idx = [i for i, t in enumerate(routed.tasks) if t == name]
        p = torch.softmax(engine.predict(name, x[idx], logits=True).double(), 1)
        assert torch.equal(routed.labels[idx], p.argmax(1))
        _close(routed.confidence[idx], task_p[idx] * p.max(1).values)
    old = engine.route(x, method="combined")  # still the merged path (shortlisted patches)
    assert len(old) == len(routed)


def test_predict_with_a_task_per_row_equals_per_task_predict(engine):
    x = _x()
    rows = ["dark", "bright"] * 8
    logits = engine.predict(rows, x, logits=True)
    assert logits.shape == (16, 3)
    for name in ("dark", "bright"):
        idx = [i for i, r in enumerate(rows) if r == name]
        want = engine.predict(name, x[idx], logits=True)
        c = want.shape[1]
        _close(logits[idx, :c], want)
        assert torch.isneginf(logits[idx, c:]).all()
        assert torch.equal(engine.predict(rows, x)[idx], want.argmax(1))


def test_task_per_row_validation(engine):
    x = _x()[:4]
    with pytest.raises(ValueError, match="3 task names for 4 inputs"):
        engine.predict(["dark", "dark", "bright"], x)
    with pytest.raises(UnknownTaskError, match="nope"):
        engine.predict(["dark", "nope", "dark", "dark"], x)
    with pytest.raises(ValueError, match="version"):
        engine.predict(["dark"] * 4, x, version=1)
    with pytest.raises(ValueError, match="at least one"):
        engine.predict([], x)
    with pytest.raises(TypeError, match="must be str"):
        engine.predict(["dark", 3, "dark", "dark"], x)
    with pytest.raises(ValueError, match="invalid task name"):
        engine.predict(["../x"] * 4, x)


def test_versions_of_one_task_get_their_own_slots_and_max_loaded_bounds_them(tmp_path):
    engine = tiny_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    engine.add_task(dark(32), name="dark", quiet=True)
    engine.add_task(bright(32), name="bright", quiet=True)
    engine.add_task(dark(32, seed=9), name="dark", quiet=True)  # version 2
    x = engine.preprocess(_x())  # mixed_logits takes preprocessed inputs
    keys = [("dark", 1), ("dark", 2), ("bright", 1)]
    rows = torch.tensor([i % 3 for i in range(16)])
    out = engine.server.mixed_logits(keys, x, rows)
    for i, (name, version) in enumerate(keys):
        want = engine.server.task_logits(name, version, x[rows == i])
        _close(out[rows == i, : want.shape[1]], want)
    engine.server.max_loaded = 1  # three versions in one batch: chunks of one version
    again = engine.server.mixed_logits(keys, x, rows)
    assert len(engine.server.mixed.held()) == 1
    assert torch.equal(again.isneginf(), out.isneginf())
    _close(again[~out.isneginf()], out[~out.isneginf()])


def test_a_held_wider_task_does_not_widen_a_narrower_batch(tmp_path):
    engine = tiny_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    engine.add_task(dark(32), name="dark", quiet=True)  # 3 classes
    engine.add_task(tiny_images(32, 2, seed=4), name="two", quiet=True)
    x = _x()[:4]
    engine.predict(["dark"] * 4, x)  # "dark" is held now
    assert engine.predict(["two"] * 4, x, logits=True).shape == (4, 2)


def test_remove_task_forgets_its_held_versions(tmp_path):
    engine = tiny_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    engine.add_task(dark(32), name="dark", quiet=True)
    engine.add_task(bright(32), name="bright", quiet=True)
    engine.predict(["dark", "bright"] * 2, _x()[:4])
    engine.remove_task("dark")
    assert [k[0] for k in engine.server.mixed.held()] == ["bright"]


def test_mixed_route_and_predict_from_threads(engine):
    x = _x()
    rows = ["bright", "dark", "dark", "bright"] * 4
    want_route, want_rows = engine.route(x), engine.predict(rows, x, logits=True)

    def work(i: int) -> list:
        return [(engine.route(x), engine.predict(rows, x, logits=True)) for _ in range(10)]

    for routed, logits in (r for rs in _in_threads(work) for r in rs):
        assert routed.tasks == want_route.tasks
        assert torch.equal(routed.labels, want_route.labels)
        assert torch.equal(routed.confidence, want_route.confidence)
        assert torch.equal(logits, want_rows)
