"""Task identification as an Avalanche metric: hand counts, loggers, nc_benchmark, one-class
experiences, and the calibration error used by the class-incremental benchmark."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import TextLogger
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import TensorDataset

from taps_cl.scenarios.streams import class_incremental_from_tensors
from taps_cl.strategies import TAPS
from taps_cl.strategies.metrics import (
    EXP_NAME,
    STREAM_NAME,
    TaskIdentification,
    expected_calibration_error,
    owners_of,
    task_id_metrics,
)
from tests.tiny import tiny_cnn

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

NUM_CLASSES = 4


def images(n: int, classes: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose brightness and dominant channel tell the global class (some overlap, so the
    router makes mistakes worth counting)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.arange(n) % len(classes)]
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.6 + 0.08 * y.float().view(-1, 1, 1, 1)
    return x, y


def evaluator(*loggers) -> EvaluationPlugin:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            task_id_metrics(experience=True, stream=True),
            loggers=list(loggers),
        )


def strategy(plugin: EvaluationPlugin, **kw) -> TAPS:
    torch.manual_seed(0)
    defaults = dict(model=tiny_cnn(), train_mb_size=8, train_epochs=2, lr=0.05, lam=0.1,
                    eval_mb_size=7, evaluator=plugin)  # fmt: skip
    return TAPS(**{**defaults, **kw})


def hand_count(s: TAPS, stream) -> list[tuple[int, int]]:
    """(right, total) per experience: one forward over its whole test set, routed tasks read
    off the strategy's last routing, owners from the classes each task trained on."""
    owner = {int(c): n for n, ids in s.router.classinc.classes.items() for c in ids.tolist()}
    out = []
    s.model.eval()
    with torch.no_grad():
        for exp in stream:
            x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
            y = [int(exp.dataset[i][1]) for i in range(len(exp.dataset))]
            s.model(x, None)
            routed = s.router.classinc.last_route.task_names
            pairs = [(r, owner[c]) for r, c in zip(routed, y, strict=True) if c in owner]
            out.append((sum(r == o for r, o in pairs), len(pairs)))
    return out


@pytest.fixture(scope="module")
def run():
    parts = [(*images(40, c, seed=i), *images(21, c, seed=10 + i))
             for i, c in enumerate(((0, 1), (2, 3)))]  # fmt: skip
    bench = class_incremental_from_tensors(parts)
    text = io.StringIO()
    s = strategy(evaluator(TextLogger(text)))
    first = None
    for exp in bench.train_stream:
        s.train(exp)
        metrics = s.eval(bench.test_stream)
        first = metrics if first is None else first
    return s, bench, first, metrics, text.getvalue()


def test_metric_equals_a_hand_count(run):
    s, bench, _, metrics, _ = run
    counts = hand_count(s, bench.test_stream)
    for j, (right, total) in enumerate(counts):
        assert metrics[f"{EXP_NAME}/eval_phase/test_stream/Task000/Exp{j:03d}"] == right / total
    stream = sum(r for r, _ in counts) / sum(t for _, t in counts)
    assert metrics[f"{STREAM_NAME}/eval_phase/test_stream/Task000"] == pytest.approx(stream)
    assert 0.5 < stream < 1.0  # the router makes some mistakes here, and beats chance clearly


def test_untrained_classes_are_not_scored(run):
    first = run[2]  # after experience 0: experience 1's classes have no task yet
    assert f"{EXP_NAME}/eval_phase/test_stream/Task000/Exp000" in first
    assert f"{EXP_NAME}/eval_phase/test_stream/Task000/Exp001" not in first
    assert first[f"{STREAM_NAME}/eval_phase/test_stream/Task000"] == 1.0  # one task: always it


def test_loggers_show_it(run):
    text = run[4]
    assert f"{STREAM_NAME}/eval_phase/test_stream/Task000" in text
    assert f"{EXP_NAME}/eval_phase/test_stream/Task000/Exp001" in text


def test_mlflow_logger_files_it(tmp_path):
    from mlflow.tracking import MlflowClient

    from taps_cl.tracking import names
    from taps_cl.tracking.logger import MLflowLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLflowLogger(uri, experiment="ci")
    parts = [(*images(24, c, seed=i), *images(12, c, seed=10 + i))
             for i, c in enumerate(((0, 1), (2, 3)))]  # fmt: skip
    bench = class_incremental_from_tensors(parts)
    s = strategy(evaluator(logger), train_epochs=1)
    with logger:
        for exp in bench.train_stream:
            s.train(exp)
            metrics = s.eval(bench.test_stream)
    client = MlflowClient(uri)
    run_id = logger.run_id
    logged = client.get_run(run_id).data.metrics
    key = f"{STREAM_NAME}/eval_phase/test_stream/Task000"
    assert logged[key] == pytest.approx(metrics[key])
    history = client.get_metric_history(run_id, names.TASK_ID_ACCURACY)
    assert sorted(m.step for m in history) == [0, 1]  # one value per trained experience
    assert logged[names.TASK_ID_ACCURACY] == pytest.approx(metrics[key])


