"""Joint mode on tiny models: patches reload exactly, base handling, DDP on 2 CPU processes,
all-or-nothing commits, and the CLI."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taps_cl.bases import fingerprint
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.data import prepare
from taps_cl.engine.taskrun import finalize_run
from taps_cl.errors import TrainingDivergedError
from taps_cl.joint import JointConfig, fit_joint, task_batch_sizes
from taps_cl.taps.model import TAPSModel
from tests.test_engine import tiny_engine
from tests.tiny import tiny_cnn, tiny_images

ROOT = Path(__file__).resolve().parents[1]
FAST = TrainConfig(epochs=2, batch_size=8, lr=1e-2)


def _tasks(sizes=((24, 3), (16, 2), (40, 4))) -> dict:
    return {f"t{i}": tiny_images(n, k, seed=i + 1) for i, (n, k) in enumerate(sizes)}


def _prepared(tasks: dict) -> dict:
    from taps_cl.bases import Preprocessing

    return {n: prepare(d, preprocessing=Preprocessing(input_size=16)) for n, d in tasks.items()}


def _joint_model(data: dict, base=None) -> TAPSModel:
    model = TAPSModel(copy.deepcopy(base or tiny_cnn()), TAPSConfig(lam=0.5))
    for name, d in data.items():
        model.add_task(name, d.num_classes)
    return model


def _logits(model, name, x):
    with torch.no_grad():
        return model.eval()(x, task=name)


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.mark.parametrize("train_base", [False, True])
def test_fit_joint_patches_reload_exactly(train_base):
    base = tiny_cnn()
    data = _prepared(_tasks())
    model = _joint_model(data, base)
    result = fit_joint(
        model, data, FAST, joint=JointConfig(epoch_length="min"), train_base=train_base
    )
    # "min": the smallest task (16 examples, batch 8) sets 2 steps per epoch.
    assert result.steps == 4 and result.examples == 4 * 3 * 8
    x = torch.rand(5, 3, 16, 16)
    patches, new_base = finalize_run(model, list(data), base, train_base)
    if train_base:
        assert new_base is not None and fingerprint(new_base) != fingerprint(base)
        assert all(p.base_fingerprint == fingerprint(new_base) for p in patches)
        # the untouched parts of the base: original head and base norms
        assert torch.equal(new_base.fc.weight, base.fc.weight)
        assert torch.equal(new_base.bn1.running_mean, base.bn1.running_mean)
    else:
        assert new_base is None
        assert all(p.base_fingerprint == fingerprint(base) for p in patches)
        assert fingerprint(base) == fingerprint(tiny_cnn())  # nothing trained the base
    fresh = TAPSModel(copy.deepcopy(new_base if train_base else base), TAPSConfig(lam=0.5))
    for patch in patches:
        fresh.load_patch(patch)
        assert torch.equal(_logits(fresh, patch.name, x), _logits(model, patch.name, x))
    assert all(len(f.history) == 2 for f in result.fits.values())


def test_bf16_autocast_path_runs_on_cpu():
    # The CUDA precision path (bf16 autocast) exercised on CPU through TrainConfig.amp_cpu.
    data = _prepared(_tasks(((16, 2), (16, 3))))
    model = _joint_model(data)
    train = TrainConfig(epochs=1, batch_size=8, lr=1e-2, amp_cpu=True)
    result = fit_joint(model, data, train)
    assert result.steps == 2 and all(h["loss"] > 0 for h in result.history)
    assert all(len(f.active_layers) <= model.num_layers for f in result.fits.values())


def test_batch_sizes_ratios_and_validation():
    sizes = task_batch_sizes(["a", "b"], FAST, JointConfig(ratios={"b": 2.0}), world_size=2)
    assert sizes == {"a": 8, "b": 16}
    with pytest.raises(ValueError, match="do not divide"):
        task_batch_sizes(["a"], TrainConfig(batch_size=5), JointConfig(), world_size=2)
    with pytest.raises(ValueError, match="not in this run"):
        task_batch_sizes(["a"], FAST, JointConfig(ratios={"zz": 1.0}))
    with pytest.raises(ValueError, match="epoch_length"):
        JointConfig(epoch_length="longest")
    with pytest.raises(ValueError, match="> 0"):
        JointConfig(ratios={"a": 0})
    assert JointConfig.from_json(JointConfig(ratios={"a": 2}).to_json()).ratios == {"a": 2.0}


def test_engine_add_tasks_joint_keeps_base_and_commits(store):
    engine = tiny_engine(store)
    tasks = _tasks()
    sampling = JointConfig(epoch_length=3, ratios={"t2": 2.0})
    recs = engine.add_tasks(tasks, eval_datasets=tasks, sampling=sampling, quiet=True)
    assert [r.name for r in recs] == ["t0", "t1", "t2"] and all(r.version == 1 for r in recs)
    assert all(r.base_fingerprint == engine.fingerprint for r in recs)
    assert all(0 <= r.accuracy <= 1 and len(r.history) == 2 for r in recs)
    assert sorted(t.name for t in engine.tasks()) == ["t0", "t1", "t2"]
    version = engine.versions("t2")[0]
    assert version.config["joint"]["sampling"]["ratios"] == {"t2": 2.0}
    assert version.metrics["joint_steps"] == 6
    assert version.config["layer_order"] == ["conv1", "conv2"]  # gate pictures keep model order
    # t2's 40 samples in minibatches of 16: passes of 16, 16, 8 (a partial batch is kept)
    assert version.metrics["joint_examples"] == 6 * (8 + 8) + 2 * (16 + 16 + 8)
    reopened = tiny_engine(store)
    for name, (x, _) in tasks.items():
        assert torch.equal(reopened.predict(name, x, logits=True), engine.predict(name, x, True))


def test_train_base_stores_new_base_and_old_tasks_stay_bitwise(store):
    engine = tiny_engine(store)
    x_old, y_old = tiny_images(24, 3, seed=9)
    engine.add_task((x_old, y_old), name="old", quiet=True)
    before = engine.predict("old", x_old, logits=True)
    tasks = _tasks(((24, 3), (16, 2)))
    recs = engine.add_tasks(tasks, train_base=True, quiet=True)
    new_fp = recs[0].base_fingerprint
    assert new_fp != engine.fingerprint and {r.base_fingerprint for r in recs} == {new_fp}
    assert {b.fingerprint for b in engine.store.list_bases()} == {engine.fingerprint, new_fp}
    assert [t.name for t in engine.tasks()] == ["old"]  # new tasks live on the new base
    assert torch.equal(engine.predict("old", x_old, logits=True), before)
    assert torch.equal(tiny_engine(store).predict("old", x_old, logits=True), before)
    assert fingerprint(engine.base_model) == engine.fingerprint
    joint = engine.open_stored_base(new_fp)
    assert joint.fingerprint == new_fp and sorted(t.name for t in joint.tasks()) == ["t0", "t1"]
    x, _ = tasks["t0"]
    out = joint.predict("t0", x, logits=True)
    assert out.shape == (24, 3)
    assert torch.equal(tiny_engine(store).open_stored_base(new_fp).predict("t0", x, True), out)


@pytest.mark.parametrize("joint", [True, False])
def test_invalid_task_data_commits_nothing(store, joint):
    engine = tiny_engine(store)
    tasks = _tasks(((24, 3), (16, 2)))
    tasks["bad"] = (torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 9, 0, 1, 2, 0]))
    with pytest.raises(ValueError, match="task 'bad'.*no examples"):
        engine.add_tasks(tasks, joint=joint, eval_datasets=None, quiet=True, sampling=None)
    assert engine.tasks() == [] and engine.store.stats().blobs == 0
    with pytest.raises(ValueError, match="eval_datasets names tasks"):
        engine.add_tasks(_tasks(), eval_datasets={"nope": tasks["t0"]}, quiet=True)


def test_failure_after_training_commits_nothing(store, monkeypatch):
    engine = tiny_engine(store)
    bad = TrainConfig(epochs=1, batch_size=8, lr=1e30, max_grad_norm=None)
    with pytest.raises(TrainingDivergedError):
        engine.add_tasks(_tasks(), train=bad, quiet=True)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(engine.store, "commit_many", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        engine.add_tasks(_tasks(), train=TrainConfig(epochs=1, batch_size=8), quiet=True)
    assert engine.tasks() == [] and engine.store.stats().blobs == 0


def test_two_process_gloo_run_gives_identical_patches(tmp_path, store):
    script = tmp_path / "child.py"
    script.write_text(CHILD_PATCHES)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run(
        [*cmd, str(script), store, str(tmp_path)], cwd=ROOT, env=env, check=True, timeout=180
    )
    from safetensors.torch import load_file

    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and len(r0) > 10
    assert r0["meta/versions"].tolist() == [1, 1, 1]
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    engine = tiny_engine(store)
    fp = bytes(r0["meta/fp"].tolist()).hex()
    stored = engine.open_stored_base(fp)
    for name in ("t0", "t1", "t2"):
        patch = stored.load_patch(name)
        for key, value in patch.tensors.items():
            assert torch.equal(value, r0[f"{name}/{key}"]), key


CHILD_PATCHES = """
import os, sys, torch
from safetensors.torch import save_file
from taps_cl.joint import world
from tests.test_engine import tiny_engine
from tests.test_joint import _tasks
store, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
engine = tiny_engine(store if rank == 0 else "sqlite://")  # only rank 0 writes to the store
captured = {}
import taps_cl.engine.taskrun as je
export = je.finalize_run
def spy(model, names, template, train_base):
    patches, base = export(model, names, template, train_base)
    captured["patches"], captured["base"] = patches, base
    return patches, base
