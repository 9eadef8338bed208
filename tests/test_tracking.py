"""taps_cl.tracking against real MLflow stores: SQLite files and a real `mlflow server` over HTTP.

Creating an MLflow SQLite database runs ~50 Alembic migrations (seconds), so one migrated
template is made per module and copied for each test; the server gets a copy as well and is
started early (module fixture) so that it boots while the other tests run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from taps_cl.config import TAPSConfig
from taps_cl.storage import TaskStore
from taps_cl.taps.model import TAPSModel
from taps_cl.tracking import names
from taps_cl.tracking.client import UnknownExperimentError, resolve_tracking_uri
from taps_cl.tracking.gates import gates_figure
from taps_cl.tracking.matrix import summarize, validate_matrix
from taps_cl.tracking.report import FIGURES, compare
from taps_cl.tracking.runs import log_strategy_result, log_task_run
from tests.tiny import tiny_cnn

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ACC_KEY = "Top1_Acc_Exp/eval_phase/test_stream/Exp{:03d}"  # no task labels: no Task000/


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` outside CI; fail in CI (same rule as tests/conftest.py)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    # Migrations commit (fsync) one by one: ~3x faster on tmpfs when the machine has one.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="taps_cl_mlflow_", dir=shm))
    else:
        root = tmp_path_factory.mktemp("mlflow_template")
    path = root / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
    final = tmp_path_factory.mktemp("mlflow_template_db") / "template.db"
    shutil.copy(path, final)
    shutil.rmtree(root, ignore_errors=True)
    return final


@pytest.fixture
def uri(tmp_path, template_db) -> str:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def server_proc(tmp_path_factory, template_db):
    """Start `mlflow server` on a free loopback port as soon as the module starts."""
    root = tmp_path_factory.mktemp("mlflow_server")
    shutil.copy(template_db, root / "server.db")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--workers", "1"]
    cmd += ["--artifacts-destination", str(root / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    yield proc, f"http://127.0.0.1:{port}", root
    if proc.poll() is None:
        # The group this fixture created (server, uvicorn); a throwaway server needs no grace.
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


# -- names and the accuracy matrix ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (ACC_KEY.format(0), ACC_KEY.format(0)),  # Avalanche names are already valid
        ("Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000",) * 2,
        ("Loss[x]=1", "Loss_x__1"),
        ("a//b/", "a/b"),
        ("./x/../y", "_/x/_/y"),
        ("top1:acc (%)", "top1_acc ___"),
        ("Genauigkeit/Größe", "Genauigkeit/Gr__e"),
        ("", "_"),
    ],
)
def test_sanitize_key(name, key):
    assert names.sanitize_key(name) == key


def test_sanitize_long_keys_stay_distinct():
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    ka, kb = names.sanitize_key(a), names.sanitize_key(b)
    assert len(ka) == len(kb) == 250 and ka != kb and ka == names.sanitize_key(a)


def test_summary_of_a_known_matrix():
    got = summarize(validate_matrix([[0.9, 0.1, 0.1], [0.7, 0.8, None], [0.5, 0.6, 0.9]]))
    assert got[names.FINAL_AVG_ACCURACY] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert got["forgetting_exp0"] == pytest.approx(0.4)  # best 0.9 (after exp 0), now 0.5
    assert got["forgetting_exp1"] == pytest.approx(0.2)
    assert got[names.AVG_FORGETTING] == pytest.approx(0.3)
    assert got[names.BWT] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    with pytest.raises(ValueError, match="percentages"):
        validate_matrix([[90.0]])


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert resolve_tracking_uri(tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()  # MLflow itself would fall back to this file store
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


# -- the Avalanche logger -------------------------------------------------------------------------


def _tiny_benchmark():
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils import (
        ConstantSequence,
        DataAttribute,
        TaskAwareSupervisedClassificationDataset,
        TaskLabels,
    )
    from torch.utils.data import TensorDataset

    def dataset(seed: int, offset: int) -> TaskAwareSupervisedClassificationDataset:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(32) % 2 + offset
        x = torch.randn(32, 8, generator=g) + y.float().view(-1, 1)
        targets = DataAttribute([int(t) for t in y], "targets")
        labels = TaskLabels(ConstantSequence(0, 32))
        return TaskAwareSupervisedClassificationDataset(
            [TensorDataset(x, y)], data_attributes=[targets, labels]
        )

    return benchmark_from_datasets(
        train=[dataset(0, 0), dataset(1, 2)], test=[dataset(2, 0), dataset(3, 2)]
    )


def test_logger_drives_a_real_avalanche_run(uri):
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from taps_cl.tracking.logger import MLflowLogger

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    logger = MLflowLogger(uri, experiment="avl", params={"benchmark": "tiny"})
    plugin = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[logger],
    )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=16,
        train_epochs=1,
        eval_mb_size=32,
        evaluator=plugin,
        device="cpu",
    )
    bm = _tiny_benchmark()
    with logger:
        for exp in bm.train_stream:
            strategy.train(exp)
            strategy.eval(bm.test_stream)
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "Naive" and run.info.status == "FINISHED"
    assert run.data.params["strategy"] == "Naive" and run.data.params["train_mb_size"] == "16"
    assert run.data.params["benchmark"] == "tiny"
    metrics = run.data.metrics
    for key in (
        ACC_KEY.format(0),
        ACC_KEY.format(1),
        "Top1_Acc_Stream/eval_phase/test_stream",
    ):
        assert key in metrics
    assert "StreamForgetting/eval_phase/test_stream" in metrics
    # Avalanche steps are its x_plot counters: strictly increasing per key.
    history = client.get_metric_history(run.info.run_id, ACC_KEY.format(0))
    assert len(history) == 2 and history[0].step < history[1].step
    # The standard names hold the accuracy matrix: acc_exp{j} at step i = row i.
    matrix = logger.accuracy_matrix()
    assert len(matrix) == 2 and len(matrix[0]) == 2
    for j in range(2):
        steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"acc_exp{j}")}
        assert steps == pytest.approx({0: matrix[0][j], 1: matrix[1][j]})
    assert matrix[1][0] == pytest.approx(history[1].value)  # the same number Avalanche logged
    assert metrics[names.FINAL_AVG_ACCURACY] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    assert metrics["forgetting_exp0"] == pytest.approx(matrix[0][0] - matrix[1][0])
    assert 0 < metrics[names.WALL_TIME_S] < 60
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "accuracy_matrix.json")).read_text()
    )
    assert table["data"] == matrix


def test_logger_writes_into_the_active_run(uri):
    import mlflow
    from avalanche.evaluation.metric_results import MetricValue

    from taps_cl.tracking.logger import MLflowLogger

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_name="mine") as active:
            logger = MLflowLogger(uri)
            logger.log_metrics([MetricValue(None, "Loss[epoch]/train", 0.5, 3)])
            logger.close()  # not its run: must stay active
            assert mlflow.active_run().info.run_id == active.info.run_id
    finally:
        mlflow.set_tracking_uri(previous)
    run = MlflowClient(uri).get_run(active.info.run_id)
    assert logger.run_id == active.info.run_id and run.data.metrics == {"Loss_epoch_/train": 0.5}


def test_logger_is_silent_off_rank_zero(monkeypatch, tmp_path):
    from avalanche.evaluation.metric_results import MetricValue

    from taps_cl.tracking.logger import MLflowLogger

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    logger = MLflowLogger(tmp_path / "never.db")
    logger.log_metrics([MetricValue(None, "x", 1.0, 0)])
    assert not logger.enabled and logger.run_id is None and not (tmp_path / "never.db").exists()


# -- strategy runs and the comparison -------------------------------------------------------------

TAPS_MATRIX = [[0.92, 0.48, 0.51], [0.92, 0.88, 0.50], [0.92, 0.88, 0.90]]
NAIVE_MATRIX = [[0.93, 0.45, 0.50], [0.55, 0.91, 0.52], [0.40, 0.60, 0.92]]


def _log_two_strategies(uri: str, experiment: str) -> None:
    log_strategy_result(
        experiment,
        "TAPS",
        {names.PARAMS_PER_TASK: 120_000, names.STORED_BYTES: 1_450_000, names.WALL_TIME_S: 31.5},
        TAPS_MATRIX,
        {"lam": 0.5, "optimizer": {"name": "adamw", "lr": 1e-3}},
        tracking_uri=uri,
    )
    log_strategy_result(
        experiment,
        "Naive",
        {
            names.PARAMS_PER_TASK: 3_400_000,
            names.STORED_BYTES: 13_600_000,
            names.WALL_TIME_S: 22.0,
            "note": "fine-tune",
        },
        NAIVE_MATRIX,
        {"lr": 0.01},
        tracking_uri=uri,
    )


def test_strategy_results_then_compare(uri, tmp_path):
    _log_two_strategies(uri, "bench")
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("bench").experiment_id
    naive = client.search_runs([exp_id], "attributes.run_name = 'Naive'")[0]
    assert naive.data.params["lr"] == "0.01"
    assert naive.data.tags["summary.note"] == "fine-tune"
    steps = {m.step: m.value for m in client.get_metric_history(naive.info.run_id, "acc_exp0")}
    assert steps == pytest.approx({0: 0.93, 1: 0.55, 2: 0.40})
    assert naive.data.metrics["forgetting_exp0"] == pytest.approx(0.53)

    report = compare("bench", tmp_path / "report", tracking_uri=uri)
    assert [r["strategy"] for r in report.rows] == ["TAPS", "Naive"]
    taps, naive_row = report.rows
    assert taps[names.FINAL_AVG_ACCURACY] == pytest.approx((0.92 + 0.88 + 0.90) / 3)
    assert taps[names.AVG_FORGETTING] == pytest.approx(0.0)
    assert naive_row[names.AVG_FORGETTING] == pytest.approx((0.53 + 0.31) / 2)
    assert naive_row[names.STORED_BYTES] == 13_600_000
    assert report.matrices["Naive"] == NAIVE_MATRIX  # floats round-trip exactly
    lines = report.table.splitlines()
    assert lines[0].split()[:3] == ["strategy", "final", "avg"] and len(lines) == 4
    assert "TAPS" in lines[2] and "120.0k" in lines[2] and "1.4MB" in lines[2]
    assert report.figures == [tmp_path / "report" / file for file in FIGURES.values()]
    for png in report.figures:
        assert png.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    csv_lines = report.csv_path.read_text().splitlines()
    assert csv_lines[0].startswith("strategy,final_avg_accuracy") and len(csv_lines) == 3
    summary = client.get_run(report.summary_run_id)
    assert summary.info.run_name == "summary"
    logged = {a.path for a in client.list_artifacts(report.summary_run_id)}
    assert logged == {*FIGURES.values(), "comparison.csv", "comparison.txt"}

    # A second comparison ignores the first summary run; a rerun of a strategy replaces it.
    log_strategy_result("bench", "Naive", {}, [[0.5]], {}, tracking_uri=uri)
    again = compare("bench", tmp_path / "report2", tracking_uri=uri)
    assert [r["strategy"] for r in again.rows] == ["TAPS", "Naive"]
    assert again.rows[1][names.FINAL_AVG_ACCURACY] == pytest.approx(0.5)


def test_compare_unknown_experiment(uri, tmp_path):
    with pytest.raises(UnknownExperimentError, match="nope"):
        compare("nope", tmp_path, tracking_uri=uri)


# -- per-task runs --------------------------------------------------------------------------------


def _task_run_args() -> dict:
    scores = {"conv1": 0.04, "conv2": 0.13, "fc": 0.2}
    return dict(
        task="flowers",
        config={"taps": {"tau": 0.1, "lam": 0.5}, "train": {"epochs": 2, "lr": 1e-3}},
        base="tiny_cnn",
        dataset_sizes={"train": 64, "eval": 16},
        history=[
            {"epoch": 1, "loss": 1.2, "eval_accuracy": 0.5, "active_layers": 3},
            {"epoch": 2, "loss": 0.7, "eval_accuracy": 0.75, "active_layers": 2},
        ],
        metrics={
            names.ACCURACY: 0.75,
            names.TASK_PARAMETERS: 1234,
            names.TASK_BYTES: 4936,
            names.TRAIN_TIME_S: 1.5,
        },
        gates={k: v >= 0.1 for k, v in scores.items()},
        scores=scores,
        patch_summary={
            "version": 1,
            "active_layers": ["conv2", "fc"],
            "num_parameters": 1234,
            "nbytes": 4936,
        },
    )


def _check_task_run(client: MlflowClient, run_id: str, tmp_path: Path) -> None:
    run = client.get_run(run_id)
    assert run.info.run_name == "flowers" and run.data.tags["taps_cl.kind"] == "task"
    assert run.data.params["taps.tau"] == "0.1" and run.data.params["train.epochs"] == "2"
    assert run.data.params["base"] == "tiny_cnn" and run.data.params["data.train"] == "64"
    curve = {m.step: m.value for m in client.get_metric_history(run_id, names.ACCURACY)}
    assert curve == {1: 0.5, 2: 0.75}
    assert {m.step: m.value for m in client.get_metric_history(run_id, "loss")} == {1: 1.2, 2: 0.7}
    assert run.data.metrics[names.ACTIVE_LAYERS] == 2 and run.data.metrics[names.NUM_LAYERS] == 3
    assert run.data.metrics[names.TASK_PARAMETERS] == 1234
    paths = {a.path for a in client.list_artifacts(run_id, "gates")}
    assert paths == {"gates/flowers.png", "gates/flowers.json"}
    png = Path(client.download_artifacts(run_id, "gates/flowers.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    gates = json.loads(
        Path(client.download_artifacts(run_id, "gates/flowers.json", str(tmp_path))).read_text()
    )
    assert gates["tau"] == 0.1 and gates["layers"]["conv1"] == {"score": 0.04, "on": False}
    summary = json.loads(
        Path(client.download_artifacts(run_id, "patch_summary.json", str(tmp_path))).read_text()
    )
    assert summary["active_layers"] == ["conv2", "fc"]


def test_log_task_run(uri, tmp_path):
    run_id = log_task_run(uri, "tasks", **_task_run_args())
    _check_task_run(MlflowClient(uri), run_id, tmp_path)
    # The artifacts sit beside the database, not in ./mlruns of the working directory.
    assert (tmp_path / "mlartifacts" / "tasks").is_dir()
    # Engine-style call: sizes and bytes only in the patch summary, no eval accuracy.
    args = {**_task_run_args(), "metrics": {"train_seconds": 2.0}, "history": [{"loss": 1.0}]}
    run = MlflowClient(uri).get_run(log_task_run(uri, "tasks", **args))
    assert (
        run.data.metrics[names.TASK_PARAMETERS] == 1234 and names.ACCURACY not in run.data.metrics
    )
    assert run.data.metrics["train_seconds"] == 2.0
    with pytest.raises(ValueError, match="gates without scores"):
        log_task_run(uri, "tasks", **{**_task_run_args(), "gates": {"nope": True}})


# -- the store's gate picture ---------------------------------------------------------------------


def _commit_tiny_tasks(store: TaskStore) -> None:
    model = TAPSModel(tiny_cnn(), TAPSConfig())
    for name, off in (("alpha", {"conv1"}), ("beta", {"conv1", "conv2"})):
        model.add_task(name, num_classes=3)
        with torch.no_grad():
            for layer_name, layer in model.layers():
                layer.score[name].fill_(0.0 if layer_name in off else 0.3)
        store.commit(model.finalize_task(name))


def test_gates_figure(tmp_path):
    with TaskStore(tmp_path / "tasks.db") as store:
        _commit_tiny_tasks(store)
        png, text = gates_figure(store, tmp_path / "fig" / "gates.png")
    assert png == tmp_path / "fig" / "gates.png" and png.stat().st_size > 5_000
    lines = text.splitlines()
    assert lines[2].split() == ["alpha", "v1", ".#", "1/2"]  # conv1 off, conv2 on
    assert lines[3].split() == ["beta", "v1", "..", "0/2"]
    assert lines[-2:] == ["    0  conv1", "    1  conv2"]
    with TaskStore(tmp_path / "tasks.db") as store:
        _, text = gates_figure(store, tmp_path / "g2.png", layer_order=["conv2", "conv1"])
    assert text.splitlines()[2].split() == ["alpha", "v1", "#.", "1/2"]


def test_gates_figure_on_an_empty_store(tmp_path):
    with TaskStore(tmp_path / "empty.db") as store, pytest.raises(ValueError, match="no tasks"):
        gates_figure(store, tmp_path / "g.png")


# -- a real tracking server over HTTP (last: it boots while the tests above run) ------------------


def _wait_healthy(proc: subprocess.Popen, url: str, root: Path, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def test_mlflow_server_accepts_runs_over_http(server_proc, tmp_path):
    proc, url, root = server_proc
    healthy = _wait_healthy(proc, url, root)
    log = (root / "server.log").read_text(errors="replace")[-2000:] if not healthy else ""
    require(healthy, f"mlflow server did not start on {url}: {log}")
    run_id = log_task_run(url, "over-http", **_task_run_args())
    _check_task_run(MlflowClient(url), run_id, tmp_path)
    assert any((root / "artifacts").rglob("flowers.png"))  # uploaded through the server's proxy
    strategy_id = log_strategy_result("bench-http", "TAPS", {}, TAPS_MATRIX, {}, tracking_uri=url)
    history = MlflowClient(url).get_metric_history(strategy_id, "acc_exp1")
    assert {m.step: m.value for m in history} == {0: 0.48, 1: 0.88, 2: 0.88}


def test_joint_tasks_are_child_runs_with_registered_models_over_http(server_proc, tmp_path):
    """The engine over a real server: context tags, a parent run with one child per task,
    each committed version an MLflow model registered under the task's name."""
    import mlflow.pytorch

    from taps_cl import __version__
    from taps_cl.bases import Base, Preprocessing
    from taps_cl.config import TrainConfig
    from taps_cl.engine import Engine
    from tests.tiny import tiny_images

    proc, url, root = server_proc
    require(_wait_healthy(proc, url, root), f"mlflow server did not start on {url}")
    base = Base(tiny_cnn(), "tiny", "tests.tiny", Preprocessing(input_size=16))
    engine = Engine(base, store=str(tmp_path / "s.db"), tracking=url, experiment="joint-http",
                    train=TrainConfig(epochs=1, batch_size=8))  # fmt: skip
    data = {"left": tiny_images(16, 2, seed=1), "right": tiny_images(16, 3, seed=2)}
    records = engine.add_tasks(data, joint=True, quiet=True)
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("joint-http").experiment_id])
    parents = [r for r in runs if r.data.tags.get("taps_cl.kind") == "joint"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("taps_cl.kind") == "task"}
    assert len(parents) == 1 and set(children) == {"left", "right"}
    for run in (*parents, *children.values()):
        assert run.data.tags["taps_cl.package_version"] == __version__
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in children.values())  # fmt: skip
    x = tiny_images(4, 2, seed=3)[0]
    for rec in records:
        (version,) = client.search_model_versions(f"name='{rec.name}'")
        assert version.tags["taps_cl.store_version"] == str(rec.version)
        assert version.run_id == children[rec.name].info.run_id
        assert version.source == f"runs:/{version.run_id}/model"
        # through this client, not models:/ (that resolves against the global tracking URI)
        local = client.download_artifacts(version.run_id, "model", str(tmp_path))
        loaded = mlflow.pytorch.load_model(local)
        with torch.no_grad():
            expected = engine.predict(rec.name, x, logits=True)
            assert torch.allclose(loaded(engine.preprocess(x, rec.name)), expected, atol=1e-5)


def test_package_exports_resolve_to_the_functions():
    import taps_cl.tracking as tracking
    from taps_cl.tracking import compare as compare_fn
    from taps_cl.tracking import gates_figure as gates_fn

    assert compare_fn is compare and gates_fn is gates_figure and callable(tracking.MLflowLogger)
    with pytest.raises(AttributeError):
        tracking.nope  # noqa: B018
