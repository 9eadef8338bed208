"""Class-incremental streams (split digits, 10 x 1, Avalanche's nc_benchmark over the same data)
and the training-free heads of benchmarks/class_incremental.py on synthetic features."""

from __future__ import annotations

import pytest
import torch

from benchmarks._ci_baselines import Frozen, ridge_within_task, run_ncm, run_ranpac
from benchmarks._ci_report import targets
from taps_cl.bases.preprocessing import Preprocessing

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def prep() -> Preprocessing:
    return Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_split_digits_streams_and_lazy_names():
    import taps_cl.scenarios as sc

    five = sc.split_digits_ci(prep(), 16, 5, max_train=20, max_test=10)
    assert [sorted(e.classes_in_this_experience) for e in five.train_stream] == [
        [0, 1], [2, 3], [4, 5], [6, 7], [8, 9]
    ]  # fmt: skip
    ten = sc.split_digits_ci(prep(), 16, 10, max_train=8, max_test=4)
    assert [sorted(e.classes_in_this_experience) for e in ten.train_stream] == [
        [c] for c in range(10)
    ]
    assert all(len(e.dataset) == 8 for e in ten.train_stream)
    x, y, t = ten.test_stream[3].dataset[0]
    assert x.shape == (3, 16, 16) and y == 3 and t == 0
    with pytest.raises(ValueError, match="1, 2, 5 or 10"):
        sc.split_digits_ci(prep(), 16, 3)


def test_nc_benchmark_from_suite_keeps_global_labels():
    from taps_cl.scenarios import nc_benchmark_from_suite
    from taps_cl.scenarios.suite import digits

    bm = nc_benchmark_from_suite([digits(max_train=50, max_test=20)], prep(), 16, 5, seed=3)
    seen = [sorted(e.classes_in_this_experience) for e in bm.train_stream]
    assert sorted(c for s in seen for c in s) == list(range(10))
    for exp in bm.test_stream:
        own = set(exp.classes_in_this_experience)
        assert {int(exp.dataset[i][1]) for i in range(len(exp.dataset))} <= own


def synthetic_frozen(noise: float = 0.3) -> Frozen:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 8, generator=g, dtype=torch.float64) * 2

    def part(classes, n):
        y = torch.tensor(classes).repeat(n)
        return centres[y] + noise * torch.randn(len(y), 8, generator=g, dtype=torch.float64), y

    groups = ((0, 1), (2, 3), (4, 5))
    return Frozen([part(c, 20) for c in groups], [part(c, 10) for c in groups],
                  {c: j for j, cs in enumerate(groups) for c in cs}, 0.0)  # fmt: skip


def test_training_free_heads_on_separable_features():
    frozen = synthetic_frozen()
    for out in (run_ncm(frozen), run_ranpac(frozen, size=200)):
        assert out["final_avg_accuracy"] > 0.95 and out["task_id_accuracy"] > 0.95
        assert len(out["accuracy_matrix"]) == 3 and out["accuracy_matrix"][0][1] == 0.0
    assert ridge_within_task(frozen) > 0.95


def test_targets_met_and_missed():
    from benchmarks.class_incremental import Result

    def r(name, acc, task_id=None, **kw):
        return Result("multi_domain", name, acc, 0.0, 1.0, [[acc]], task_id, **kw)

    rows = targets([
        r("taps", 0.80, 0.95, bytes_per_task={"route_stats": 70_000.0},
          within_task_accuracy=0.9, extra={"ridge_within_task_accuracy": 0.92}),
        r("ranpac", 0.79, 0.90), r("cumulative", 0.81),
    ])  # fmt: skip
    met = {t["target"]: t["met"] for t in rows}
    assert met == {
        "acc >= ranpac + 0.02": False, "acc >= cumulative - 0.02": True,
        "task id >= ranpac grouped + 0.03": True, "task id >= 0.99": False,
        "within-task >= closed-form ridge": False, "route stats <= 128 KiB/task": True,
    }  # fmt: skip


def test_taps_report_and_joint_upper_bound_on_a_tiny_stream():
    import argparse

    from benchmarks._ci_taps import run_joint, taps_report
    from taps_cl.scenarios.streams import class_incremental_from_tensors
    from taps_cl.strategies import TAPS
    from tests.test_task_id_metric import evaluator, images
    from tests.tiny import tiny_cnn

    parts = [
        (*images(24, c, seed=i), *images(12, c, seed=10 + i)) for i, c in enumerate(((0, 1), (2,)))
    ]  # fmt: skip  (a one-class experience)
    bench = class_incremental_from_tensors(parts)
    torch.manual_seed(0)
    s = TAPS(model=tiny_cnn(), train_mb_size=8, train_epochs=1, lr=0.05, lam=0.1,
             evaluator=evaluator())  # fmt: skip
    for exp in bench.train_stream:
        s.train(exp)
    metrics = s.eval(bench.test_stream)
    report = taps_report(s, bench)
    key = "TaskIdentification_Stream/eval_phase/test_stream/Task000"
    assert report["task_id_accuracy"] == pytest.approx(metrics[key])
    assert 0 <= report["ece"] <= 1 and 0 <= report["task_id_ece"] <= 1
    assert 0 <= report["within_task_accuracy"] <= 1
    args = argparse.Namespace(lam=0.1, warmup_epochs=0.0, lr=0.05, batch_size=8, epochs=1, seed=0)
    joint = run_joint(tiny_cnn(), bench, args)
    assert joint["task_id_accuracy"] == 1.0 and len(joint["accuracy_matrix"][0]) == 2
    assert joint["accuracy_matrix"][0][1] == 1.0  # one class: the true task cannot be wrong
