"""The size knob (issue 20): ``TAPSConfig.size`` parses, resolves to low-rank int8 deltas and a
byte budget that bounds everything a task stores (patch + routing statistics), and the default
keeps short runs at least as accurate as the paper's dense default."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from taps_cl.config import SIZES, TAPSConfig, TrainConfig, parse_size, size_rank
from taps_cl.routing.stats import RouteStatsAccumulator
from taps_cl.scenarios import get_task
from taps_cl.taps.budget import budget_limit, fixed_size, route_reserve, task_size
from taps_cl.taps.model import TAPSModel
from taps_cl.training.loop import fit_task
from tests.test_taps_core import CASES, IDS, _logits, _train_steps, _x
from tests.tiny import tiny_cnn, tiny_images

PAPER = TAPSConfig(size=None)


# -- parsing and resolution ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,nbytes",
    [
        ("compact", 1024**2),
        ("TINY", 256 * 1024),
        ("800KB", 800_000),
        ("1.5MiB", int(1.5 * 1024**2)),
        (" 2 mb ", 2_000_000),
        (4096, 4096),
        ("paper", None),
        (None, None),
    ],
)
def test_sizes_parse(size, nbytes):
    assert parse_size(size) == nbytes
    assert TAPSConfig(size=size).size_bytes == nbytes


@pytest.mark.parametrize("bad", ["huge", "1.5 parsecs", "MiB", "", "-3KB", 0, -1])
def test_bad_sizes_are_refused_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="size"):
        TAPSConfig(size=bad)


@pytest.mark.parametrize("bad", [1.5, True, [1]])
def test_sizes_of_the_wrong_type_are_refused(bad):
    with pytest.raises(TypeError, match="size"):
        TAPSConfig(size=bad)


@given(st.integers(1, 2**40))
def test_every_positive_byte_count_is_a_size_with_a_rank_in_range(nbytes):
    config = TAPSConfig(size=nbytes)
    assert config.size_bytes == nbytes and 4 <= config.rank <= 256
    assert config.rank & (config.rank - 1) == 0  # a power of two


def test_a_size_picks_low_rank_int8_and_explicit_fields_win():
    default = TAPSConfig()
    assert (default.size, default.rank, default.stored_dtype, default.budgeted) == (
        "compact",
        32,
        "int8",
        True,
    )
    assert [size_rank(SIZES[n]) for n in ("tiny", "small", "compact", "large")] == [8, 16, 32, 128]
    assert (PAPER.rank, PAPER.stored_dtype, PAPER.budgeted) == (None, "float32", False)
    assert TAPSConfig(delta_rank=8).rank == 8
    assert TAPSConfig(delta_dtype="float32").stored_dtype == "float32"
    assert TAPSConfig(delta_kind="dense").rank is None
    assert TrainConfig().lr_for(32) == 3e-3 and TrainConfig().lr_for(None) == 1e-3
    assert TrainConfig(lr=0.01).lr_for(32) == 0.01
    assert TAPSConfig.from_json(default.to_json()) == default


# -- the byte budget ------------------------------------------------------------------------------


def _data(n: int, classes: int = 3, seed: int = 0) -> TensorDataset:
    return TensorDataset(*tiny_images(n, classes=classes, seed=seed))


def test_route_reserve_is_what_compact_statistics_store():
    for classes, dim in ((3, 16), (10, 1280), (100, 64)):
        acc = RouteStatsAccumulator(classes, dim)
        g = torch.Generator().manual_seed(classes)
        feats = torch.randn(max(4 * classes, 40), dim, generator=g)
        acc.update(feats, torch.arange(feats.shape[0]) % classes)
        stored = acc.result().compress().nbytes
        assert stored <= route_reserve(classes, dim) <= stored + 64


@pytest.mark.parametrize("size", [9_000, 14_000])
def test_a_byte_size_bounds_everything_a_task_stores(size):
    model = TAPSModel(tiny_cnn(width=16), TAPSConfig(size=size))
    model.add_task("a", 3)
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu")
    fit_task(model, "a", _data(48), _data(12, seed=1), cfg, quiet=True)
    patch = model.finalize_task("a")
    stats = route_reserve(3, 32)  # 3 classes, the tiny model's 32 features
    assert patch.nbytes + stats <= size  # all in: the reserve is the statistics' size
    assert task_size(model, "a") == patch.nbytes + stats
    assert patch.active_layers  # the budget bought some layers, not none
    assert {k.split(".", 1)[0] for k in patch.tensors} >= {"lora_a", "lora_b", "scale"}


def test_a_byte_size_below_the_fixed_part_is_refused_with_the_minimum():
    model = TAPSModel(tiny_cnn(width=16), TAPSConfig(size=1_000))
    with pytest.raises(ValueError, match="at least"):
        model.add_task("a", 3)
    assert model.tasks == []


def test_a_named_size_a_task_cannot_fit_buys_that_much_on_top_of_its_head():
    model = TAPSModel(tiny_cnn(width=16), TAPSConfig(size="tiny"))
    model.add_task("big", 4000)  # its head alone is above 256 KiB
    fixed = fixed_size(model, "big")
    assert fixed > SIZES["tiny"]
    assert budget_limit(model, "big") == fixed + SIZES["tiny"]


# -- short runs -----------------------------------------------------------------------------------


def test_short_runs_of_the_default_are_as_accurate_as_the_papers_dense_default():
    """13 steps on real digits (8x8, 10 classes) with a tiny model: the default (compact size,
    low-rank int8, gates chosen once) is at least as accurate as the paper's dense default."""
    spec = get_task("digits", max_train=104, max_test=200)
    train, test = _digits(spec.train), _digits(spec.test)
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", seed=0)
    acc = {}
    for label, config in (("default", TAPSConfig()), ("paper", PAPER)):
        model = TAPSModel(tiny_cnn(width=16, num_classes=10), config)
        model.add_task("digits", 10)
        acc[label] = fit_task(model, "digits", train, test, cfg, quiet=True).accuracy
    assert acc["default"] >= acc["paper"] - 0.01, acc


