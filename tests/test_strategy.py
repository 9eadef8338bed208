"""The TAPS Avalanche strategy on a tiny CNN and a 3-experience benchmark of tiny tensors."""

from __future__ import annotations

import warnings

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.evaluation.metrics.acc_matrix import accuracy_matrix_metrics
from avalanche.training.plugins import EvaluationPlugin

from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.errors import UnknownTaskError
from taps_cl.scenarios.avalanche import benchmark_from_tensors, task_classes
from taps_cl.strategies import TAPS, TAPSRouter
from taps_cl.strategies.multihead import build_baseline
from taps_cl.strategies.multitask import PAD_LOGIT
from taps_cl.taps.model import TAPSModel
from taps_cl.training.loop import auto_score_lr
from tests.tiny import tiny_cnn, tiny_images

CLASSES = (3, 2, 4)  # classes per experience: heads of different sizes exercise the padding

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def bench():
    tasks = []
    for t, c in enumerate(CLASSES):
        xa, ya = tiny_images(32, c, seed=t)
        xb, yb = tiny_images(24, c, seed=10 + t)
        tasks.append((xa, ya, xb, yb))
    return benchmark_from_tensors(tasks)


def evaluator() -> EvaluationPlugin:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            *accuracy_matrix_metrics(),
            loggers=[],
        )


def run(strategy, bench, probe_every: bool = True):
    """Train experience by experience, evaluating the seen ones; return per-step outputs on
    every test experience seen so far, and the final metrics."""
    outputs = []
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        metrics = strategy.eval(bench.test_stream[: i + 1])
        if probe_every:
            outputs.append([probe(strategy.model, bench.test_stream[j]) for j in range(i + 1)])
    return outputs, metrics


@torch.no_grad()
def probe(model, exp):
    model.eval()
    x = torch.stack([exp.dataset[k][0] for k in range(len(exp.dataset))])
    return model(x, exp.task_label).clone()


def taps_strategy(**kw):
    torch.manual_seed(0)
    defaults = dict(
        model=tiny_cnn(), train_mb_size=8, train_epochs=4, lr=0.1, lam=0.1, evaluator=evaluator()
    )
    return TAPS(**{**defaults, **kw})


def forgetting(metrics) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("ExperienceForgetting")}


@pytest.fixture(scope="module")
def trained(bench):
    strategy = taps_strategy()
    outputs, metrics = run(strategy, bench)
    return strategy, outputs, metrics


def test_taps_never_forgets(trained):
    strategy, outputs, metrics = trained
    # Outputs on every earlier experience are bit-identical after each later experience.
    for j in range(len(CLASSES)):
        for later in outputs[j + 1 :]:
            assert torch.equal(outputs[j][j], later[j])
    assert len(forgetting(metrics)) == 2 and all(v == 0.0 for v in forgetting(metrics).values())
    assert metrics["StreamForgetting/eval_phase/test_stream"] == 0.0
    assert metrics["StreamBWT/eval_phase/test_stream"] == 0.0
    matrix = metrics["EvalStream/Acc_Matrix"]
    assert matrix.shape == (3, 3)
    for j in range(3):  # lower-triangular-stable: each column constant from its diagonal down
        assert torch.equal(matrix[j:, j], matrix[j, j].expand(3 - j))
    chance = sum(1 / c for c in CLASSES) / len(CLASSES)
    assert float(matrix.diagonal().mean()) > chance + 0.1  # it learned something
    assert sorted(strategy.patches) == [0, 1, 2]
    assert strategy.taps_model.tasks == ["task0", "task1", "task2"]


def test_naive_on_same_benchmark_changes_earlier_experiences(bench):
    # The same checks fail for a fine-tuned shared trunk: they can detect forgetting.
    torch.manual_seed(0)
    naive = build_baseline(
        "naive", tiny_cnn(), task_classes(bench), lr=0.1, train_epochs=3, train_mb_size=8,
        evaluator=evaluator(),
    )  # fmt: skip
    outputs, metrics = run(naive, bench)
    assert not torch.equal(outputs[0][0], outputs[2][0])
    assert any(v != 0.0 for v in forgetting(metrics).values())
    matrix = metrics["EvalStream/Acc_Matrix"]
    assert not torch.equal(matrix[1:, 0], matrix[0, 0].expand(2))


def test_mixed_task_minibatch_routes_each_sample(bench, trained):
    strategy = trained[0]
    router, taps = strategy.router, strategy.taps_model
    xs, ts = [], []
    for exp in bench.test_stream:
        for k in range(6):
            x, _, t = exp.dataset[k]
            xs.append(x)
            ts.append(t)
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))
    x, t = torch.stack(xs)[perm], torch.tensor(ts)[perm]
    router.eval()
    with torch.no_grad():
        out = router(x, t)
        assert out.shape == (len(x), max(CLASSES))
        for label, n in enumerate(CLASSES):
            mask = t == label
            expected = taps(x[mask], task=f"task{label}")
            assert torch.allclose(out[mask, :n], expected, atol=1e-6)
            assert (out[mask, n:] == PAD_LOGIT).all()
            assert (out[mask].argmax(1) < n).all()


