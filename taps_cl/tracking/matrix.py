"""The accuracy matrix and the continual-learning numbers derived from it (see names.py).

Pure functions over ``list[list[float]]`` (NaN = not evaluated), shared by the Avalanche logger,
``log_strategy_result`` and ``compare`` so that every run's numbers mean the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from taps_cl.tracking import names
from taps_cl.tracking.names import is_number

Matrix = list[list[float]]


def validate_matrix(matrix: Sequence[Sequence[float | None]]) -> Matrix:
    """``matrix`` as floats (``None`` -> NaN), rows padded with NaN to the widest row.

    Values must be fractions in [0, 1]: a percentage (e.g. 87.5) raises ``ValueError`` instead
    of silently producing forgetting values 100 times too large.
    """
    if isinstance(matrix, (str, bytes)) or not isinstance(matrix, Sequence) or not matrix:
        raise ValueError("accuracy_matrix must be a non-empty list of rows (list of floats)")
    rows: Matrix = []
    for i, row in enumerate(matrix):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"accuracy_matrix row {i} is {type(row).__name__}, not a list")
        out = []
        for j, value in enumerate(row):
            if value is None:
                value = math.nan
            if not is_number(value):
                raise TypeError(f"accuracy_matrix[{i}][{j}] = {value!r} is not a number")
            value = float(value)
            if not math.isnan(value) and not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"accuracy_matrix[{i}][{j}] = {value} is outside [0, 1]; "
                    "pass accuracies as fractions, not percentages"
                )
            out.append(value)
        rows.append(out)
    width = max(len(r) for r in rows)
    return [r + [math.nan] * (width - len(r)) for r in rows]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def forgetting_row(matrix: Matrix, i: int) -> dict[int, float]:
    """Forgetting of each experience ``j < i`` after training up to ``i``: the best accuracy it
    ever had (at or after learning it, before ``i``) minus its accuracy now."""
    out = {}
    for j in range(min(i, len(matrix[i]))):
        before = [matrix[k][j] for k in range(j, i) if not math.isnan(matrix[k][j])]
        if before and not math.isnan(matrix[i][j]):
            out[j] = max(before) - matrix[i][j]
    return out


def row_summary(matrix: Matrix, i: int) -> dict[str, float]:
    """final_avg_accuracy, avg_forgetting and bwt after training up to experience ``i``."""
    seen = matrix[i][: i + 1]
    out = {names.FINAL_AVG_ACCURACY: _mean(seen)}
    forget = forgetting_row(matrix, i)
    if forget:
        out[names.AVG_FORGETTING] = _mean(list(forget.values()))
    transfer = [
        matrix[i][j] - matrix[j][j]
        for j in range(min(i, len(matrix[i])))
        if not math.isnan(matrix[i][j]) and not math.isnan(matrix[j][j])
    ]
    if transfer:
        out[names.BWT] = _mean(transfer)
    return {k: v for k, v in out.items() if not math.isnan(v)}


def summarize(matrix: Matrix) -> dict[str, float]:
    """The summary of the last row, plus ``forgetting_exp{j}`` of every earlier experience."""
    last = len(matrix) - 1
    out = row_summary(matrix, last)
    out.update({names.forgetting_exp(j): v for j, v in forgetting_row(matrix, last).items()})
    return out


def step_metrics(matrix: Matrix, rows: Sequence[int] | None = None) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` for rows ``rows`` (default all): ``acc_exp{j}``,
    ``forgetting_exp{j}`` and the row summary, each at step = row index."""
    out: list[tuple[str, float, int]] = []
    for i in range(len(matrix)) if rows is None else rows:
        out += [(names.acc_exp(j), v, i) for j, v in enumerate(matrix[i]) if not math.isnan(v)]
        out += [(names.forgetting_exp(j), v, i) for j, v in forgetting_row(matrix, i).items()]
        out += [(k, v, i) for k, v in row_summary(matrix, i).items()]
    return out


def matrix_table(matrix: Matrix) -> dict:
    """The matrix as JSON (pandas "split" layout, which MLflow's artifact viewer shows as a
    table): rows = trained up to experience i, columns = evaluated experience j."""
    return {
        "columns": [f"exp{j}" for j in range(len(matrix[0]))],
        "index": [f"after_exp{i}" for i in range(len(matrix))],
        "data": [[None if math.isnan(v) else v for v in row] for row in matrix],
    }


def matrix_csv(matrix: Matrix) -> str:
    """The matrix as CSV with the same row and column labels (empty cell = not evaluated)."""
    table = matrix_table(matrix)
    lines = [",".join(["trained_up_to"] + table["columns"])]
    for label, row in zip(table["index"], table["data"], strict=True):
        lines.append(",".join([label] + ["" if v is None else f"{v:.6g}" for v in row]))
    return "\n".join(lines) + "\n"
