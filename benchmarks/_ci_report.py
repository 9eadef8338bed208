"""The tables and the issue-19 targets of ``class_incremental.py``, from its results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.harness import print_table

ROUTE_STATS_LIMIT = 128 * 1024  # bytes of routing statistics per task (issue 19)


def _fmt(value: float | None, digits: int = 4) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def print_results(results: Sequence[Any]) -> None:
    """One row per stream and method."""
    headers = ["scenario", "strategy", "final acc", "forgetting", "task id", "within-task",
               "ECE", "KB/task", "time s"]  # fmt: skip
    rows = []
    for r in results:
        within = r.within_task_accuracy
        ridge = r.extra.get("ridge_within_task_accuracy")
        cell = _fmt(within) if ridge is None else f"{_fmt(within)} (ridge {ridge:.4f})"
        kb = r.bytes_per_task.get("total")
        size = None if kb is None else f"{kb / 1e3:.0f}"
        rows.append((r.scenario, r.strategy, _fmt(r.final_avg_accuracy), _fmt(r.avg_forgetting),
                     _fmt(r.task_id_accuracy), cell, _fmt(r.ece), size,
                     f"{r.wall_time_s:.1f}"))  # fmt: skip
    print_table(headers, rows)


def targets(results: Sequence[Any]) -> list[dict[str, Any]]:
    """Each issue-19 target the results can decide, per stream: value, bound, met."""
    out: list[dict[str, Any]] = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        by = {r.strategy: r for r in results if r.scenario == scenario}
        taps = by.get("taps")
        if taps is None:
            continue

        def add(target: str, value: float | None, bound: float | None, where=scenario) -> None:
            if value is not None and bound is not None:
                out.append(dict(scenario=where, target=target, value=value, bound=bound,
                                met=bool(value >= bound - 1e-12)))  # fmt: skip

        ranpac, cumulative = by.get("ranpac"), by.get("cumulative")
        acc = taps.final_avg_accuracy
        add("acc >= ranpac + 0.02", acc, ranpac and ranpac.final_avg_accuracy + 0.02)
        add("acc >= cumulative - 0.02", acc, cumulative and cumulative.final_avg_accuracy - 0.02)
        add("task id >= ranpac grouped + 0.03", taps.task_id_accuracy,
            ranpac and ranpac.task_id_accuracy + 0.03)  # fmt: skip
        if scenario == "multi_domain":
            add("task id >= 0.99", taps.task_id_accuracy, 0.99)
        add("within-task >= closed-form ridge", taps.within_task_accuracy,
            taps.extra.get("ridge_within_task_accuracy"))  # fmt: skip
        route = taps.bytes_per_task.get("route_stats")
        if route is not None:  # as value >= bound: -bytes >= -limit
            add("route stats <= 128 KiB/task", -route, -float(ROUTE_STATS_LIMIT))
    return out


def print_targets(rows: Sequence[dict[str, Any]]) -> None:
    def show(target: str, v: float) -> str:
        return f"{-v:,.0f} B" if target.startswith("route") else f"{v:.4f}"

    print_table(
        ["scenario", "target", "value", "bound", "met"],
        [(t["scenario"], t["target"], show(t["target"], t["value"]),
          show(t["target"], t["bound"]), "met" if t["met"] else "MISSED") for t in rows],
    )  # fmt: skip


def print_cost(cost: dict[str, Any], tasks: Sequence[int]) -> None:
    for k in tasks:
        c = cost[str(k)]
        print(f"routing cost, {k} tasks: {c['routed_s'] * 1e3:.1f} ms vs single-task "
              f"{c['single_s'] * 1e3:.1f} ms = {c['ratio']:.2f}x")  # fmt: skip
