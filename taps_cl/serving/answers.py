"""One answer per row of a checked request: routed rows through the server's task-free routing,
rows that name their task through it, in one mixed-task forward.

Rows without a task go to :meth:`TaskServer.route` together (exactly what ``Engine.route``
gives for those images); rows that name one run together in ONE mixed-task forward, each
through its task (what ``Engine.predict`` with a task per row gives; the same as each task's
own ``predict`` to float rounding), so a request naming many tasks costs about one forward.
Every named task is looked up before any forward, so an unknown name costs no compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

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
    named = [i for i, task in enumerate(rows.tasks) if task is not None]
    free = [i for i, task in enumerate(rows.tasks) if task is None]
    current = {rows.tasks[i]: 0 for i in named}
    current = {name: server.current_version(name) for name in current}  # unknown names: now
    out: list[Answer | None] = [None] * len(rows)
    if named:
        keys = [(rows.tasks[i], current[rows.tasks[i]]) for i in named]
        for i, answer in zip(named, _named(server, keys, rows, named), strict=True):
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
    server: TaskServer, keys: list[tuple[str, int]], rows: DecodedRows, idx: list[int]
) -> list[Answer]:
    logits = server.mixed.predict(keys, [rows.images[i] for i in idx])  # -inf padded
    prob = torch.softmax(logits.to(torch.float64), 1)
    conf, labels = prob.max(1)
    info = server.mixed.info(list(dict.fromkeys(keys)))
    out = []
    for key, k, c in zip(keys, labels.tolist(), conf.tolist(), strict=True):
        names = info[key].class_names
        out.append(Answer(key[0], k, names[k] if names else None, float(c), key[1]))
    return out
