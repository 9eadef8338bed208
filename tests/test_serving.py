"""Concurrent serving: predict/route from many threads, concurrent first loads, the LRU of
loaded versions, failed loads, and merged serving modules against the gated model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from taps_cl.config import TAPSConfig
from taps_cl.taps.merge import merge_patch, shared_merged
from taps_cl.taps.model import TAPSModel
from tests.test_engine import tiny_engine
from tests.test_route import bright, dark
from tests.tiny import tiny_cnn, tiny_images

THREADS = 4


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.fixture
def trained(store) -> tuple[str, dict[str, torch.Tensor], torch.Tensor]:
    """A store with tasks "dark" and "bright", the inputs and their single-threaded logits."""
    engine = tiny_engine(store)
    engine.add_task(dark(32), name="dark", quiet=True)
    engine.add_task(bright(32), name="bright", quiet=True)
    x = torch.cat([dark(8, seed=3)[0], bright(8, seed=4)[0]])
    return store, {n: engine.predict(n, x, logits=True) for n in ("dark", "bright")}, x


def _in_threads(fn, n: int = THREADS) -> list:
    """Run ``fn(i)`` in ``n`` threads started together; return results, re-raise errors."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return results


def test_predict_from_threads_matches_single_threaded(trained):
    store, expected, x = trained
    engine = tiny_engine(store)
    names = ["dark", "bright"]

    def work(i: int) -> int:
        wrong = 0
        for k in range(100):
            name = names[(i + k) % 2]
            wrong += not torch.equal(engine.predict(name, x, logits=True), expected[name])
        return wrong

    assert _in_threads(work) == [0] * THREADS


def test_concurrent_first_loads_on_a_fresh_engine(trained, monkeypatch):
    store, expected, x = trained
    engine = tiny_engine(store)
    reads = []
    load = engine.store.load
    monkeypatch.setattr(engine.store, "load", lambda *a, **kw: reads.append(a) or load(*a, **kw))
    names = ["dark", "bright"] * (THREADS // 2)
    outs = _in_threads(lambda i: engine.predict(names[i], x, logits=True))
    assert all(torch.equal(o, expected[n]) for o, n in zip(outs, names, strict=True))
    assert len(reads) == 2  # each task read once, whatever the number of threads
    for name in ("dark", "bright"):  # and the engine keeps working single-threaded
        assert torch.equal(engine.predict(name, x, logits=True), expected[name])


def test_a_failed_load_leaves_the_engine_usable(trained, monkeypatch):
    store, expected, x = trained
    engine = tiny_engine(store)
    load, failed = engine.store.load, []

    def flaky(*args, **kwargs):
        if not failed:
            failed.append(1)
            raise OSError("disk hiccup")
        return load(*args, **kwargs)

    monkeypatch.setattr(engine.store, "load", flaky)
    with pytest.raises(OSError, match="hiccup"):
        engine.predict("dark", x)
    assert engine.server.loaded() == [] and engine.server.model.tasks == []
    assert torch.equal(engine.predict("dark", x, logits=True), expected["dark"])


def test_lru_evicts_and_reloads_identically(trained):
    store, expected, x = trained
    engine = tiny_engine(store)
    engine.server.max_loaded = 1
    for name in ("dark", "bright", "dark"):
        assert torch.equal(engine.predict(name, x, logits=True), expected[name])
        assert engine.server.loaded() == [(name, 1)]
    with pytest.raises(ValueError, match="max_loaded"):
        tiny_engine(store).__class__(tiny_cnn(), store=store, max_loaded=0)


def test_route_from_threads_matches_single_threaded(trained):
    store, _, x = trained
    engine = tiny_engine(store)
    want = engine.route(x)
    outs = _in_threads(lambda i: [engine.route(x) for _ in range(20)])
    for routed in (r for rs in outs for r in rs):
        assert routed.tasks == want.tasks and torch.equal(routed.labels, want.labels)
        assert torch.equal(routed.confidence, want.confidence)


def test_other_process_version_visible_after_ttl_or_refresh(trained):
    store, expected, x = trained
    engine = tiny_engine(store)
    engine.server.version_ttl = 3600.0  # the cached version must not expire mid-test
    assert torch.equal(engine.predict("dark", x, logits=True), expected["dark"])
    other = tiny_engine(store)
    other.add_task(dark(32, seed=9), name="dark", quiet=True)  # version 2, another engine
    assert torch.equal(engine.predict("dark", x, logits=True), expected["dark"])  # cached v1
    engine.refresh()
    assert torch.equal(engine.predict("dark", x, logits=True), other.predict("dark", x, True))
    assert engine.server.loaded()[-1] == ("dark", 2)
    fresh = tiny_engine(store)
    fresh.server.version_ttl = 0.0  # no caching: another process's version is seen at once
    assert fresh.predict("dark", x, logits=True).shape == expected["dark"].shape
    other.add_task(dark(32, seed=10), name="dark", quiet=True)  # version 3
    fresh.predict("dark", x, logits=True)
    assert fresh.server.loaded()[-1] == ("dark", 3)


@pytest.mark.parametrize(
    "config",
    [
        TAPSConfig(),
        TAPSConfig(delta_dtype="int8"),
        TAPSConfig(delta_rank=2, delta_dtype="bfloat16"),
    ],
    ids=["dense", "int8", "lora-bf16"],
)
def test_merged_serving_modules_equal_the_gated_model_bit_for_bit(config):
    model = TAPSModel(tiny_cnn(), config).eval()
    model.add_task("t", 3)
    with torch.no_grad():
        for _, layer in model.layers():
            for p in layer.trainable_deltas("t"):
                p.normal_(0, 0.05)
    next(model.layers())[1].close("t")  # a pruned layer: served with the base weight itself
    patch = model.finalize_task("t")
    loader = TAPSModel(tiny_cnn(), TAPSConfig()).eval()
    before = {k: v.clone() for k, v in loader.state_dict().items()}
    x = tiny_images(8)[0]
    folded = merge_patch(loader, patch)
    assert loader.tasks == [] and all(
        torch.equal(v, before[k]) for k, v in loader.state_dict().items()
    )
    loader.load_patch(patch)
    with torch.no_grad():
        gated = loader(x, task="t")
        assert torch.equal(folded(x), gated)
        assert torch.equal(shared_merged(loader, "t")(x), gated)
        assert torch.equal(loader.merged("t")(x), gated)
    shared = {p.data_ptr() for p in loader.base.parameters()}
    assert any(p.data_ptr() in shared for p in folded.parameters())  # shared, not copied
