"""What ``class_incremental.py`` measures of TAPS beyond Avalanche's accuracy: task
identification, within-task accuracy with the true task given, calibration of the routed
confidence, and the joint upper bound with oracle task ids.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from torch.utils.data import TensorDataset

from benchmarks._ci_streams import batches, owners, tensors
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.joint import fit_joint
from taps_cl.strategies.metrics import expected_calibration_error
from taps_cl.taps.model import TAPSModel

ECE_BINS = 15


@torch.no_grad()
def taps_report(strategy: Any, bench: Any) -> dict[str, float]:
    """One routed pass over the test stream of a class-incremental TAPS strategy.

    Confidence of a routed prediction = P(task) from the router x P(class) from the routed
    patch's softmax (as ``Routed.confidence``); ECE is of that against end-to-end correctness,
    and of P(task) alone against task identification."""
    ci, taps = strategy.router.classinc, strategy.taps_model
    owner = {c: f"exp{j}" for c, j in owners(bench).items()}
    taps.eval()
    conf, hit, task_conf, task_hit, within = [], [], [], [], []
    for exp in bench.test_stream:
        for x, y in batches(exp.dataset):
            out = ci.forward(taps, x, None)
            route = ci.last_route
            prob = out.double().softmax(1)
            conf.append(route.confidence * prob.max(1).values)
            hit.append(out.argmax(1) == y)
            own = [owner[int(c)] for c in y.tolist()]
            task_conf.append(route.confidence)
            task_hit.append(
                torch.tensor([r == o for r, o in zip(route.task_names, own, strict=True)])
            )
            within.append(_true_task_hits(ci, taps, x, y, own))
    hits = torch.cat(task_hit)
    return {
        "task_id_accuracy": float(hits.double().mean()),
        "within_task_accuracy": float(torch.cat(within).double().mean()),
        "ece": expected_calibration_error(torch.cat(conf), torch.cat(hit), ECE_BINS),
        "task_id_ece": expected_calibration_error(torch.cat(task_conf), hits, ECE_BINS),
    }


def _true_task_hits(ci: Any, taps: TAPSModel, x: torch.Tensor, y: torch.Tensor, own: list):
    """Per sample: is the class right when its true task's patch answers?"""
    hits = torch.zeros(len(y), dtype=torch.bool)
    for name in set(own):
        idx = torch.tensor([i for i, o in enumerate(own) if o == name])
        pred = ci.classes[name][taps(x[idx], task=name).argmax(1)]
        hits[idx] = pred == y[idx]
    return hits


def run_joint(base: torch.nn.Module, bench: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Upper bound: every experience's task trained together (``fit_joint``), each test sample
    answered by its TRUE task's patch (oracle task id). Same base, data, epochs and lr."""
    start = time.perf_counter()
    model = TAPSModel(
        copy.deepcopy(base), TAPSConfig(lam=args.lam, warmup_epochs=args.warmup_epochs)
    )
    tasks, classes = {}, {}
    for j, exp in enumerate(bench.train_stream):
        x, y = tensors(exp.dataset)
        ids = torch.tensor(sorted(set(y.tolist())))
        name = f"exp{j}"
        model.add_task(name, len(ids))
        classes[name] = ids
        tasks[name] = TensorDataset(x, (y[:, None] == ids[None, :]).long().argmax(1))
    train = TrainConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                        device="cpu", seed=args.seed)  # fmt: skip
    fit_joint(model, tasks, train, quiet=True)
    model.eval()
    accs, sizes = [], []
    with torch.no_grad():
        for j, exp in enumerate(bench.test_stream):
            x, y = tensors(exp.dataset)
            name = f"exp{j}"
            pred = classes[name][model(x, task=name).argmax(1)] if len(x) else y
            accs.append(float((pred == y).double().mean()))
            sizes.append(len(y))
    final = sum(a * s for a, s in zip(accs, sizes, strict=True)) / sum(sizes)
    return dict(strategy="joint_oracle", final_avg_accuracy=final, avg_forgetting=0.0,
                accuracy_matrix=[accs], within_task_accuracy=final, task_id_accuracy=1.0,
                wall_time_s=time.perf_counter() - start)  # fmt: skip