def test_untrained_task_raises_clearly(bench):
    strategy = taps_strategy(train_epochs=1)
    strategy.train(bench.train_stream[0])
    with pytest.raises(UnknownTaskError, match="never trained"):
        strategy.eval(bench.test_stream)  # experiences 1 and 2 were never trained
    with pytest.raises(UnknownTaskError):
        strategy.model(torch.rand(2, 3, 16, 16), torch.tensor([0, 2]))
    assert strategy.taps_model.tasks == ["task0"]  # no head was invented
    with pytest.raises(ValueError, match="already trained"):
        strategy.train(bench.train_stream[0])


def test_tasks_up_front_create_all_parameters_before_training(bench):
    strategy = taps_strategy(train_epochs=1, tasks=task_classes(bench))
    before = {id(p) for p in strategy.model.parameters()}
    assert strategy.taps_model.tasks == ["task0", "task1", "task2"]
    with pytest.raises(UnknownTaskError):  # created is not trained
        strategy.eval(bench.test_stream[:1])
    run(strategy, bench, probe_every=False)
    assert {id(p) for p in strategy.model.parameters()} <= before  # nothing added (only pruned)


def test_loss_is_cross_entropy_plus_core_penalty_and_score_lr_is_auto(bench):
    strategy = taps_strategy(train_epochs=2, lam=0.5, size="paper")
    strategy.train(bench.train_stream[0])
    steps = 2 * -(-32 // 8)
    cfg = TAPSConfig(lam=0.5, size="paper")
    assert strategy.score_lr == pytest.approx(auto_score_lr(cfg, TrainConfig(), steps, 2))
    loss_fn = strategy._criterion
    taps = strategy.taps_model
    out, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss_fn.task, loss_fn.steps = "task0", 100
    expected = torch.nn.functional.cross_entropy(out, y) + 0.5 * taps.penalty("task0")
    assert torch.allclose(loss_fn(out, y), expected)
    loss_fn.task = None  # outside training: the plain task loss
    assert torch.allclose(loss_fn(out, y), torch.nn.functional.cross_entropy(out, y))


def test_the_default_size_chooses_gates_once_within_its_bytes(bench):
    """Budget mode through Avalanche, as the trainer runs it: scores only measure importance
    (score lr 0, no penalty), the gates are chosen once, and the patch fits the size."""
    strategy = taps_strategy(train_epochs=2, size=6_000)
    loss_fn = strategy._criterion
    strategy.train(bench.train_stream[0])
    assert strategy.score_lr == 0.0
    patch = strategy.patches[0]
    assert patch.nbytes <= 6_000 and patch.config["size"] == 6_000
    out, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss_fn.task, loss_fn.steps = "task0", 100
    loss_fn.warmup_steps = loss_fn.steps + 1  # as set for a budgeted task: the penalty stays off
    assert torch.allclose(loss_fn(out, y), torch.nn.functional.cross_entropy(out, y))


def test_constructor_validates_input():
    with pytest.raises(TypeError):
        TAPS(model="resnet")
    with pytest.raises(ValueError, match="score_init"):
        TAPS(model=tiny_cnn(), tau=0.5)
    with pytest.raises(ValueError, match="already a TAPSModel"):
        TAPS(model=TAPSModel(tiny_cnn()), lam=2.0)
    with pytest.raises(TypeError, match="commit"):
        TAPS(model=tiny_cnn(), store=object())
    assert isinstance(TAPS(model=tiny_cnn(), lam=0.0).model, TAPSRouter)


def test_commits_each_experience_to_the_store_and_reloads(bench, tmp_path):
    from taps_cl.storage import TaskStore

    store = TaskStore(tmp_path / "tasks.db")
    names = {0: "bright3", 1: "bright2", 2: "bright4"}
    strategy = taps_strategy(train_epochs=1, store=store, task_names=names)
    outputs, _ = run(strategy, bench)
    assert strategy.versions == {0: 1, 1: 1, 2: 1}
    fresh = TAPSModel(tiny_cnn())
    for label, name in names.items():
        patch = store.load(name)
        assert patch.num_classes == CLASSES[label]
        fresh.load_patch(patch)
    reloaded = TAPSRouter(fresh, names)
    reloaded.mark_trained(names)
    for j in range(3):
        assert torch.equal(probe(reloaded, bench.test_stream[j]), outputs[-1][j])


def test_defaults_come_from_train_config_and_optimizer_factories_are_called_per_task(bench):
    plain = TAPS(model=tiny_cnn(), evaluator=evaluator())
    assert plain.train_config == TrainConfig()
    assert (plain.train_epochs, plain.train_mb_size) == (TrainConfig.epochs, TrainConfig.batch_size)
    built = []

    def sgd(groups):
        built.append([len(g["params"]) for g in groups])
        return torch.optim.SGD(groups, lr=0.05, momentum=0.0)

    strategy = taps_strategy(optimizer=sgd, train_epochs=1, peval_mode="iteration")
    assert strategy.train_config.optimizer == TrainConfig.optimizer
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
        assert exp.task_label in strategy.patches
    assert len(built) == 2 and all(sum(sizes) > 0 for sizes in built)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        taps_strategy(optimizer=lambda groups: None, train_epochs=1).train(bench.train_stream[0])
