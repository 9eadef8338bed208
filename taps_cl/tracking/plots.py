"""PNG figures of the tracking reports, drawn on bare ``matplotlib.figure.Figure`` objects.

No pyplot: pyplot keeps global figure state and picks a GUI backend, which a library must not
do to its users (and which breaks on headless servers). A bare Figure renders with Agg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

ON_COLOR = "#d95f02"  # adapted layer (gate on)
OFF_COLOR = "#c9c9c9"  # shared with the base (gate off)


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def accuracy_heatmaps(matrices: Mapping[str, Sequence[Sequence[float]]], path: str | Path) -> Path:
    """One annotated heatmap per strategy, side by side, on a shared 0-1 colour scale."""
    n = len(matrices)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    size = max(2, *(len(m[0]) for m in matrices.values()))
    cell = 0.55 if size <= 8 else 0.35
    fig = Figure(
        figsize=(cols * (1.6 + cell * size) + 1.0, rows * (1.4 + cell * size)), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for k, (ax, (name, matrix)) in enumerate(zip(axes.flat, matrices.items(), strict=False)):
        data = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_facecolor("#eeeeee")
        for (i, j), value in np.ndenumerate(data.filled(np.nan)):
            if not math.isnan(value) and data.shape[1] <= 12:
                color = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_title(name)
        ax.set_xlabel("evaluated experience")
        if k % cols == 0:  # one y label per row of subplots, or it runs into its neighbour
            ax.set_ylabel("trained up to experience")
        ax.set_xticks(range(data.shape[1]))
        ax.set_yticks(range(data.shape[0]))
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    fig.suptitle("Accuracy matrix (row i: after training experience i)")
    return save(fig, path)


def forgetting_bars(forgetting: Mapping[str, Mapping[int, float]], path: str | Path) -> Path:
    """Grouped bars: final forgetting of each experience, one bar per strategy."""
    experiences = sorted({j for values in forgetting.values() for j in values})
    n = max(len(forgetting), 1)
    width = 0.8 / n
    fig = Figure(figsize=(max(5.0, 1.0 + 0.9 * len(experiences) * max(1, n / 2)), 3.8))
    ax = fig.subplots()
    x = np.arange(len(experiences))
    for k, (name, values) in enumerate(forgetting.items()):
        heights = [values.get(j, np.nan) for j in experiences]
        bars = ax.bar(x + (k - (n - 1) / 2) * width, heights, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)  # makes zero forgetting visible too
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [str(j) for j in experiences])
    ax.set_xlabel("experience")
    ax.set_ylabel("forgetting (best accuracy - final accuracy)")
    ax.set_title("Forgetting per experience after the last experience")
    if not experiences:
        ax.text(0.5, 0.5, "no experience was seen twice", ha="center", transform=ax.transAxes)
    ax.legend(title="strategy", fontsize=8)
    return save(fig, path)


def accuracy_vs_params(points: Mapping[str, tuple[float, float]], path: str | Path) -> Path:
    """Final average accuracy against task-specific parameters (log x), points labelled.

    Strategies that add no parameters per task (0, e.g. EWC) sit at x = 0 on a symlog axis;
    those with no count (NaN) are named in the title instead.
    """
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    shown = {k: v for k, v in points.items() if not math.isnan(v[0]) and not math.isnan(v[1])}
    placed: list[tuple[float, float]] = []
    for name, (params, acc) in shown.items():
        ax.scatter([params], [acc], s=40)
        # Points at (nearly) the same place get their labels stacked instead of overprinted.
        near = sum(
            1 for p, a in placed if abs(a - acc) < 0.03 and abs(p - params) <= 0.2 * max(p, 1)
        )
        placed.append((params, acc))
        offset = (5, 4 - 11 * near)
        ax.annotate(name, (params, acc), textcoords="offset points", xytext=offset, fontsize=9)
    xs = [p for p, _ in shown.values()]
    if any(p <= 0 for p in xs):
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(-0.5, max(max(xs) * 3, 10.0))
        label = "task-specific parameters per task (log scale, 0 at the left)"
    else:
        ax.set_xscale("log")
        if xs:
            ax.set_xlim(min(xs) / 3, max(xs) * 3)
        label = "task-specific parameters per task (log scale)"
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel(label)
    ax.set_ylabel("final average accuracy")
    missing = sorted(set(points) - set(shown))
    title = "Accuracy vs task-specific parameters"
    if missing:
        title += f"\n(not shown, no parameter count: {', '.join(missing)})"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return save(fig, path)


def gate_scores(
    task: str, scores: Mapping[str, float], gates: Mapping[str, bool], tau: float, path: str | Path
) -> Path:
    """Bar chart of each gated layer's score (model order), coloured by its gate, with tau."""
    layers = list(scores)
    on = [bool(gates.get(layer, scores[layer] >= tau)) for layer in layers]
    fig = Figure(figsize=(min(max(5.0, 0.22 * len(layers) + 2.0), 30.0), 4.2))
    ax = fig.subplots()
    colors = [ON_COLOR if flag else OFF_COLOR for flag in on]
    ax.bar(range(len(layers)), [scores[layer] for layer in layers], color=colors)
    ax.axhline(tau, color="black", linestyle="--", linewidth=1.0)
    ax.set_xticks(range(len(layers)), _tick_labels(layers), rotation=90, fontsize=7)
    ax.set_xlabel("gated layer (model order)")
    ax.set_ylabel("gate score")
    ax.set_title(f"Task {task}: {sum(on)}/{len(layers)} layers adapted")
    handles = [
        Patch(color=ON_COLOR, label="adapted (score >= tau)"),
        Patch(color=OFF_COLOR, label="shared with base"),
        ax.get_lines()[0],
    ]
    handles[2].set_label(f"tau = {tau:g}")
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save(fig, path)


def gates_heatmap(
    rows: Sequence[tuple[str, Sequence[bool]]], layers: Sequence[str], path: str | Path, title: str
) -> Path:
    """Tasks (rows) x gated layers (columns): which layers each task adapts (Figure 3 of TAPS)."""
    data = np.array([[1.0 if on else 0.0 for on in flags] for _, flags in rows]).reshape(
        len(rows), len(layers)
    )
    fig = Figure(figsize=(min(max(6.0, 0.2 * len(layers) + 3.0), 32.0), 1.6 + 0.4 * len(rows)))
    ax = fig.subplots()
    ax.imshow(data, cmap=ListedColormap([OFF_COLOR, ON_COLOR]), vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xticks(range(len(layers)), _tick_labels(layers), rotation=90, fontsize=7)
    ax.set_xticks(np.arange(-0.5, len(layers), 1), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows), 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("gated layer (model order)")
    ax.set_ylabel("task")
    ax.set_title(title)
    handles = [Patch(color=ON_COLOR, label="adapted"), Patch(color=OFF_COLOR, label="shared")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return save(fig, path)


def _tick_labels(layers: Sequence[str]) -> list[str]:
    """Full names for a readable number of layers; for many, every k-th with its index."""
    if len(layers) <= 60:
        return list(layers)
    step = math.ceil(len(layers) / 60)
    return [f"{i}:{name}" if i % step == 0 else "" for i, name in enumerate(layers)]
