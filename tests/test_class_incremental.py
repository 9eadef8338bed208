"""Class-incremental TAPS through Avalanche: one task per experience, routed global logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import TensorDataset

from taps_cl.errors import UnknownTaskError
from taps_cl.routing import RouteStats
from taps_cl.scenarios.avalanche import benchmark_from_tensors
from taps_cl.scenarios.streams import class_incremental_from_tensors
from taps_cl.strategies import TAPS
from taps_cl.strategies.classinc import ClassIncremental
from taps_cl.strategies.experiences import detect_mode
from taps_cl.strategies.multitask import PAD_LOGIT
from tests.tiny import tiny_cnn

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

EXPERIENCES = ((0, 1), (2, 3))  # global class ids per experience
NUM_CLASSES = 4


def images(n: int, classes: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose brightness and dominant channel tell the global class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.arange(n) % len(classes)]
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.3 + (y.float() / NUM_CLASSES).view(-1, 1, 1, 1)
    x[torch.arange(n), y % 3] += 0.4
    return x, y


def evaluator() -> EvaluationPlugin:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True),
            bwt_metrics(experience=True, stream=True),
            loggers=[],
        )


def strategy(**kw) -> TAPS:
    torch.manual_seed(0)
    defaults = dict(
        model=tiny_cnn(), train_mb_size=8, train_epochs=3, lr=0.05, lam=0.1, evaluator=evaluator()
    )
    return TAPS(**{**defaults, **kw})


@pytest.fixture(scope="module")
def bench():
    parts = []
    for i, classes in enumerate(EXPERIENCES):
        parts.append((*images(48, classes, seed=i), *images(24, classes, seed=10 + i)))
    return class_incremental_from_tensors(parts)


@pytest.fixture(scope="module")
def trained(bench):
    s = strategy()
    history = []
    for exp in bench.train_stream:
        s.train(exp)
        history.append(s.eval(bench.test_stream))  # the whole stream, trained or not
    return s, history


def in_unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


def test_trains_every_experience_and_avalanche_metrics_work(trained):
    s, history = trained
    assert s.mode == "class"
    assert s.taps_model.tasks == ["exp0", "exp1"]
    assert sorted(s.patches) == [0, 1]
    after0, final = history
    # After experience 0 the whole stream evaluates: experience 1 is routed to exp0 (all wrong).
    assert after0["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001"] == 0.0
    assert in_unit(after0["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"])
    accs = [v for k, v in final.items() if k.startswith("Top1_Acc_")]
    assert len(accs) == 3 and all(in_unit(v) for v in accs)
    stream_acc = final["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert stream_acc > 0.5  # chance over 4 global classes is 0.25
    forgetting = final["ExperienceForgetting/eval_phase/test_stream/Task000/Exp000"]
    assert -1.0 <= forgetting <= 1.0
    assert -1.0 <= final["StreamBWT/eval_phase/test_stream"] <= 1.0


def test_outputs_span_global_classes_and_follow_the_route(trained, bench):
    s = trained[0]
    taps, ci = s.taps_model, s.router.classinc
    x = torch.cat([torch.stack([e.dataset[k][0] for k in range(12)]) for e in bench.test_stream])
    s.model.eval()
    with torch.no_grad():
        out = s.model(x, torch.zeros(len(x), dtype=torch.long))
        assert out.shape == (len(x), NUM_CLASSES)
        assert torch.equal(s.model(x, None), out)  # task labels are ignored in class mode
        route = ci.last_route
        for name, idx in route.groups().items():
            own = ci.classes[name]
            assert torch.allclose(out[idx][:, own], taps(x[idx], task=name), atol=1e-6)
            others = [c for c in range(NUM_CLASSES) if c not in own.tolist()]
            assert (out[idx][:, others] == PAD_LOGIT).all()
            assert set(out[idx].argmax(1).tolist()) <= set(own.tolist())
    assert s.router.classinc.router.tasks == ("exp0", "exp1")


def test_patches_carry_route_statistics(trained):
    s = trained[0]
    for patch in s.patches.values():
        stats = RouteStats.from_tensors(patch.tensors)
        assert stats.num_classes == 2 and stats.total == 48  # the last epoch's minibatches
        assert stats.calibration is not None  # from the last epoch's logits
        assert patch.without("route").num_parameters == patch.num_parameters


def test_eval_before_training_is_a_clear_error(bench):
    s = strategy(mode="class")
    with pytest.raises(UnknownTaskError, match="no experience has been trained"):
        s.eval(bench.test_stream)


def test_repeating_an_experience_is_refused(bench):
    s = strategy(train_epochs=1)
    s.train(bench.train_stream[0])
    with pytest.raises(ValueError, match="already trained"):
        s.train(bench.train_stream[0])


def test_mode_detection_and_override(bench):
    tasks = [(*images(16, (0, 1), 0), *images(8, (0, 1), 1)) for _ in range(2)]
    task_bench = benchmark_from_tensors(tasks)  # task labels 0 and 1
    assert detect_mode(task_bench.train_stream[0]) == "task"
    assert detect_mode(bench.train_stream[0]) == "class"
    s = strategy(train_epochs=1)
    s.train(task_bench.train_stream[0])
    assert s.mode == "task" and s.router.classinc is None
    assert s.taps_model.tasks == ["task0"]
    forced = strategy(train_epochs=1, mode="class")  # each experience a task, routed
    for exp in task_bench.train_stream:
        forced.train(exp)
    assert forced.taps_model.tasks == ["exp0", "exp1"]
    with pytest.raises(ValueError, match="mode"):
        strategy(mode="tasks")
    with pytest.raises(ValueError, match="route_method"):
        strategy(route_method="knn")


def test_avalanche_nc_benchmark_with_class_order():
    xa, ya = images(64, (0, 1, 2, 3), seed=0)
    xb, yb = images(32, (0, 1, 2, 3), seed=1)
    train, test = TensorDataset(xa, ya), TensorDataset(xb, yb)
    train.targets, test.targets = ya.tolist(), yb.tolist()
    bm = nc_benchmark(
        train, test, n_experiences=2, task_labels=False, fixed_class_order=[3, 0, 2, 1]
    )
    s = strategy(train_epochs=2)
    for exp in bm.train_stream:
        s.train(exp)
        metrics = s.eval(bm.test_stream)
    ci = s.router.classinc
    assert s.mode == "class"
    assert ci.classes["exp0"].tolist() == [0, 3] and ci.classes["exp1"].tolist() == [1, 2]
    assert in_unit(metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"])
    s.model.eval()
    with torch.no_grad():
        assert s.model(xb[:5], 0).shape == (5, NUM_CLASSES)


def test_local_targets_map_global_ids():
    ci = ClassIncremental()
    ci.begin("exp0", [7, 3])
    assert ci.local_targets("exp0", torch.tensor([3, 7, 7])).tolist() == [0, 1, 1]
    assert ci.width == 8
    with pytest.raises(ValueError, match=r"\[5\]"):
        ci.local_targets("exp0", torch.tensor([3, 5]))
    out, target = ci.task_view("exp0", torch.arange(16.0).view(2, 8), torch.tensor([7, 3]))
    assert out.tolist() == [[3.0, 7.0], [11.0, 15.0]] and target.tolist() == [1, 0]
