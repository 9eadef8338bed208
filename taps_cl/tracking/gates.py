"""Which layers each task of a store adapts: Figure 3 of the TAPS paper, as PNG and as text."""

from __future__ import annotations

import re
from pathlib import Path

from taps_cl.storage import TaskStoreAPI
from taps_cl.taps.patch import TaskPatch
from taps_cl.tracking import plots

ON, OFF = "#", "."
LAYER_ORDER_KEY = "layer_order"  # optional patch.config entry: every gated layer in model order


def _natural(name: str) -> list:
    """Sort key that puts ``blocks.2`` before ``blocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def ordered_layers(patch: TaskPatch, layer_order: list[str] | None = None) -> list[str]:
    """The patch's gated layers in model order.

    The store returns tensors by name, so model order comes from ``layer_order`` if given, else
    ``config["layer_order"]`` if the engine recorded it; otherwise layers are sorted naturally
    (``layer2`` before ``layer10``): model order for ``blocks.<i>``/``layer<i>`` names, but
    e.g. timm's ``conv_stem`` then lands after the blocks.
    """
    layers = list(patch.kind("score"))
    recorded = layer_order if layer_order is not None else patch.config.get(LAYER_ORDER_KEY)
    if isinstance(recorded, list) and set(recorded) >= set(layers):
        return [name for name in recorded if name in set(layers)]
    return sorted(layers, key=_natural)


def _single_base(store: TaskStoreAPI, base_fingerprint: str | None) -> str:
    tasks = store.list_tasks(base=base_fingerprint)
    bases = sorted({t.base_fingerprint for t in tasks})
    if not tasks:
        where = f" for base {base_fingerprint[:12]}" if base_fingerprint else ""
        raise ValueError(f"the store {store.url} holds no tasks{where}")
    if len(bases) > 1:
        listed = ", ".join(
            f"{b[:12]} ({sum(t.base_fingerprint == b for t in tasks)} tasks)" for b in bases
        )
        raise ValueError(
            f"the store holds tasks of several bases ({listed}); pass base_fingerprint"
        )
    return bases[0]


def gates_figure(
    store: TaskStoreAPI,
    out_path: str | Path,
    base_fingerprint: str | None = None,
    layer_order: list[str] | None = None,
) -> tuple[Path, str]:
    """Heatmap of tasks (rows, current version of each) x gated layers (columns, model order),
    on/off, written to ``out_path`` (PNG); returns the path and the same grid as text.

    In the text each task is one line: name, version, one character per layer (``#`` adapted,
    ``.`` shared with the base) and ``k/N``; the column legend follows. ``layer_order`` (e.g.
    ``TAPSModel.layer_names`` of the base) fixes the column order; see :func:`ordered_layers`.
    """
    if not isinstance(store, TaskStoreAPI):
        raise TypeError(f"store must be a TaskStore (TaskStoreAPI), got {type(store).__name__}")
    base = _single_base(store, base_fingerprint)
    patches = [store.load(t.name, base=base) for t in store.list_tasks(base=base)]
    layers: list[str] = []
    for patch in patches:
        layers += [name for name in ordered_layers(patch, layer_order) if name not in set(layers)]
    rows = []
    for patch in patches:
        active = set(patch.active_layers)
        rows.append((patch, [name in active for name in layers]))
    base_name = store.base(base).name
    title = f"Adapted layers per task (base {base_name}, {len(layers)} gated layers)"
    labels = [(f"{p.name} v{p.version} ({sum(f)}/{len(f)})", f) for p, f in rows]
    png = plots.gates_heatmap(labels, layers, out_path, title)
    return png, _text_grid(rows, layers, base_name, base)


def _text_grid(
    rows: list[tuple[TaskPatch, list[bool]]], layers: list[str], base_name: str, base: str
) -> str:
    width = max(len(f"{p.name} v{p.version}") for p, _ in rows)
    lines = [
        f"gated layers of {len(rows)} task(s) on base {base_name} ({base[:12]}): "
        f"'{ON}' adapted, '{OFF}' shared with the base",
        # A ruler: the tens digit of every 10th column, so a column can be found in the legend.
        (
            " " * (width + 2)
            + "".join(str(i // 10 % 10) if i % 10 == 0 else " " for i in range(len(layers)))
        ).rstrip(),
    ]
    for patch, flags in rows:
        grid = "".join(ON if on else OFF for on in flags)
        lines.append(
            f"{patch.name} v{patch.version}".ljust(width) + f"  {grid}  {sum(flags)}/{len(flags)}"
        )
    lines.append("columns (model order):")
    lines += [f"  {i:>3}  {name}" for i, name in enumerate(layers)]
    return "\n".join(lines)
