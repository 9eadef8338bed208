"""Side-by-side report of the strategy runs of one MLflow experiment: table, CSV and figures."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from taps_cl.tracking import client as tc
from taps_cl.tracking import matrix as mx
from taps_cl.tracking import names, plots

COLUMNS = (  # (row key, table header)
    ("strategy", "strategy"),
    (names.FINAL_AVG_ACCURACY, "final avg acc"),
    (names.AVG_FORGETTING, "avg forgetting"),
    (names.BWT, "BWT"),
    (names.PARAMS_PER_TASK, "params/task"),
    (names.STORED_BYTES, "stored bytes"),
    (names.WALL_TIME_S, "time (s)"),
)
# Shown only when some run logged it (class-incremental routing strategies).
OPTIONAL_COLUMNS = ((names.TASK_ID_ACCURACY, "task id"),)
FIGURES = {
    "accuracy_matrices": "accuracy_matrices.png",
    "forgetting": "forgetting_per_experience.png",
    "accuracy_vs_params": "accuracy_vs_params.png",
}
CSV_NAME = "comparison.csv"


@dataclass
class CompareReport:
    """What :func:`compare` produced. ``str(report)`` is the table."""

    experiment: str
    rows: list[dict[str, Any]]  # per strategy: COLUMNS keys, run_id, forgetting {exp: value}
    table: str  # the rows as a fixed-width text table
    figures: list[Path]  # the PNGs, in FIGURES order (file names as in FIGURES)
    csv_path: Path
    summary_run_id: str  # the run holding the figures and the CSV as artifacts
    matrices: dict[str, mx.Matrix] = field(default_factory=dict)  # strategy -> accuracy matrix

    def __str__(self) -> str:
        return self.table


def compare(experiment: str, out_dir: str | Path, tracking_uri: str | None = None) -> CompareReport:
    """Compare the strategy runs of ``experiment`` and write the report to ``out_dir``.

    Reads every run except earlier ``summary`` runs and per-task runs; when a strategy (run
    name) was run several times, its latest run counts. Writes ``comparison.csv`` and three
    PNGs (see ``FIGURES``) to ``out_dir`` and logs them, with the table, as artifacts of a new
    run named ``summary`` in the same experiment.
    """
    uri = tc.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    exp_id = tc.find_experiment(client, experiment)
    runs = _strategy_runs(client, exp_id)
    if not runs:
        raise ValueError(
            f"experiment {experiment!r} has no strategy runs (runs with {names.FINAL_AVG_ACCURACY} "
            "or acc_exp<j> metrics); log some with log_strategy_result or MLflowLogger"
        )
    matrices = {name: _matrix(client, run) for name, run in runs.items()}
    rows = [_row(name, run, matrices[name]) for name, run in runs.items()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(rows, matrices, out)
    csv_path = out / CSV_NAME
    csv_path.write_text(_csv(rows), encoding="utf-8")
    table = format_table(rows)
    summary_id = _log_summary(client, exp_id, rows, figures, csv_path, table)
    paths = [figures[name] for name in FIGURES if name in figures]
    return CompareReport(experiment, rows, table, paths, csv_path, summary_id, matrices)


def _strategy_runs(client: MlflowClient, exp_id: str) -> dict[str, Run]:
    """Latest run per run name, in order of first start, that holds strategy metrics."""
    found: dict[str, Run] = {}
    token = None
    while True:
        page = client.search_runs(
            [exp_id], order_by=["attributes.start_time DESC"], max_results=1000, page_token=token
        )
        for run in page:
            kind = run.data.tags.get(tc.KIND_TAG)
            metrics = run.data.metrics
            usable = names.FINAL_AVG_ACCURACY in metrics or any(
                names.ACC_EXP_RE.match(k) for k in metrics
            )
            name = run.info.run_name or run.info.run_id
            if kind not in ("summary", "task") and usable and name not in found:
                found[name] = run
        token = page.token
        if not token:
            break
    return dict(sorted(found.items(), key=lambda item: item[1].info.start_time))


def _matrix(client: MlflowClient, run: Run) -> mx.Matrix:
    """The accuracy matrix rebuilt from the ``acc_exp{j}`` histories (latest value per step)."""
    cells: dict[tuple[int, int], tuple[int, float]] = {}
    for key in run.data.metrics:
        match = names.ACC_EXP_RE.match(key)
        if not match:
            continue
        for m in client.get_metric_history(run.info.run_id, key):
            old = cells.get((m.step, int(match[1])))
            if old is None or m.timestamp >= old[0]:
                cells[(m.step, int(match[1]))] = (m.timestamp, m.value)
    if not cells:
        return []
    rows = max(i for i, _ in cells) + 1
    cols = max(j for _, j in cells) + 1
    return [[cells.get((i, j), (0, math.nan))[1] for j in range(cols)] for i in range(rows)]


def _row(name: str, run: Run, matrix: mx.Matrix) -> dict[str, Any]:
    derived = mx.summarize(matrix) if matrix else {}
    metrics = run.data.metrics
    row: dict[str, Any] = {"strategy": name}
    for key, _ in COLUMNS[1:]:
        row[key] = metrics.get(key, derived.get(key))
    for key, _ in OPTIONAL_COLUMNS:
        if key in metrics:
            row[key] = metrics[key]
    if matrix:
        row["forgetting"] = mx.forgetting_row(matrix, len(matrix) - 1)
    else:
        row["forgetting"] = {
            int(m[1]): v for k, v in metrics.items() if (m := names.FORGETTING_EXP_RE.match(k))
        }
    row["run_id"] = run.info.run_id
    return row


def _figures(rows: list[dict], matrices: dict[str, mx.Matrix], out: Path) -> dict[str, Path]:
    figures = {}
    with_matrix = {name: m for name, m in matrices.items() if m}
    if with_matrix:
        path = out / FIGURES["accuracy_matrices"]
        figures["accuracy_matrices"] = plots.accuracy_heatmaps(with_matrix, path)
    forgetting = {row["strategy"]: row["forgetting"] for row in rows}
    figures["forgetting"] = plots.forgetting_bars(forgetting, out / FIGURES["forgetting"])
    points = {
        row["strategy"]: (
            float(_or_nan(row[names.PARAMS_PER_TASK])),
            float(_or_nan(row[names.FINAL_AVG_ACCURACY])),
        )
        for row in rows
    }
    path = out / FIGURES["accuracy_vs_params"]
    figures["accuracy_vs_params"] = plots.accuracy_vs_params(points, path)
    return figures


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _human(value: float, unit: str = "") -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "strategy":
        return str(value)
    if key == names.PARAMS_PER_TASK:
        return _human(value)
    if key == names.STORED_BYTES:
        return _human(value, "B")
    if key == names.WALL_TIME_S:
        return f"{value:.1f}"
    return f"{value:+.3f}" if key == names.BWT else f"{value:.3f}"


def columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """``COLUMNS``, plus each optional column some row holds a value for."""
    extra = tuple(c for c in OPTIONAL_COLUMNS if any(r.get(c[0]) is not None for r in rows))
    return COLUMNS + extra


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table (text left-aligned, numbers right-aligned)."""
    shown = columns(rows)
    cells = [[header for _, header in shown]]
    cells += [[_cell(key, row.get(key)) for key, _ in shown] for row in rows]
    widths = [max(len(r[c]) for r in cells) for c in range(len(shown))]
    lines = []
    for r in cells:
        parts = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(r))]
        lines.append("  ".join(parts))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    shown = columns(rows)
    writer.writerow([key for key, _ in shown] + ["run_id"])
    for row in rows:
        writer.writerow([_csv_value(row.get(k)) for k, _ in shown] + [row["run_id"]])
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    """Counts as integers, other numbers to 6 significant digits, missing as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return int(value) if value.is_integer() else float(f"{value:.6g}")
    return value


def _log_summary(client, exp_id, rows, figures, csv_path, table) -> str:
    run = client.create_run(exp_id, run_name="summary", tags={tc.KIND_TAG: "summary"})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        tc.log_params(client, run_id, {"strategies": ",".join(r["strategy"] for r in rows)})
        for path in [*figures.values(), csv_path]:
            client.log_artifact(run_id, os.fspath(path))
        client.log_text(run_id, table + "\n", "comparison.txt")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id