def test_nc_benchmark_stream_trains_routes_and_scores():
    xa, ya = images(60, (0, 1, 2, 3, 4, 5), seed=0)
    xb, yb = images(30, (0, 1, 2, 3, 4, 5), seed=1)
    train, test = TensorDataset(xa, ya), TensorDataset(xb, yb)
    train.targets, test.targets = ya.tolist(), yb.tolist()
    bm = nc_benchmark(train, test, n_experiences=3, task_labels=False, seed=1)
    s = strategy(evaluator())
    for exp in bm.train_stream:
        s.train(exp)
        metrics = s.eval(bm.test_stream)
    order = [sorted(e.classes_in_this_experience) for e in bm.train_stream]
    assert [s.router.classinc.classes[f"exp{i}"].tolist() for i in range(3)] == order
    counts = hand_count(s, bm.test_stream)
    stream = sum(r for r, _ in counts) / sum(t for _, t in counts)
    assert metrics[f"{STREAM_NAME}/eval_phase/test_stream/Task000"] == pytest.approx(stream)
    assert 0.0 <= metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"] <= 1.0


def test_one_class_experiences_train_and_route():
    parts = [(*images(16, (c,), seed=c), *images(10, (c,), seed=20 + c)) for c in range(3)]
    bench = class_incremental_from_tensors(parts)  # 3 experiences of one class each
    s = strategy(evaluator(), train_epochs=1)
    for exp in bench.train_stream:
        s.train(exp)
        metrics = s.eval(bench.test_stream)
    assert s.taps_model.tasks == ["exp0", "exp1", "exp2"]
    assert all(s.router.classinc.classes[f"exp{c}"].tolist() == [c] for c in range(3))
    # With one class a patch cannot be wrong within its task: accuracy is task identification.
    acc = metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert metrics[f"{STREAM_NAME}/eval_phase/test_stream/Task000"] == pytest.approx(acc)
    assert acc > 0.5  # chance over three tasks is 1/3


def test_task_identification_counts_and_bad_input():
    m = TaskIdentification()
    assert m.result() is None
    m.update(["a", "b", "a"], ["a", "a", None])
    assert (m.right, m.total, m.result()) == (1, 2, 0.5)
    m.reset()
    assert m.result() is None
    with pytest.raises(ValueError, match="2 routed tasks for 1"):
        m.update(["a", "b"], ["a"])
    classes = {"exp0": torch.tensor([3, 7]), "exp1": torch.tensor([1])}
    assert owners_of(classes, torch.tensor([7, 1, 2])) == ["exp0", "exp1", None]
    with pytest.raises(ValueError, match="experience=True"):
        task_id_metrics()


def test_metric_refuses_a_strategy_that_does_not_route():
    from avalanche.training import Naive

    model = torch.nn.Linear(4, 2)
    s = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
              evaluator=evaluator())  # fmt: skip
    y = torch.tensor([0, 1] * 4)
    bm = class_incremental_from_tensors([(torch.randn(8, 4), y, torch.randn(8, 4), y)])
    with pytest.raises(TypeError, match="TAPS strategy"):
        s.eval(bm.test_stream)


def test_expected_calibration_error_by_hand():
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.05])
    hit = torch.tensor([1, 0, 1, 1, 0])
    # bins of width 1/15: {0.95, 0.95} acc 0.5; {0.55, 0.55} acc 1.0; {0.05} acc 0.
    expected = (2 * abs(0.5 - 0.95) + 2 * abs(1.0 - 0.55) + abs(0.0 - 0.05)) / 5
    assert expected_calibration_error(conf, hit) == pytest.approx(expected)
    assert expected_calibration_error(torch.ones(4), torch.ones(4)) == 0.0
    with pytest.raises(ValueError, match="as many"):
        expected_calibration_error(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(torch.tensor([1.5]), torch.tensor([1]))


def test_compare_shows_task_identification_when_logged(tmp_path):
    from taps_cl.tracking import compare, log_strategy_result

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_strategy_result("ci", "taps", {"task_id_accuracy": 0.875}, [[0.9]], {}, tracking_uri=uri)
    log_strategy_result("ci", "naive", {}, [[0.5]], {}, tracking_uri=uri)
    report = compare("ci", tmp_path / "report", tracking_uri=uri)
    assert "task id" in report.table and "0.875" in report.table
    assert "task_id_accuracy" in report.csv_path.read_text().splitlines()[0]
