"""One MLflow run per strategy of a benchmark, and one per task version the engine commits.

:func:`track_task` is handed what it logs (the committed patch, the model that trained it,
the run's config and metrics, the base's name), never the engine.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from taps_cl.tracking import client as tc
from taps_cl.tracking import matrix as mx
from taps_cl.tracking import names, plots
from taps_cl.tracking.names import is_number, sanitize_key

if TYPE_CHECKING:
    from taps_cl.taps.model import TAPSModel
    from taps_cl.taps.patch import TaskPatch


def _mapping(value: object, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return value


def _start(
    uri: str | None, experiment: str, run_name: str, kind: str, parent: str | None = None
) -> tuple[MlflowClient, str]:
    uri = tc.resolve_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_id = tc.get_or_create_experiment(client, experiment, uri)
    tags = {tc.KIND_TAG: kind, **tc.context_tags()}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    return client, run.info.run_id


@contextmanager
def parent_run(uri: str | None, experiment: str, run_name: str) -> Iterator[str]:
    """A run that groups the runs started with ``parent=`` its id (e.g. one joint training
    with one child run per task); finished when the block ends, failed if it raises."""
    client, run_id = _start(uri, experiment, run_name, "joint")
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)


def _numbers_and_rest(data: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    flat = tc.flatten(data)
    numbers = {k: float(v) for k, v in flat.items() if is_number(v)}
    return numbers, {k: v for k, v in flat.items() if k not in numbers and v is not None}


def log_strategy_result(
    experiment: str,
    strategy_name: str,
    summary: Mapping[str, Any],
    accuracy_matrix: Sequence[Sequence[float | None]],
    params: Mapping[str, Any],
    *,
    tracking_uri: str | None = None,
) -> str:
    """Log one benchmark strategy as one run (run name = ``strategy_name``); return its id.

    Metrics use the standard names of :mod:`taps_cl.tracking.names`: ``acc_exp{j}``,
    ``forgetting_exp{j}`` and the row summaries at step i (row i of the matrix), derived from
    ``accuracy_matrix`` (fractions in [0, 1]). Numeric entries of ``summary`` (e.g.
    ``params_per_task``, ``stored_bytes``, ``wall_time_s``, or a ``final_avg_accuracy`` the
    caller computed differently) are logged at the last step and win over derived values;
    other entries become ``summary.<key>`` tags. Artifacts: ``accuracy_matrix.json`` /
    ``.csv`` and ``summary.json``.
    """
    if not isinstance(strategy_name, str) or not strategy_name.strip():
        raise ValueError(f"strategy_name must be a non-empty str, got {strategy_name!r}")
    summary, params = _mapping(summary, "summary"), _mapping(params, "params")
    matrix = mx.validate_matrix(accuracy_matrix)
    given, rest = _numbers_and_rest(summary)
    last = len(matrix) - 1
    client, run_id = _start(tracking_uri, experiment, strategy_name, "strategy")
    status = "FAILED"
    try:
        tc.log_tags(client, run_id, {"taps_cl.strategy": strategy_name})
        tc.log_tags(client, run_id, {f"summary.{k}": v for k, v in rest.items()})
        tc.log_params(client, run_id, params)
        derived = mx.step_metrics(matrix)
        overridden = [(k, v, s) for k, v, s in derived if not (s == last and k in given)]
        tc.log_metrics(
            client, run_id, overridden + [(sanitize_key(k), v, last) for k, v in given.items()]
        )
        final = {**mx.summarize(matrix), **given}
        client.log_dict(run_id, mx.matrix_table(matrix), "accuracy_matrix.json")
        client.log_text(run_id, mx.matrix_csv(matrix), "accuracy_matrix.csv")
        client.log_dict(run_id, tc.json_safe({**final, **rest}), "summary.json")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def _history_metrics(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, int]]:
    """Each numeric value of each epoch at step = its ``epoch`` (1-based) or position + 1;
    ``eval_accuracy`` is also logged as ``accuracy`` so that curves and the final value share
    one key."""
    out = []
    for index, stats in enumerate(history):
        stats = _mapping(stats, f"history[{index}]")
        epoch = stats.get("epoch", index + 1)
        step = int(epoch) if is_number(epoch) else index + 1
        for key, value in stats.items():
            if key != "epoch" and is_number(value) and not math.isnan(float(value)):
                out.append((sanitize_key(key), float(value), step))
        if is_number(stats.get("eval_accuracy")):
            out.append((names.ACCURACY, float(stats["eval_accuracy"]), step))
    return out


def _tau(config: Mapping[str, Any], tau: float | None) -> float:
    if tau is not None:
        return float(tau)
    found = [v for k, v in tc.flatten(config).items() if k.split(".")[-1] == "tau"]
    return float(found[0]) if found and is_number(found[0]) else 0.1


def log_task_run(
    tracking_uri: str | None,
    experiment: str,
    *,
    task: str,
    config: Mapping[str, Any],
    base: str,
    dataset_sizes: Mapping[str, int],
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    gates: Mapping[str, bool],
    scores: Mapping[str, float],
    patch_summary: Mapping[str, Any],
    tau: float | None = None,
    parent: str | None = None,
    model: Any = None,
    registry_tags: Mapping[str, str] | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> str:
    """Log one ``add_task`` as one run (run name = ``task``); return its id.

    Params: ``config`` (flattened with dots), ``base``, ``data.<split>`` sizes. Metrics: every
    numeric history value per epoch (step = epoch; ``eval_accuracy`` also as ``accuracy``),
    ``metrics`` at the last epoch, ``active_layers``/``num_layers`` from ``gates``, and
    ``task_parameters``, ``task_bytes`` (all stored), ``patch_bytes`` and ``route_bytes`` from
    ``patch_summary`` unless ``metrics`` has them. Artifacts: ``gates/<task>.png`` (scores, the
    ``tau`` line: ``tau``, else ``config``'s, else 0.1), ``gates/<task>.json`` and
    ``patch_summary.json``. ``parent``: the id of a :func:`parent_run`. ``model``: the merged
    ``nn.Module``, logged as the run's MLflow model (``input_shape``: one input's ``(C, H, W)``)
    and registered under ``task`` with ``registry_tags`` (e.g. the store version).
    """
    config, gates, scores, sizes, metrics, patch_summary = _checked(
        task, config, gates, scores, dataset_sizes, metrics, patch_summary
    )
    series = _history_metrics(history)
    last = max((s for _, _, s in series), default=0)
    numbers = _final_numbers(metrics, gates, scores, patch_summary)
    client, run_id = _start(tracking_uri, experiment, task, "task", parent)
    status = "FAILED"
    try:
        tags = {"taps_cl.task": task, "taps_cl.base": base}
        if patch_summary.get("version") is not None:
            tags["taps_cl.version"] = str(patch_summary["version"])
        tc.log_tags(client, run_id, tags)
        tc.log_params(client, run_id, {**config, "base": base, "data": dict(sizes)})
        tc.log_metrics(
            client, run_id, series + [(sanitize_key(k), v, last) for k, v in numbers.items()]
        )
        _log_gate_artifacts(client, run_id, task, gates, scores, _tau(config, tau))
        client.log_dict(run_id, tc.json_safe(dict(patch_summary)), "patch_summary.json")
        if model is not None:
            shape = tuple(input_shape or ())
            if len(shape) != 3:
                raise ValueError(f"logging a model needs input_shape=(C, H, W), got {shape}")
            tc.register_model(client, run_id, task, model, registry_tags or {}, shape)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def _checked(task, config, gates, scores, sizes, metrics, summary) -> tuple[dict, ...]:
    """The arguments of :func:`log_task_run` as dicts, or a ``ValueError``/``TypeError``."""
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty str, got {task!r}")
    named = (("config", config), ("gates", gates), ("scores", scores), ("dataset_sizes", sizes))
    out = [_mapping(v, n) for n, v in named]
    out += [_mapping(metrics, "metrics"), _mapping(summary, "patch_summary")]
    if set(out[1]) - set(out[2]):
        raise ValueError(f"gates without scores: {sorted(set(out[1]) - set(out[2]))[:5]}")
    return tuple(out)


def _final_numbers(metrics, gates, scores, patch_summary) -> dict[str, float]:
    """The run's last-step metrics: ``metrics``, then what gates and patch summary imply."""
    numbers, _ = _numbers_and_rest(metrics)
    numbers.setdefault(names.ACTIVE_LAYERS, float(sum(bool(v) for v in gates.values())))
    numbers.setdefault(names.NUM_LAYERS, float(len(scores)))
    sources = (
        (names.TASK_PARAMETERS, "num_parameters"),
        (names.TASK_BYTES, "nbytes"),
        (names.PATCH_BYTES, "patch_bytes"),
        (names.ROUTE_BYTES, "route_bytes"),
    )
    for key, source in sources:
        if is_number(patch_summary.get(source)):
            numbers.setdefault(key, float(patch_summary[source]))
    return numbers