je.finalize_run = spy
import taps_cl.joint.fit as jf
sync = jf.broadcast_state
def params_before_sync(model, world_size):
    # DDP averaged the gradients, so parameters already agree before the final broadcast.
    captured["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    sync(model, world_size)
jf.broadcast_state = params_before_sync
recs = engine.add_tasks(_tasks(), train_base=True, quiet=True)
assert world() == (rank, 2), world()
patches = captured["patches"]
tensors = {f"{p.name}/{k}": v.contiguous() for p in patches for k, v in p.tensors.items()}
tensors.update({f"base/{k}": v.contiguous() for k, v in captured["base"].state_dict().items()})
tensors["meta/params"] = captured["params"]
tensors["meta/fp"] = torch.tensor(list(bytes.fromhex(recs[0].base_fingerprint)))
tensors["meta/versions"] = torch.tensor([r.version for r in recs])
save_file(tensors, f"{out}/rank{rank}.safetensors")
"""


def test_cli_add_tasks_joint_and_bad_ratio(tmp_path, capsys):
    from taps_cl.cli import main
    from tests.test_cli import _folder

    store = str(tmp_path / "s.db")
    a, b = _folder(tmp_path / "shapes"), _folder(tmp_path / "tones", classes=3, per_class=4)
    common = ["--store", store, "--base", "timm-random:test_efficientnet", "--quiet"]
    argv = ["--data", str(a), "--data", str(b), "--epochs", "1", "--image-size", "32"]
    assert main(["add-tasks", "--joint", *argv, "--batch-size", "4", *common]) == 0
    out = capsys.readouterr().out
    assert "shapes" in out and "tones" in out
    from taps_cl.storage import TaskStore

    assert sorted(t.name for t in TaskStore(store).list_tasks()) == ["shapes", "tones"]
    assert main(["joint", *argv, "--ratio", "tones", *common]) == 2
    assert "TASK=FACTOR" in capsys.readouterr().err
