"""The one training loop: one task is the one-task case of several, every caller shares the
objective and the step, and tasks trained together follow their lone trajectories exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from taps_cl.bases import Preprocessing
from taps_cl.config import JointConfig, TAPSConfig, TrainConfig
from taps_cl.data import prepare
from taps_cl.joint import fit_joint
from taps_cl.taps.model import TAPSModel
from taps_cl.training.batching import TaskStream, drop_last
from taps_cl.training.loop import Stepper, fit_task, task_loss
from taps_cl.training.runtime import Runtime
from tests.test_engine import tiny_engine
from tests.tiny import tiny_cnn, tiny_images

FAST = TrainConfig(epochs=2, batch_size=8, lr=1e-2)


def _data(n: int = 24, classes: int = 3, seed: int = 1):
    return prepare(tiny_images(n, classes, seed=seed), preprocessing=Preprocessing(input_size=16))


def _model(tasks: dict[str, int]) -> TAPSModel:
    model = TAPSModel(tiny_cnn(), TAPSConfig(lam=0.5))
    for name, classes in tasks.items():
        model.add_task(name, classes)
    return model


def _task_tensors(model: TAPSModel, name: str) -> dict[str, torch.Tensor]:
    return model.export_patch(name).tensors


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_engine_add_task_equals_one_task_add_tasks(tmp_path: Path):
    x, y = tiny_images(30, 3, seed=4)
    single = tiny_engine(f"sqlite:///{tmp_path / 'a.db'}")
    joint = tiny_engine(f"sqlite:///{tmp_path / 'b.db'}")
    rec_a = single.add_task((x, y), name="t", eval_dataset=(x, y), quiet=True)
    (rec_b,) = joint.add_tasks({"t": (x, y)}, joint=True, eval_datasets={"t": (x, y)}, quiet=True)
    _assert_same(single.load_patch("t").tensors, joint.load_patch("t").tensors)
    assert rec_a.accuracy == rec_b.accuracy and rec_a.active_layers == rec_b.active_layers
    va, vb = single.versions("t")[0], joint.versions("t")[0]
    assert va.config == vb.config  # one path records the same config
    assert va.metrics.keys() == vb.metrics.keys()


def test_fit_task_is_the_one_task_case_of_fit_joint():
    data = _data()
    lone, together = _model({"a": 3}), _model({"a": 3})
    fit_task(lone, "a", data, None, FAST, quiet=True)
    fit_joint(together, {"a": data}, FAST, joint=JointConfig(), quiet=True)
    _assert_same(_task_tensors(lone, "a"), _task_tensors(together, "a"))


def test_tasks_trained_together_follow_their_lone_trajectories():
    """Tasks share no trainable parameter, each keeps its own length, warm-up, score lr and
    schedule, clips its own gradient and draws the same minibatches alone or together: a joint
    run equals incremental runs bit for bit (for models without random layers such as dropout),
    even for tasks of different sizes."""
    a, b = _data(24, 3, seed=1), _data(41, 2, seed=2)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=5e-2, max_grad_norm=0.05)  # clipping active
    joint = _model({"a": 3, "b": 2})
    result = fit_joint(joint, {"a": a, "b": b}, cfg, quiet=True)
    # b: 41 samples in minibatches of 8 is 5 steps (a last batch of one is dropped)
    assert result.steps == 2 * 5 and result.fits["a"].steps == 2 * 3
    for name, data, classes in (("a", a, 3), ("b", b, 2)):
        lone = _model({name: classes})
        fit = fit_task(lone, name, data, None, cfg, quiet=True)
        _assert_same(_task_tensors(joint, name), _task_tensors(lone, name))
        assert fit.score_lr == result.fits[name].score_lr
        assert [h["loss"] for h in fit.history] == [h["loss"] for h in result.fits[name].history]


def test_every_task_every_step_when_asked():
    a, b = _data(24, 3, seed=1), _data(40, 2, seed=2)
    model = _model({"a": 3, "b": 2})
    result = fit_joint(model, {"a": a, "b": b}, FAST, joint=JointConfig(epoch_length="max"))
    assert result.fits["a"].steps == result.fits["b"].steps == 2 * 5  # a cycles
    with pytest.raises(ValueError, match="train_base"):
        fit_joint(_model({"a": 3}), {"a": a}, FAST, joint=JointConfig("own"), train_base=True)


def test_stepper_clips_each_group_on_its_own():
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p, q], lr=1.0)
    cfg = TrainConfig(max_grad_norm=1.0, optimizer="sgd")
    stepper = Stepper(opt, None, cfg, Runtime.create("cpu"), [[p], [q]])
    stepper.step((p * torch.tensor([100.0, 0, 0])).sum() + (q * torch.tensor([0.1, 0, 0])).sum())
    # p's huge gradient is clipped to norm 1; q's small one is untouched by p's size
    assert p.detach()[0].item() == pytest.approx(-1.0)
    assert q.detach()[0].item() == pytest.approx(-0.1)


def test_stepper_refuses_a_nonfinite_loss_before_touching_parameters():
    from taps_cl.errors import TrainingDivergedError

    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    stepper = Stepper(opt, None, TrainConfig(), Runtime.create("cpu"), what="task 'x'")
    with pytest.raises(TrainingDivergedError, match="task 'x'"):
        stepper.step(p.sum() * float("nan"))
    assert torch.equal(p.detach(), torch.ones(2)) and p.grad is None


def test_float16_autocast_scales_the_loss_on_cpu():
    data = _data(16, 2)
    model = _model({"a": 2})
    cfg = TrainConfig(epochs=1, batch_size=8, amp_cpu=True, amp_dtype="float16")
    assert Runtime.of(cfg).scales_loss
    fit = fit_task(model, "a", data, data, cfg, quiet=True)
    assert 0.0 <= fit.accuracy <= 1.0
    assert all(torch.isfinite(t).all() for t in _task_tensors(model, "a").values())


def test_task_loss_adds_the_penalty_only_when_on():
    model = _model({"a": 2})
    logits, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    ce = task_loss(logits, y)
    assert torch.equal(task_loss(logits, y, model, "a", penalty_on=False), ce)
    on = task_loss(logits, y, model, "a", penalty_on=True)
    assert on.item() == pytest.approx(ce.item() + 0.5 * model.penalty("a").item())


@pytest.mark.parametrize(("n", "batch", "dropped"), [(17, 8, True), (16, 8, False), (18, 8, False)])
def test_one_batching_rule(n, batch, dropped):
    assert drop_last(n, batch) is dropped
    stream = TaskStream(_data(n, 2), batch, 0, TrainConfig(), Runtime.create("cpu"))
    sizes = [len(stream.next()[1]) for _ in range(len(stream))]
    assert sum(sizes) == n - (n % batch if dropped else 0)
    assert min(sizes) > 1


def test_baselines_use_the_same_step(monkeypatch):
    import taps_cl.training.baselines as baselines

    calls = []
    real = baselines.Stepper.step

    def spy(self, loss):
        calls.append(self.config.max_grad_norm)
        return real(self, loss)

    monkeypatch.setattr(baselines.Stepper, "step", spy)
    data = _data(16, 2)
    res = baselines.fit_baseline(copy.deepcopy(tiny_cnn()), 2, data, data, FAST, mode="finetune")
    assert len(calls) == 2 * 2 and set(calls) == {FAST.max_grad_norm}
    assert 0.0 <= res.accuracy <= 1.0
