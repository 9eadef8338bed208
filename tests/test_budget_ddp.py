"""Budget mode under DDP (two gloo ranks): every rank chooses the same gates and stores the
same patch, within the budget. The scores stop training once the gates are chosen, after DDP
wrapped the model, so this also checks DDP accepts parameters that stop receiving gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 0.5

CHILD = f"""
import os, sys, torch
from safetensors.torch import save_file
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.joint import world
from tests.test_engine import tiny_engine
from tests.test_joint import _tasks
out = sys.argv[1]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
engine = tiny_engine("sqlite://")
captured = {{}}
import taps_cl.engine.taskrun as je
export = je.finalize_run
def spy(model, names, template, train_base):
    patches, base = export(model, names, template, train_base)
    captured["patches"] = patches  # every rank's, though only rank 0 commits
    return patches, base
je.finalize_run = spy
recs = engine.add_tasks(_tasks(), config=TAPSConfig(budget={BUDGET}), quiet=True,
                        train=TrainConfig(epochs=3, batch_size=4, lr=1e-2, device="cpu"))
assert world() == (rank, 2), world()
tensors = {{}}
for patch in captured["patches"]:
    tensors.update({{f"{{patch.name}}/{{k}}": v.contiguous() for k, v in patch.tensors.items()}})
    share = patch.num_parameters / engine.base.num_parameters
    tensors[f"{{patch.name}}/share"] = torch.tensor(share, dtype=torch.float64)
    tensors[f"{{patch.name}}/layers"] = torch.tensor([len(patch.active_layers)])
save_file(tensors, f"{{out}}/rank{{rank}}.safetensors")
"""


def test_budget_under_two_gloo_ranks_agrees_and_fits(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*cmd, str(script), str(tmp_path)], cwd=ROOT, env=env, check=True, timeout=180)
    from safetensors.torch import load_file

    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # same gates, same tensors
    for name in ("t0", "t1", "t2"):
        assert 0 < float(r0[f"{name}/share"]) <= BUDGET * 1.1
    # the budget leaves room for conv1: some task keeps it (a task whose first-order gain
    # from a layer is not positive keeps none, with or without DDP)
    assert sum(int(r0[f"{name}/layers"][0]) for name in ("t0", "t1", "t2")) >= 1