def _digits(data) -> TensorDataset:
    """The 8x8 grey digits as 3-channel float images in [0, 1] for the tiny model."""
    xs = torch.stack([data[i][0].float().expand(3, 8, 8) for i in range(len(data))])
    ys = torch.tensor([int(data[i][1]) for i in range(len(data))])
    return TensorDataset(xs / max(float(xs.max()), 1.0), ys)


# -- the default on every architecture ------------------------------------------------------------


def _perturb_any(model: TAPSModel, name: str, seed: int) -> None:
    """Random values in whatever the task's deltas are made of (factors for low rank)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.layers():
            for p in layer.trainable_deltas(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for p in model.param_groups(name)["norm"]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name,factory,size", CASES, ids=IDS)
def test_the_default_forgets_nothing_and_round_trips_bit_for_bit(name, factory, size):
    """Low-rank int8 deltas under the default size on timm, torchvision, attention and HF
    models: every committed task gives the same bits after more tasks and after a reload."""
    model = TAPSModel(factory())
    x = _x(size)
    outputs = {}
    for i, task in enumerate(["t0", "t1"]):
        model.add_task(task, 2 + i, seed=i)
        _perturb_any(model, task, seed=10 + i)
        _train_steps(model, task, x)
        patch = model.finalize_task(task)
        stored = {**patch.kind("delta"), **patch.kind("lora_a"), **patch.kind("lora_b")}
        assert stored and all(t.dtype == torch.int8 for t in stored.values())  # int8 deltas
        with torch.no_grad():
            outputs[task] = model(x, task=task)
        for earlier, expected in outputs.items():
            with torch.no_grad():
                assert torch.equal(model(x, task=earlier), expected), earlier
    fresh = TAPSModel(factory())
    for task in outputs:
        fresh.load_patch(model.export_patch(task))
        with torch.no_grad():
            assert torch.equal(fresh(x, task=task), outputs[task])
            merged = _logits(model.merged(task)(x))
            assert (merged - outputs[task]).abs().max() <= 1e-4 * (1 + outputs[task].abs().max())


def test_joint_runs_keep_every_task_within_its_size(tmp_path):
    """The knob reaches joint mode: each task of one joint run stores at most the size, routing
    statistics included, and the engine reports the split."""
    from tests.test_engine import tiny_engine

    engine = tiny_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    data = {f"t{i}": tiny_images(32, 2 + i, seed=i) for i in range(2)}
    records = engine.add_tasks(data, joint=True, config=TAPSConfig(size=12_000), quiet=True)
    for record in records:
        assert 0 < record.route_bytes < record.nbytes <= 12_000
        assert record.patch_bytes == record.nbytes - record.route_bytes
        (stored,) = engine.store.versions(record.name)
        assert (stored.nbytes, stored.route_bytes) == (record.nbytes, record.route_bytes)


def test_the_stored_form_is_evaluated_once_and_reported(monkeypatch):
    """The head refit settles the task before its last evaluation, so that evaluation already
    measures the int8 form the patch stores: no second pass over the eval data."""
    import taps_cl.training.loop as loop

    calls = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = TAPSModel(tiny_cnn(width=16), TAPSConfig())
    model.add_task("a", 3)
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu")
    fit = fit_task(model, "a", _data(24), _data(12, seed=1), cfg, quiet=True)
    assert len(calls) == 1
    model.finalize_task("a")
    assert fit.history[-1]["stored_accuracy"] == fit.accuracy
    assert fit.accuracy == real(model, "a", _data(12, seed=1), cfg)["accuracy"]
