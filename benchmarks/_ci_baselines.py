"""Training-free baselines of ``class_incremental.py`` on the frozen base's pooled features.

Every baseline sees the same features (one eval-mode base pass per stream, shared):

- NCM: class means, cosine similarity (SimpleCIL).
- RanPAC-style head: ``h = ReLU(W z)`` with a fixed random ``W`` (M = 2000), ridge over every
  class seen so far from the accumulated Gram ``G = sum h h^T`` and ``C = sum h y^T``, lambda by
  GCV on the training statistics alone (:func:`taps_cl.routing.closedform.ridge_from_moments`).
- Closed-form ridge head per task (LOO lambda), the true task given: the within-task reference
  a TAPS patch should at least match.

Both class-incremental heads also identify tasks: the task owning the best class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks._ci_streams import batches, owners
from taps_cl.routing.closedform import ridge_from_moments, ridge_head
from taps_cl.routing.ranpac import RandomProjection
from taps_cl.strategies.multihead import split_head

RANPAC_M = 2000


@dataclass
class Frozen:
    """Base features ``[n, d]`` and global labels per experience, train and test."""

    train: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    owner: dict[int, int]  # global class -> experience
    seconds: float  # the base passes


@torch.no_grad()
def frozen_features(base: nn.Module, bench: Any) -> Frozen:
    features, _ = split_head(base)
    features.eval()

    def embed(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        zs, ys = zip(*((features(x), y) for x, y in batches(dataset)), strict=True)
        return torch.cat(zs).double(), torch.cat(ys)

    start = time.perf_counter()
    train = [embed(e.dataset) for e in bench.train_stream]
    test = [embed(e.dataset) for e in bench.test_stream]
    return Frozen(train, test, owners(bench), time.perf_counter() - start)


def _summary(name: str, matrix: list[list[float]], sizes: list[int]) -> dict[str, Any]:
    final = sum(a * s for a, s in zip(matrix[-1], sizes, strict=True)) / sum(sizes)
    n = len(matrix)
    drops = [max(matrix[i][j] for i in range(j, n - 1)) - matrix[-1][j] for j in range(n - 1)]
    return dict(strategy=name, final_avg_accuracy=final,
                avg_forgetting=sum(drops) / len(drops) if drops else 0.0,
                accuracy_matrix=matrix)  # fmt: skip


def _grouped_task_id(frozen: Frozen, predicted: list[torch.Tensor]) -> float:
    """Share of test samples whose best class belongs to their own experience's task."""
    right = total = 0
    for (_, y), pred in zip(frozen.test, predicted, strict=True):
        own = torch.tensor([frozen.owner[int(c)] for c in y.tolist()])
        got = torch.tensor([frozen.owner[int(c)] for c in pred.tolist()])
        right += int((own == got).sum())
        total += len(y)
    return right / total


def run_ncm(frozen: Frozen) -> dict[str, Any]:
    """Nearest class mean (cosine); the means grow per experience."""
    start = time.perf_counter()
    tests = [(nn.functional.normalize(z, dim=1), y) for z, y in frozen.test]
    means: dict[int, torch.Tensor] = {}
    matrix, preds = [], []
    for z, y in frozen.train:
        zn = nn.functional.normalize(z, dim=1)
        for c in y.unique().tolist():
            means[c] = zn[y == c].mean(0)
        ids = torch.tensor(sorted(means))
        table = nn.functional.normalize(torch.stack([means[c] for c in ids.tolist()]), dim=1)
        preds = [ids[(zt @ table.T).argmax(1)] for zt, _ in tests]
        matrix.append(
            [float((p == yt).double().mean()) for p, (_, yt) in zip(preds, tests, strict=True)]
        )
    out = _summary("ncm", matrix, [len(y) for _, y in tests])
    dim, classes = frozen.train[0][0].shape[1], len(means)
    out.update(task_id_accuracy=_grouped_task_id(frozen, preds),
               bytes_per_task={"total": 4.0 * dim * classes / len(frozen.train)},
               wall_time_s=time.perf_counter() - start + frozen.seconds)  # fmt: skip
    return out


def run_ranpac(frozen: Frozen, size: int = RANPAC_M, seed: int = 0) -> dict[str, Any]:
    """The RanPAC-style head: ridge on random ReLU features over every class seen so far."""
    start = time.perf_counter()
    proj = RandomProjection(frozen.train[0][0].shape[1], size, seed, dtype=torch.float64)
    gram = torch.zeros(size, size, dtype=torch.float64)
    cross: dict[int, torch.Tensor] = {}  # class -> sum of h over its samples
    count, matrix, preds, lams = 0, [], [], []
    tests = [(proj(z), y) for z, y in frozen.test]
    for z, y in frozen.train:
        h = proj(z)
        gram += h.T @ h
        count += len(y)
        for c in y.unique().tolist():
            cross[c] = cross.get(c, torch.zeros(size, dtype=torch.float64)) + h[y == c].sum(0)
        ids = torch.tensor(sorted(cross))
        weight, lam = ridge_from_moments(gram, torch.stack([cross[c] for c in ids.tolist()], 1),
                                         count, float(count))  # fmt: skip
        lams.append(lam)
        preds = [ids[(ht @ weight).argmax(1)] for ht, _ in tests]
        matrix.append(
            [float((p == yt).double().mean()) for p, (_, yt) in zip(preds, tests, strict=True)]
        )
    out = _summary("ranpac", matrix, [len(y) for _, y in tests])
    shared = 8.0 * size * (size + len(cross))  # the Gram and the class sums, float64
    out.update(task_id_accuracy=_grouped_task_id(frozen, preds),
               bytes_per_task={"total": shared / len(frozen.train), "shared": shared},
               wall_time_s=time.perf_counter() - start + frozen.seconds,
               ranpac={"M": size, "lambda": lams})  # fmt: skip
    return out


def ridge_within_task(frozen: Frozen) -> float:
    """Within-task accuracy of a closed-form ridge head per task (LOO lambda), true task given."""
    right = total = 0
    for (z, y), (zt, yt) in zip(frozen.train, frozen.test, strict=True):
        ids = torch.tensor(sorted(set(y.tolist())))
        if len(ids) == 1:  # one class: nothing to tell apart within the task
            right, total = right + len(yt), total + len(yt)
            continue
        local = (y[:, None] == ids[None, :]).long().argmax(1)
        head = ridge_head(z, local, len(ids), temperature=False)
        pred = ids[head.logits(zt).argmax(1)]
        right += int((pred == yt).sum())
        total += len(yt)
    return right / total
