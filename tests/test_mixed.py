"""Mixed-task forward vs each task's merged module on its rows (tiny models of every layer kind).

Tolerance (stated in taps_cl/taps/mixed.py): the mixed path adds ``dW x`` to ``W x`` and folds
norms, so it agrees with the merged module to float32 rounding: max abs logit difference at most
``TOL * (1 + max |logit|)`` on these models, and the same argmax wherever the merged module's
top two logits are further apart than that.
"""

from __future__ import annotations

import pytest
import torch

from taps_cl.config import TAPSConfig
from taps_cl.errors import UnknownTaskError
from taps_cl.taps.merge import shared_merged
from taps_cl.taps.mixed import MixedTaskModel, mixed_logits
from taps_cl.taps.model import TAPSModel
from tests.test_taps_core import CASES, _logits, _x

TOL = 2e-5
KINDS = {
    "dense": {},
    "lowrank_int8": {"delta_rank": 2, "delta_dtype": "int8"},
    "dense_int8": {"delta_dtype": "int8"},
    "lowrank_bf16": {"delta_rank": 2, "delta_dtype": "bfloat16"},
    "dense_bf16": {"delta_dtype": "bfloat16"},
}
# Every architecture with dense float32 and low-rank int8; the other kinds on one model of
# each layer family (conv + batch norm, linear + layer norm, attention).
SMALL = ("tiny_cnn_bn", "tiny_transformer_ln", "transformer_encoder")
MATRIX = [
    pytest.param(case, kind, id=f"{case[0]}-{kind}")
    for case in CASES
    for kind in KINDS
    if kind in ("dense", "lowrank_int8") or case[0] in SMALL
]


def _trained(factory, kind: dict, tasks: int, seed: int = 0) -> TAPSModel:
    """``tasks`` frozen tasks with random deltas, norms and heads of 2 to 5 classes; task i
    closes its first i % 3 gates, so tasks differ in which layers they adapt."""
    model = TAPSModel(factory(), TAPSConfig(**kind)).eval()
    g = torch.Generator().manual_seed(seed)
    for t in range(tasks):
        name = f"t{t}"
        model.add_task(name, 2 + t % 4)
        with torch.no_grad():
            for i, (_, layer) in enumerate(model.layers()):
                for p in layer.trainable_deltas(name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                if i < t % 3:
                    layer.score[name].fill_(model.config.tau / 2)
            for group in ("norm", "head"):
                for p in model.param_groups(name)[group]:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.finalize_task(name)
    return model


def _check(model: TAPSModel, x: torch.Tensor, rows: list[str]) -> float:
    mixed = MixedTaskModel(model, sorted(set(rows)))
    out = mixed(x, rows)
    worst = 0.0
    with torch.no_grad():
        for name in set(rows):
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name])
            ref = _logits(shared_merged(model, name)(x[idx]))
            got = out[idx]
            c = ref.shape[1]
            assert torch.isinf(got[:, c:]).all() and (got[:, c:] < 0).all()
            diff = (got[:, :c] - ref).abs().max().item()
            assert diff <= TOL * (1 + ref.abs().max().item()), (name, diff)
            top2 = ref.topk(min(2, c), dim=1).values
            clear = (top2[:, 0] - top2[:, -1]) > 2 * TOL * (1 + ref.abs().max())
            assert torch.equal(got[:, :c].argmax(1)[clear], ref.argmax(1)[clear])
            worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("case,kind", MATRIX)
def test_mixed_forward_matches_each_merged_task(case, kind):
    _, factory, size = case
    model = _trained(factory, KINDS[kind], tasks=4)
    x = _x(size, n=8)
    rows = ["t0", "t2", "t1", "t3", "t2", "t0", "t3", "t3"]
    _check(model, x, rows)


@pytest.mark.parametrize("tasks", [1, 3, 8])
@pytest.mark.parametrize("arch", ["tiny_cnn_bn", "transformer_encoder"])
def test_one_to_eight_tasks_in_a_batch(arch, tasks):
    _, factory, size = next(c for c in CASES if c[0] == arch)
    model = _trained(factory, {"delta_rank": 2}, tasks=8)
    x = _x(size, n=16)
    rows = [f"t{(i * 5) % tasks}" for i in range(16)]
    _check(model, x, rows)


def test_one_task_is_its_merged_module_and_names_are_checked():
    _, factory, size = CASES[0]
    model = _trained(factory, {}, tasks=2)
    x = _x(size, n=4)
    _check(model, x, ["t1"] * 4)
    with pytest.raises(UnknownTaskError):
        mixed_logits(model, x, ["t0", "t9", "t0", "t0"])
    with pytest.raises(ValueError, match="row tasks"):
        MixedTaskModel(model, ["t0"])(x, ["t0"])
    model.add_task("busy", 3)
    with pytest.raises(ValueError, match="still training"):
        MixedTaskModel(model, ["t0", "busy"])
