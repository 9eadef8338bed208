"""Engine end to end on a tiny base and tiny data; one process adds, another predicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taps_cl.bases import Base, Preprocessing
from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.engine import Engine
from taps_cl.errors import BaseMismatchError, TrainingDivergedError, UnknownTaskError
from tests.tiny import tiny_cnn, tiny_images

ROOT = Path(__file__).resolve().parents[1]
FAST = TrainConfig(epochs=2, batch_size=8, lr=1e-2)


def tiny_engine(store: str, seed: int = 0) -> Engine:
    base = Base(tiny_cnn(seed=seed), "tiny", "tests.tiny", Preprocessing(input_size=16))
    return Engine(base, store=store, train=FAST, config=TAPSConfig(lam=0.5))


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tasks.db'}"


def test_add_task_predict_evaluate_and_versions(store):
    engine = tiny_engine(store)
    x, y = tiny_images(32, 3)
    rec = engine.add_task((x, y), name="a", eval_dataset=(x, y), quiet=True)
    assert (rec.name, rec.version, rec.num_layers) == ("a", 1, 2)
    assert 0.0 <= rec.accuracy <= 1.0 and rec.nbytes > 0
    assert rec.parameter_share == pytest.approx(rec.task_parameters / engine.base.num_parameters)
    logits = engine.predict("a", x, logits=True)
    assert logits.shape == (32, 3)
    assert torch.equal(engine.predict("a", x), logits.argmax(1))
    assert engine.evaluate("a", (x, y))["accuracy"] == pytest.approx(rec.accuracy)
    merged = engine.model("a")
    with torch.no_grad():
        assert (merged(engine.preprocess(x, "a")) - logits).abs().max() <= 1e-5
    rec2 = engine.add_task((x, y), name="a", quiet=True, train=TrainConfig(epochs=1, seed=1))
    assert rec2.version == 2
    assert [v.version for v in engine.versions("a")] == [1, 2]
    assert engine.versions("a")[0].config["image_size"] == 16
    assert engine.image_size("a", version=1) == 16
    assert torch.equal(engine.predict("a", x, logits=True, version=1), logits)
    assert engine.remove_task("a", version=2) == [2]
    assert torch.equal(engine.predict("a", x, logits=True), logits)


def test_earlier_tasks_unchanged_after_more_tasks(store):
    engine = tiny_engine(store)
    x, y = tiny_images(32, 3)
    engine.add_task((x, y), name="first", quiet=True)
    before = engine.predict("first", x, logits=True)
    for i in range(2):
        xi, yi = tiny_images(24, 2 + i, seed=i + 5)
        engine.add_task((xi, yi), name=f"next{i}", quiet=True)
    assert torch.equal(engine.predict("first", x, logits=True), before)
    assert torch.equal(tiny_engine(store).predict("first", x, logits=True), before)


@pytest.mark.parametrize(
    "data,kwargs,message",
    [
        (
            (torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 9, 0, 1, 2, 0])),
            {"num_classes": 3},
            "outside",
        ),
        ((torch.rand(0, 3, 16, 16), torch.zeros(0, dtype=torch.long)), {}, "empty"),
        ((torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)), {}, "2 classes"),
        ((torch.rand(8, 3, 16, 16), torch.rand(8)), {}, "integer"),
        ((torch.rand(8, 3, 16, 16),), {}, "expected \\(x, y\\)"),
        ({"x": 1}, {}, "cannot use"),
    ],
)
def test_bad_data_fails_before_training_and_store_is_unchanged(store, data, kwargs, message):
    engine = tiny_engine(store)
    with pytest.raises((ValueError, TypeError), match=message):
        engine.add_task(data, name="bad", quiet=True, **kwargs)
    assert engine.tasks() == [] and engine.store.stats().blobs == 0


def test_failed_training_commits_nothing(store):
    engine = tiny_engine(store)
    x, y = tiny_images(32, 3)
    engine.add_task((x, y), name="good", quiet=True)
    stats = engine.store.stats()
    bad = TrainConfig(epochs=1, batch_size=8, lr=1e30, max_grad_norm=None)
    with pytest.raises(TrainingDivergedError):
        engine.add_task((x, y), name="boom", train=bad, quiet=True)
    assert [t.name for t in engine.tasks()] == ["good"]
    assert engine.store.stats() == stats


def test_unknown_task_and_foreign_base(store, tmp_path):
    engine = tiny_engine(store)
    with pytest.raises(UnknownTaskError, match="no task 'nope'"):
        engine.predict("nope", torch.rand(1, 3, 16, 16))
    x, y = tiny_images(16, 2)
    engine.add_task((x, y), name="a", quiet=True)
    path = engine.export_task("a", tmp_path / "a.safetensors")
    other = tiny_engine(f"sqlite:///{tmp_path / 'other.db'}", seed=1)
    with pytest.raises(BaseMismatchError, match="trained on base"):
        other.import_task(path)
    same = tiny_engine(f"sqlite:///{tmp_path / 'copy.db'}")
    same.import_task(path)
    assert torch.equal(same.predict("a", x, logits=True), engine.predict("a", x, logits=True))


CHILD = """
import sys, torch
from safetensors.torch import save_file
from tests.test_engine import tiny_engine
engine = tiny_engine(sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
save_file({n: engine.predict(n, x, logits=True) for n in ("a", "b")}, sys.argv[3])
"""


def test_other_process_predicts_identically(store, tmp_path):
    engine = tiny_engine(store)
    for name, classes in (("a", 3), ("b", 2)):
        x, y = tiny_images(24, classes, seed=classes)
        engine.add_task((x, y), name=name, quiet=True)
    x = torch.rand(6, 3, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "out.safetensors"
    subprocess.run(
        [sys.executable, "-c", CHILD, store, str(tmp_path / "x.pt"), str(out)],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    from safetensors.torch import load_file

    theirs = load_file(str(out))
    for name in ("a", "b"):
        assert torch.equal(theirs[name], engine.predict(name, x, logits=True))


def test_tracking_logs_one_mlflow_run_per_task(store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = Base(tiny_cnn(), "tiny", "tests.tiny", Preprocessing(input_size=16))
    engine = Engine(base, store=store, train=FAST, tracking=uri, experiment="engine-test")
    x, y = tiny_images(24, 3)
    rec = engine.add_task((x, y), name="tracked", eval_dataset=(x, y), quiet=True)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("engine-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["active_layers"] == len(rec.active_layers)
    assert run.data.metrics["task_parameters"] == rec.task_parameters
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "patch_summary.json" in artifacts and "gates" in artifacts


def test_predict_uses_the_input_size_the_version_was_trained_at(store):
    engine = tiny_engine(store)  # base input size 16
    x, y = tiny_images(24, 3, size=20)
    engine.add_task((x, y), name="big", train=TrainConfig(epochs=1, batch_size=8, image_size=24))
    assert engine.image_size("big") == 24
    assert engine.preprocess(x, "big").shape[-1] == 24
    merged = engine.model("big")
    with torch.no_grad():
        expected = merged(engine.preprocess(x, "big"))
    assert (engine.predict("big", x, logits=True) - expected).abs().max() <= 1e-5
    fresh = tiny_engine(store)
    assert torch.equal(fresh.predict("big", x, logits=True), engine.predict("big", x, logits=True))


def test_opening_an_engine_on_a_known_base_keeps_its_record(store):
    first = tiny_engine(store)
    assert first.store.base(first.fingerprint).name == "tiny"
    relabelled = Base(tiny_cnn(), "renamed", "elsewhere", Preprocessing(input_size=16))
    again = Engine(relabelled, store=store)
    assert again.fingerprint == first.fingerprint
    assert again.store.base(again.fingerprint).name == "tiny"  # no write on open


def test_engine_records_its_base_layout_and_imports_check_the_live_model(store, tmp_path):
    from sqlalchemy import create_engine, text

    from taps_cl.errors import InvalidPatchError
    from taps_cl.storage import read_patch_file
    from taps_cl.storage.serialize import write_patch_file

    engine = tiny_engine(store)
    x, y = tiny_images()
    engine.add_task((x, y), name="shapes")
    layout = engine.store.base_layout(engine.fingerprint)
    assert (
        layout == engine.patch_layout() and layout["num_layers"] == engine.server.model.num_layers
    )
    db = create_engine(store)
    with db.begin() as conn:  # as a base registered before layouts existed
        conn.execute(text("UPDATE bases SET layout = NULL"))
    db.dispose()
    assert tiny_engine(store).store.base_layout(engine.fingerprint) == layout  # filled in again
    patch, meta = read_patch_file(engine.export_task("shapes", tmp_path / "s.safetensors"))
    key = "head.weight"  # one in-feature too many: a head for another base
    patch.tensors[key] = torch.zeros(patch.num_classes, patch.tensors[key].shape[1] + 1)
    bad = write_patch_file(tmp_path / "bad.safetensors", patch, meta)
    with pytest.raises(InvalidPatchError, match=key):
        engine.import_task(bad)
    assert [v.version for v in engine.versions("shapes")] == [1]
    for version in (0, -2, False):
        with pytest.raises(ValueError, match="version must be an int >= 1"):
            engine.predict("shapes", x[:2], version=version)


def test_a_version_is_served_with_the_preprocessing_it_was_trained_with(store):
    from taps_cl.bases import version_preprocessing

    engine = tiny_engine(store)
    x, y = tiny_images(16, 3)
    engine.add_task((x, y), name="a", quiet=True)
    before = engine.predict("a", x, logits=True)
    # the same base, opened later with other preprocessing defaults (e.g. a newer taps_cl)
    other = Preprocessing(input_size=16, interpolation="nearest", crop_pct=0.5)
    later = Engine(Base(tiny_cnn(), "tiny", "tests.tiny", other), store=store)
    assert torch.equal(later.predict("a", x, logits=True), before)
    recorded = engine.versions("a")[0].config["preprocessing"]
    assert recorded["interpolation"] == "bilinear" and recorded["crop_pct"] == 1.0
    # versions stored before preprocessing was recorded: bilinear, no crop, base mean/std
    legacy = version_preprocessing({"image_size": 24}, other)
    assert (legacy.input_size, legacy.interpolation, legacy.crop_pct) == (24, "bilinear", 1.0)
    assert legacy.mean == other.mean