def _log_gate_artifacts(client, run_id, task, gates, scores, tau) -> None:
    table = {
        layer: {"score": float(s), "on": bool(gates.get(layer, s >= tau))}
        for layer, s in scores.items()
    }
    client.log_dict(run_id, {"tau": tau, "layers": table}, f"gates/{tc.slug(task)}.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = plots.gate_scores(task, scores, gates, tau, Path(tmp) / f"{tc.slug(task)}.png")
        client.log_artifact(run_id, os.fspath(png), "gates")


def track_task(
    uri: str | None,
    experiment: str,
    *,
    patch: TaskPatch,
    model: TAPSModel,
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    base_name: str,
    channels: int,
    parent: str | None = None,
) -> str:
    """The MLflow run of one committed task version (:func:`log_task_run`): ``model`` still
    holds the task, so its gates, scores and merged module are logged; the merged module is
    registered under the task's name, the registry version tagged with the store version.
    ``config`` is the version's config (with its ``image_size``), ``metrics`` its metrics."""
    size = int(config["image_size"])
    return log_task_run(
        uri,
        experiment,
        task=patch.name,
        config=config,
        base=base_name,
        dataset_sizes={"train": metrics["train_size"], "eval": metrics["eval_size"]},
        history=history,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        gates=model.gates(patch.name),
        scores=model.scores(patch.name),
        patch_summary=patch_summary(patch),
        parent=parent,
        model=model.merged(patch.name).cpu(),
        input_shape=(channels, size, size),
        registry_tags={
            "taps_cl.task": patch.name,
            "taps_cl.store_version": str(patch.version),
            "taps_cl.base_fingerprint": patch.base_fingerprint,
        },
    )


def patch_summary(patch: TaskPatch) -> dict[str, Any]:
    """The patch's description logged as ``patch_summary.json``."""
    return {
        "name": patch.name,
        "version": patch.version,
        "num_classes": patch.num_classes,
        "class_names": patch.class_names,
        "active_layers": patch.active_layers,
        "num_layers": patch.num_layers,
        "num_parameters": patch.num_parameters,
        "nbytes": patch.nbytes,
        "patch_bytes": patch.nbytes - patch.route_nbytes,
        "route_bytes": patch.route_nbytes,
        "base_fingerprint": patch.base_fingerprint,
    }
