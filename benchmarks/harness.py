"""What every benchmark script shares: timing, tables, the result JSON and MLflow logging.

Scripts run as ``python benchmarks/<name>.py`` from a checkout. Each puts the checkout first on
``sys.path`` before its imports, so that this tree's ``taps_cl`` (not an installed copy) is the
one measured and ``benchmarks.harness`` imports without ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from taps_cl.cli.tables import table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
T = TypeVar("T")

# -- timing --------------------------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the wall seconds it took."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, *, warmup: int = 0) -> float:
    """Median wall seconds of ``repeats`` calls after ``warmup`` untimed ones. The median, not
    the mean: the machine is shared, and one call slowed by another process says nothing about
    the code."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[1] for _ in range(repeats))


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], repeats: int, *, warmup: int = 0
) -> dict[str, float]:
    """Median seconds of each function, timed in turns whose order flips every round (A B, B A,
    ...), so that background load, caches and the allocator hit every side alike."""
    if repeats < 1 or not fns:
        raise ValueError(f"need functions to time and repeats >= 1, got {len(fns)}, {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name])[1])
    return {n: statistics.median(t) for n, t in times.items()}


# -- arguments and tables ------------------------------------------------------------------------


def parser(
    doc: str | None, *, out: str | Path | None, experiment_help: str | None = None
) -> argparse.ArgumentParser:
    """The script's parser, described by its docstring's first line, with ``--out`` (the result
    JSON) and ``--experiment`` (log to MLflow when given)."""
    p = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0] or None)
    shown = Path(out).relative_to(ROOT) if out and Path(out).is_relative_to(ROOT) else out
    where = "" if out is None else f" (default: {shown})"
    p.add_argument("--out", default=None if out is None else str(out), help=f"result JSON{where}")
    p.add_argument(
        "--experiment",
        default=None,
        help=experiment_help or "MLflow experiment to log this run to (URI: MLFLOW_TRACKING_URI)",
    )
    return p


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print rows under headers as :func:`taps_cl.cli.tables.table` lays them out."""
    print(table(headers, list(rows)))


# -- results -------------------------------------------------------------------------------------


def write_json(path: str | Path, payload: Mapping[str, Any], *, merge: bool = False) -> Path:
    """Write ``payload`` as indented JSON (values JSON cannot hold, such as paths, as text).
    With ``merge`` its top-level keys replace those of the file's current content, so runs
    stored under different keys accumulate in one file."""
    path = Path(path)
    old = json.loads(path.read_text()) if merge and path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**old, **payload}, indent=2, default=str) + "\n")
    return path


def save(
    args: argparse.Namespace,
    payload: Mapping[str, Any],
    *,
    path: str | Path | None = None,
    merge: bool = False,
) -> Path:
    """Write the result JSON (``path``, default ``args.out``) and, with ``--experiment``, log
    the run to MLflow under the file's name."""
    out = write_json(path or args.out, payload, merge=merge)
    if getattr(args, "experiment", None):
        log_run(args.experiment, out.stem, vars(args), payload)
    return out


def _numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite numeric leaf of nested mappings, under its dotted path."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_numbers(value, name + "."))
        elif (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ):
            out[name] = float(value)
    return out


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` as JSON would store it (values JSON cannot hold, such as paths, as text)."""
    return json.loads(json.dumps(data, default=str))


def log_run(
    experiment: str, run_name: str, settings: Mapping[str, Any], result: Mapping[str, Any]
) -> str | None:
    """One MLflow run for one benchmark run: ``settings`` as params, every numeric leaf of
    ``result`` as a metric, and ``result`` itself as ``result.json``. Returns the run id (None
    when taps_cl's tracking cannot be imported: a benchmark must not fail at its very end)."""
    try:
        from mlflow.tracking import MlflowClient

        from taps_cl.tracking import client as tc
        from taps_cl.tracking import sanitize_key
    except ImportError as err:
        print(f"MLflow logging skipped: taps_cl.tracking unavailable ({err})", file=sys.stderr)
        return None
    settings, result = _plain(settings), _plain(result)  # paths and the like as their text
    uri = tc.resolve_tracking_uri()
    client = MlflowClient(uri)
    exp_id = tc.get_or_create_experiment(client, experiment, uri)
    tags = {tc.KIND_TAG: "benchmark", **tc.context_tags()}
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    status = "FAILED"
    try:
        tc.log_params(client, run_id, settings)
        metrics = [(sanitize_key(k), v, 0) for k, v in _numbers(result).items()]
        tc.log_metrics(client, run_id, metrics)
        client.log_dict(run_id, tc.json_safe(result), "result.json")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def log_strategies(
    experiment: str,
    runs: Iterable[tuple[str, Mapping[str, Any], Sequence[Sequence[float | None]]]],
    params: Mapping[str, Any],
) -> None:
    """One MLflow run per strategy ``(name, summary, accuracy matrix)``, with the standard
    metric names of :func:`taps_cl.tracking.log_strategy_result` (so ``taps-cl compare`` reads
    them)."""
    try:
        from taps_cl.tracking import log_strategy_result
    except (ImportError, AttributeError) as err:
        print(f"MLflow logging skipped: taps_cl.tracking unavailable ({err})", file=sys.stderr)
        return
    for name, summary, matrix in runs:
        log_strategy_result(experiment, name, summary, matrix, params)


class RowCache:
    """Finished sweep rows in a JSON-lines file, so a long sweep resumes where it stopped."""

    def __init__(self, path: str | None, signature: dict) -> None:
        self.path, self.signature = (Path(path) if path else None), signature
        self.rows: dict[str, dict] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row.pop("signature") == signature:
                    self.rows[row.pop("key")] = row

    def get(self, key: str, make) -> dict:
        if key not in self.rows:
            self.rows[key] = make()
            if self.path:
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, "signature": self.signature,
                                        **self.rows[key]}) + "\n")  # fmt: skip
        return self.rows[key]
