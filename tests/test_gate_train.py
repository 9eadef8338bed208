"""Gate, penalty, registry and the single-task trainer on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.errors import TrainingDivergedError
from taps_cl.taps.gate import hard_gate
from taps_cl.taps.layer import TaskAdaptiveLayer, register_gateable
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.penalty import sparsity_penalty, uniform_l1, weighted_l1
from taps_cl.taps.task import TaskInfo
from taps_cl.training.loop import auto_score_lr, evaluate, fit_task
from tests.tiny import tiny_cnn, tiny_images


@pytest.mark.parametrize("score,expected", [(0.15, 1.0), (0.1, 1.0), (0.0999, 0.0), (-1.0, 0.0)])
def test_hard_gate_value_and_straight_through_gradient(score, expected):
    s = torch.tensor(score, requires_grad=True)
    g = hard_gate(s, 0.1)
    assert g.item() == expected
    (3.0 * g).backward()
    assert s.grad.item() == 3.0  # d gate / d s = 1


def test_score_gradient_is_inner_product_of_weight_grad_and_delta():
    torch.manual_seed(0)
    layer = TaskAdaptiveLayer(nn.Linear(4, 3), tau=0.1, score_init=0.15)
    layer.add_task(TaskInfo("a", 3))
    with torch.no_grad():
        layer.delta["a"].normal_()
    layer.active_task = "a"
    x = torch.randn(5, 4)
    layer(x).pow(2).sum().backward()
    w = layer.effective_weight("a").detach().requires_grad_(True)
    torch.nn.functional.linear(x, w, layer.base_layer.bias).pow(2).sum().backward()
    expected = (w.grad * layer.delta["a"].detach()).sum()
    assert torch.allclose(layer.score["a"].grad, expected)
    assert torch.allclose(layer.delta["a"].grad, w.grad)  # gate on: delta gets dL/dw


def test_closed_gate_gives_delta_no_gradient():
    layer = TaskAdaptiveLayer(nn.Linear(4, 3), tau=0.1, score_init=0.05)
    layer.add_task(TaskInfo("a", 3))
    layer.active_task = "a"
    layer(torch.randn(2, 4)).sum().backward()
    assert torch.count_nonzero(layer.delta["a"].grad) == 0


def test_penalties():
    scores = [torch.tensor(0.2), torch.tensor(-0.4)]
    assert torch.isclose(uniform_l1(scores), torch.tensor(0.3))
    assert torch.isclose(weighted_l1(scores, [3, 1]), torch.tensor(0.25))
    assert torch.isclose(sparsity_penalty(scores, [3, 1], "weighted"), torch.tensor(0.25))
    with pytest.raises(ValueError):
        sparsity_penalty(scores, [1, 1], "l0")
    with pytest.raises(ValueError):
        uniform_l1([])


def test_registry_refuses_duplicates_and_gates_custom_modules():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight

    with pytest.raises(ValueError, match="already registered"):
        register_gateable()(nn.Linear)
    register_gateable()(Scale)
    net = nn.Sequential(Scale(), nn.Linear(3, 2))
    model = TAPSModel(net)
    assert model.layer_names == ["0"]


def _data(n=48, classes=3, seed=0):
    x, y = tiny_images(n, classes, seed=seed)
    return TensorDataset(x, y)


def test_fit_task_learns_and_leaves_base_untouched():
    base = tiny_cnn()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = TAPSModel(base, TAPSConfig(lam=0.0))
    model.add_task("a", 3)
    before = evaluate(model, "a", _data(seed=1))["loss"]
    result = fit_task(
        model,
        "a",
        _data(),
        _data(seed=1),
        TrainConfig(epochs=8, batch_size=16, lr=1e-2),
        quiet=True,
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert evaluate(model, "a", _data(seed=1))["loss"] < before
    assert len(result.active_layers) == model.num_layers  # lam = 0: nothing pushes gates shut
    inner = {
        k.replace(".base_layer", "").replace(".base.", "."): v for k, v in base.state_dict().items()
    }
    for key, value in state.items():
        assert torch.equal(inner[key], value), key


def test_strong_penalty_closes_gates_in_a_short_run():
    model = TAPSModel(tiny_cnn(), TAPSConfig(lam=50.0, size="paper"))
    model.add_task("a", 3)
    result = fit_task(model, "a", _data(), None, TrainConfig(epochs=2, batch_size=16), quiet=True)
    assert len(result.active_layers) < model.num_layers
    assert result.score_lr == pytest.approx(auto_score_lr(model.config, TrainConfig(), 6, 3))


def test_same_seed_same_result_and_amp_path_runs():
    results = []
    for _ in range(2):
        model = TAPSModel(tiny_cnn())
        model.add_task("a", 3)
        fit_task(
            model, "a", _data(), None, TrainConfig(epochs=1, batch_size=16, seed=3), quiet=True
        )
        results.append(model.export_patch("a").tensors)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    model = TAPSModel(tiny_cnn())
    model.add_task("a", 3)
    cfg = TrainConfig(epochs=1, batch_size=16, amp_cpu=True)
    assert fit_task(model, "a", _data(), _data(), cfg, quiet=True).accuracy is not None


def test_nan_loss_raises_and_earlier_tasks_are_untouched():
    model = TAPSModel(tiny_cnn())
    model.add_task("old", 3)
    fit_task(model, "old", _data(), None, TrainConfig(epochs=1, batch_size=16), quiet=True)
    model.finalize_task("old")
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x, task="old")
    model.add_task("new", 3)
    bad_x, y = tiny_images(32, 3)
    bad_x[5, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="earlier tasks are unchanged"):
        fit_task(model, "new", TensorDataset(bad_x, y), None, TrainConfig(batch_size=8), quiet=True)
    with torch.no_grad():
        assert torch.equal(model(x, task="old"), expected)
    with pytest.raises(ValueError, match="finalised"):
        fit_task(model, "old", _data(), None, TrainConfig(), quiet=True)


def test_train_config_validation():
    assert TrainConfig.from_json(TrainConfig(epochs=2, image_size=64).to_json()).image_size == 64
    for kwargs in [
        {"epochs": 0},
        {"lr": 0},
        {"optimizer": "lion"},
        {"image_size": 4},
        {"score_lr": -1},
    ]:
        with pytest.raises(ValueError):
            TrainConfig(**kwargs)
