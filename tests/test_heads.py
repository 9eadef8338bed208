"""Closed-form task heads in training (``TAPSConfig.head_init`` / ``head_refit``): a fresh task
is the ridge probe, training keeps what the probe reached, ``"random"`` is the old behaviour,
and one-class tasks train, commit and route."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

import taps_cl.training.loop as loop
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.data import DataError, check_labels
from taps_cl.routing import base_features
from taps_cl.routing.closedform import ridge_from_moments, ridge_head
from taps_cl.taps.model import TAPSModel
from taps_cl.training import evaluate, fit_task
from taps_cl.training.heads import closed_form_head, fit_heads, head_inputs, set_head
from tests.tiny import tiny_cnn, tiny_images

TRAIN = TrainConfig(epochs=2, batch_size=8, lr=1e-2)


def _data(n: int = 48, classes: int = 3, seed: int = 0) -> TensorDataset:
    return TensorDataset(*tiny_images(n, classes, seed=seed))


def _batches(data: TensorDataset, size: int = 16):
    x, y = data.tensors
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def test_fresh_task_predicts_exactly_the_closed_form_head():
    model = TAPSModel(tiny_cnn())
    model.add_task("t", 3)
    data = _data()
    fit_heads(model, {"t": data}, TRAIN)
    x, y = data.tensors
    # a fresh task's head sees the base's own features (zero deltas, norm copies)
    z = base_features(model, x)
    z_task, labels = head_inputs(model, "t", _batches(data))
    assert torch.equal(z_task, z) and torch.equal(labels, y)
    probe = ridge_head(z, y, 3, temperature=False)  # scale 1: the raw ridge outputs
    model.eval()
    with torch.no_grad():
        logits = model(x, task="t")
    assert torch.allclose(logits.double(), probe.logits(z), atol=1e-5)
    assert torch.equal(logits.argmax(1), probe.logits(z).argmax(1))


def test_training_from_the_closed_form_start_keeps_training_accuracy():
    data = _data(60, 3, seed=1)
    model = TAPSModel(tiny_cnn(), TAPSConfig(lam=0.5))
    model.add_task("t", 3)
    fit_heads(model, {"t": data}, TRAIN)
    start = evaluate(model, "t", data, TRAIN)["accuracy"]
    model.remove_task("t")
    model.add_task("t", 3)
    fit = fit_task(model, "t", data, data, TRAIN, quiet=True)
    assert start >= 0.9  # the problem is separable on the base's own features
    assert fit.accuracy >= start
    assert evaluate(model, "t", data, TRAIN)["accuracy"] == fit.accuracy


def _trained_patch(config: TAPSConfig, monkeypatch=None):
    model = TAPSModel(tiny_cnn(), config)
    model.add_task("t", 3, seed=7)
    before = {k: v.clone() for k, v in model.heads.tasks["t"].state_dict().items()}
    fit_task(model, "t", _data(), None, TRAIN, quiet=True)
    return model, before, model.finalize_task("t")


def test_random_head_without_refit_is_todays_training(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("head_init='random', head_refit=False must not fit a head")

    monkeypatch.setattr(loop, "fit_heads", never)
    config = TAPSConfig(head_init="random", head_refit=False)
    _, before, first = _trained_patch(config)
    _, _, again = _trained_patch(config)
    assert first.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    # the head started from its seeded init: a fresh task with the same seed has it
    fresh = TAPSModel(tiny_cnn(), config)
    fresh.add_task("t", 3, seed=7)
    assert all(torch.equal(v, before[k]) for k, v in fresh.heads.tasks["t"].state_dict().items())


def test_ridge_init_changes_only_the_start_and_refit_only_the_head(monkeypatch):
    calls = []
    real = loop.fit_heads

    def spy(model, tasks, config, *, after_training=False):
        calls.append(after_training)
        return real(model, tasks, config, after_training=after_training)

    monkeypatch.setattr(loop, "fit_heads", spy)
    _trained_patch(TAPSConfig())
    assert calls == [False, True]  # once before the first step, once after the last
    calls.clear()
    _trained_patch(TAPSConfig(head_init="random"))
    assert calls == [True]


def test_refit_is_the_closed_form_head_on_the_trained_features():
    data = _data()
    model = TAPSModel(tiny_cnn(), TAPSConfig(head_init="random"))
    model.add_task("t", 3)
    fit_task(model, "t", data, None, TRAIN, quiet=True)
    z, y = head_inputs(model, "t", _batches(data))
    expected = closed_form_head(z, y, 3)
    head = model.heads.tasks["t"]
    assert torch.allclose(head.weight.double(), expected.weight, atol=1e-6)
    assert torch.allclose(head.bias.double(), expected.bias, atol=1e-6)


def test_closed_form_head_edge_cases():
    z = torch.randn(10, 4, dtype=torch.float64)
    one = closed_form_head(z, torch.zeros(10, dtype=torch.long), 1)
    assert torch.equal(one.weight, torch.zeros(1, 4, dtype=torch.float64))
    assert one.bias.tolist() == [1.0]
    single = closed_form_head(z[:1], torch.tensor([2]), 3)  # ridge needs 2 samples
    assert single.bias.tolist() == [0.0, 0.0, 1.0] and not single.weight.any()
    y = torch.arange(10) % 2
    origin = closed_form_head(z, y, 2, bias=False)
    weight, _ = ridge_from_moments(z.T @ z, z.T @ torch.eye(2, dtype=torch.float64)[y], 10, 10.0)
    assert torch.allclose(origin.weight, weight.T) and not origin.bias.any()
    flat = closed_form_head(torch.ones(6, 4), torch.arange(6) % 2, 2)  # no variance at all
    assert torch.isfinite(flat.weight).all() and torch.allclose(
        flat.bias, torch.tensor([0.5] * 2).double()
    )
    with pytest.raises(ValueError, match="at least one sample"):
        closed_form_head(z[:0], torch.zeros(0, dtype=torch.long), 2)


def test_set_head_refuses_wrong_shapes_and_finalised_tasks():
    model = TAPSModel(tiny_cnn())
    model.add_task("t", 3)
    with pytest.raises(ValueError, match="head weight"):
        model.heads.set_linear("t", torch.zeros(2, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="head bias"):
        model.heads.set_linear("t", torch.zeros(3, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="no task"):
        model.heads.set_linear("nope", torch.zeros(3, 16), torch.zeros(3))
    fit_task(model, "t", _data(), None, TRAIN, quiet=True)
    model.finalize_task("t")
    head = closed_form_head(torch.randn(8, 16), torch.arange(8) % 3, 3)
    with pytest.raises(ValueError, match="finalised"):
        set_head(model, "t", head)


def test_config_fields_validate_and_old_configs_load():
    old = {k: v for k, v in TAPSConfig().to_dict().items() if not k.startswith("head_")}
    loaded = TAPSConfig.from_dict(old)
    assert loaded.head_init == "ridge" and loaded.head_refit is True
    with pytest.raises(ValueError, match="head_init must be one of"):
        TAPSConfig(head_init="lda")
    with pytest.raises(TypeError, match="head_refit must be True or False"):
        TAPSConfig(head_refit="yes")


def test_one_class_labels_need_to_be_declared():
    with pytest.raises(DataError, match="num_classes=1"):
        check_labels(torch.zeros(5, dtype=torch.long))
    y, k = check_labels(torch.zeros(5, dtype=torch.long), num_classes=1)
    assert k == 1 and y.tolist() == [0] * 5
    assert check_labels([0, 0], num_classes=1, class_names=["only"])[1] == 1
    with pytest.raises(DataError, match="num_classes=1"):  # e.g. a folder of one class
        check_labels([0, 0], class_names=["only"])


def test_one_class_task_trains_commits_and_routes(tmp_path):
    from tests.test_engine import tiny_engine

    engine = tiny_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    x, y = tiny_images(24, 2, seed=0)
    engine.add_task((x, y), name="pair", quiet=True)
    dark = torch.rand(24, 3, 16, 16) * 0.1
    rec = engine.add_task((dark, torch.zeros(24, dtype=torch.long)), name="one", num_classes=1,
                          quiet=True)  # fmt: skip
    assert rec.accuracy is None or rec.accuracy == 1.0
    assert engine.predict("one", dark).tolist() == [0] * 24  # one class: always it
    routed = engine.route(torch.cat([dark[:4], x[:4]]))
    assert set(routed.tasks) <= {"pair", "one"} and len(routed) == 8
    assert all(
        label == 0
        for t, label in zip(routed.tasks, routed.labels.tolist(), strict=True)
        if t == "one"
    )


def test_one_class_experience_in_the_avalanche_strategy():
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from taps_cl.scenarios.streams import class_incremental_from_tensors
    from taps_cl.strategies import TAPS

    parts = []
    for i in range(3):  # three experiences of ONE class each
        x = torch.rand(24, 3, 16, 16) * 0.3 + 0.3 * i
        parts.append((x[:16], torch.full((16,), i), x[16:], torch.full((8,), i)))
    bench = class_incremental_from_tensors(parts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
        strategy = TAPS(model=tiny_cnn(), train_mb_size=8, train_epochs=1, lr=1e-2,
                        evaluator=evaluator, mode="class")  # fmt: skip
        for exp in bench.train_stream:
            strategy.train(exp)
        results = strategy.eval(bench.test_stream)
    assert len(strategy.patches) == 3
    assert all(p.num_classes == 1 for p in strategy.patches.values())
    acc = [v for k, v in results.items() if k.startswith("Top1_Acc_Stream")]
    assert acc and acc[0] > 1 / 3  # the router tells the brightness levels apart
