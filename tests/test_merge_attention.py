"""merge_patch on a base with gated attention (it loads the patch under a scratch task name)."""

from __future__ import annotations

import torch

from taps_cl.taps.merge import merge_patch
from taps_cl.taps.model import TAPSModel
from tests.test_taps_core import ATTENTION, CASES, _perturb, _x


def test_merge_patch_folds_a_patch_onto_a_base_with_gated_attention():
    name, factory, size = next(c for c in CASES if c[0] in ATTENTION)
    model = TAPSModel(factory()).eval()
    model.add_task("a", 3)
    _perturb(model, "a", seed=4)
    patch = model.finalize_task("a")
    fresh = TAPSModel(factory()).eval()
    fresh.add_task("merge-scratch-0", 3)  # a task of that name is left alone
    x = _x(size)
    with torch.no_grad():
        out = merge_patch(fresh, patch)(x)
        assert (out - model(x, task="a")).abs().max() <= 1e-5
    assert fresh.tasks == ["merge-scratch-0"]
