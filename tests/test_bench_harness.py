"""The benchmark harness: timers, tables, the result JSON and MLflow logging of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import harness
from taps_cl.cli.tables import table


class FakeClock:
    """``time.perf_counter`` that advances by the next of ``durations`` on every timed call."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # the end of a timed call
            self.now += self.durations.pop(0)
        return self.now


def test_timed_returns_the_result_and_its_seconds(monkeypatch):
    monkeypatch.setattr(harness.time, "perf_counter", FakeClock([0.25]))
    assert harness.timed(lambda: "out") == ("out", 0.25)


def test_median_seconds_skips_warmup_and_takes_the_median(monkeypatch):
    calls = []
    monkeypatch.setattr(harness.time, "perf_counter", FakeClock([3.0, 1.0, 100.0]))
    assert harness.median_seconds(lambda: calls.append(1), 3, warmup=2) == 3.0
    assert len(calls) == 5  # two untimed warm-up calls, then three timed ones
    with pytest.raises(ValueError, match="repeats"):
        harness.median_seconds(lambda: None, 0)


def test_interleaved_medians_flip_the_order_every_round(monkeypatch):
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    monkeypatch.setattr(harness.time, "perf_counter", FakeClock([1, 10, 2, 20, 3, 30]))
    medians = harness.interleaved_medians(fns, 3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert medians == {"a": 3.0, "b": 10.0}  # a took 1, 20, 3; b took 10, 2, 30
    with pytest.raises(ValueError, match="repeats"):
        harness.interleaved_medians({}, 3)


def test_print_table_lays_rows_out_as_the_report_table(capsys):
    rows = [("taps", "91.0%", None), ("lora", "89.5%", 3)]
    harness.print_table(["method", "accuracy", "layers"], iter(rows))
    assert capsys.readouterr().out == table(["method", "accuracy", "layers"], rows) + "\n"


def test_write_json_writes_and_merges_top_level_keys(tmp_path):
    out = tmp_path / "results" / "bench.json"
    assert harness.write_json(out, {"run_a": {"x": 1}, "path": Path("/p")}) == out
    assert out.read_text().endswith("}\n")
    assert json.loads(out.read_text()) == {"run_a": {"x": 1}, "path": "/p"}
    harness.write_json(out, {"run_b": {"x": 2}}, merge=True)
    assert json.loads(out.read_text()) == {"run_a": {"x": 1}, "path": "/p", "run_b": {"x": 2}}
    harness.write_json(out, {"run_b": {"x": 3}})  # without merge: replaced
    assert json.loads(out.read_text()) == {"run_b": {"x": 3}}


def test_parser_has_out_and_experiment():
    p = harness.parser("First line.\n\nMore.", out=harness.RESULTS / "bench.json")
    assert p.description == "First line."
    args = p.parse_args([])
    assert (args.out, args.experiment) == (str(harness.RESULTS / "bench.json"), None)
    assert "benchmarks/results/bench.json" in p.format_help().replace("\n", "").replace(" ", "")
    assert p.parse_args(["--experiment", "e", "--out", "x.json"]).experiment == "e"


def test_save_logs_to_mlflow_only_with_an_experiment(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(harness, "log_run", lambda *a: logged.append(a))
    args = harness.parser(None, out=tmp_path / "bench.json").parse_args([])
    assert harness.save(args, {"seconds": 1.5}) == tmp_path / "bench.json" and logged == []
    args.experiment = "exp"
    harness.save(args, {"seconds": 1.5}, path=tmp_path / "other.json")
    assert logged == [("exp", "other", vars(args), {"seconds": 1.5})]


def test_numbers_are_the_finite_numeric_leaves():
    data = {"a": 1, "b": {"c": 2.5, "d": True, "e": "text", "f": math.nan}, "g": [1, 2]}
    assert harness._numbers(data) == {"a": 1.0, "b.c": 2.5}


def test_log_run_writes_one_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = {"timing": {"predict_seconds": 0.5, "route/lda": 0.75}, "tasks": ["a", "b"]}
    run_id = harness.log_run("bench", "routing", {"epochs": 2, "out": Path("x")}, result)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.run_name == "routing" and run.info.status == "FINISHED"
    assert run.data.metrics == {"timing.predict_seconds": 0.5, "timing.route/lda": 0.75}
    assert run.data.params == {"epochs": "2", "out": "x"}
    artifacts = [a.path for a in MlflowClient(uri).list_artifacts(run_id)]
    assert artifacts == ["result.json"]
