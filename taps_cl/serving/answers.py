"""One answer per row of a checked request: routed rows through the server's task-free routing,
rows that name their task through that task's merged module.

Rows without a task go to :meth:`TaskServer.route` together (exactly what ``Engine.route``
gives for those images); rows that name one run, grouped per task, once through its served
module (what ``Engine.predict`` gives). Every named task is looked up before any forward, so
an unknown name costs no compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from taps_cl.data import preprocess
from taps_cl.serving.requests import DecodedRows
from taps_cl.serving.server import TaskServer

__all__ = ["ANSWER_COLUMNS", "Answer", "answer_rows"]

ANSWER_COLUMNS = ("task", "label", "class_name", "confidence", "version")


@dataclass(frozen=True)
class Answer:
    """What one row gets back (the columns of :data:`ANSWER_COLUMNS`)."""

    task: str
    label: int  # class index within ``task``
    class_name: str | None
    confidence: float  # P(task) x P(class) when routed; P(class) when the row named its task
    version: int  # the task version that answered

    def as_dict(self) -> dict[str, object]:
        return {c: getattr(self, c) for c in ANSWER_COLUMNS}


def answer_rows(
    server: TaskServer,
    rows: DecodedRows,
    method: str | None = None,
    versions: Mapping[str, int] | None = None,
) -> list[Answer]:
    """Answers for ``rows`` in order. ``versions`` renames served versions for the caller (a
    snapshot serves each task as its own version 1 and reports the version it was taken from)."""
    named: dict[str, list[int]] = {}
    free: list[int] = []
    for i, task in enumerate(rows.tasks):
        (named.setdefault(task, []) if task is not None else free).append(i)
    current = {name: server.current_version(name) for name in named}  # unknown names: now
    out: list[Answer | None] = [None] * len(rows)
    for name, idx in named.items():
        for i, answer in zip(idx, _named(server, name, current[name], rows, idx), strict=True):
            out[i] = answer
    if free:
        routed = server.route([rows.images[i] for i in free], None, method)
        for j, i in enumerate(free):
            task = routed.tasks[j]
            out[i] = Answer(
                task,
                int(routed.labels[j]),
                routed.class_names[j],
                float(routed.confidence[j]),
                routed.versions[task],
            )
    renames = dict(versions or {})
    return [
        Answer(a.task, a.label, a.class_name, a.confidence, renames.get(a.task, a.version))
        for a in out
        if a is not None
    ]


def _named(
    server: TaskServer, name: str, version: int, rows: DecodedRows, idx: list[int]
) -> list[Answer]:
    entry = server.served(name, version)
    x = preprocess([rows.images[i] for i in idx], entry.preprocessing, entry.image_size)
    prob = torch.softmax(server.logits(entry, x).to(torch.float64), 1)
    conf, labels = prob.max(1)
    names = entry.class_names
    return [
        Answer(name, k, names[k] if names else None, float(c), version)
        for k, c in zip(labels.tolist(), conf.tolist(), strict=True)
    ]
