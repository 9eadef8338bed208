"""Serving stored tasks: one frozen base in memory, tasks loaded from the store on demand.

Every committed version is immutable, so a loaded task never goes stale except when a newer
version becomes current; each call resolves the version it serves and loads it if needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from taps_cl.config import TrainConfig
from taps_cl.data import prepare, preprocess
from taps_cl.errors import BaseMismatchError, UnknownTaskError
from taps_cl.taps.model import TAPSModel
from taps_cl.taps.patch import TaskPatch, validate_task_name
from taps_cl.train import evaluate


class TaskServer:
    """The serving side of an :class:`~taps_cl.engine.Engine` (its base, store and device)."""

    def __init__(self, engine: Any, new_model: Callable[[], TAPSModel]) -> None:
        self.engine = engine
        self._new_model = new_model
        self._model: TAPSModel | None = None
        # task -> (version loaded into the serving model, input size it was trained at)
        self._loaded: dict[str, tuple[int, int]] = {}

    @property
    def model(self) -> TAPSModel:
        if self._model is None:
            self._model = self._new_model().to(self.engine.device).eval()
        return self._model

    def unload(self, name: str) -> None:
        if self._model is not None and name in self._model.tasks:
            self._model.remove_task(name)
        self._loaded.pop(name, None)

    def load_patch(self, name: str, version: int | None = None) -> TaskPatch:
        """The stored patch (verified against its sha256s and this engine's base)."""
        fp = self.engine.fingerprint
        patch = self.engine.store.load(name, version, base=fp)
        if patch.base_fingerprint != fp:
            raise BaseMismatchError(f"task {name!r} belongs to another base")
        return patch

    def current_version(self, name: str) -> int:
        validate_task_name(name)
        records = self.engine.tasks()
        for rec in records:
            if rec.name == name:
                return rec.current_version
        known = [r.name for r in records]
        raise UnknownTaskError(
            f"no task {name!r} in {self.engine.store.url}; known: {known or 'none'}"
        )

    def ensure(self, name: str, version: int | None = None) -> tuple[TAPSModel, int]:
        """The serving model with ``name`` at ``version`` (default: current) loaded, and the
        input size that version was trained at; both come from the same stored version."""
        model = self.model
        want = version or self.current_version(name)
        loaded = self._loaded.get(name)
        if loaded is None or loaded[0] != want:
            patch = self.load_patch(name, want)
            self.unload(name)
            model.load_patch(patch)
            model.to(self.engine.device).eval()
            default = self.engine.base.preprocessing.input_size
            size = int(patch.config.get("image_size") or default)
            loaded = self._loaded[name] = (want, size)
        return model, loaded[1]

    @torch.no_grad()
    def predict(self, name: str, inputs: Any, version: int | None = None) -> torch.Tensor:
        """Logits of task ``name`` for raw ``inputs`` (CPU, float32)."""
        model, size = self.ensure(name, version)
        x = preprocess(inputs, self.engine.base.preprocessing, size)
        device = self.engine.device
        outs = [model(chunk.to(device), task=name).float().cpu() for chunk in x.split(256)]
        return torch.cat(outs)

    def evaluate(self, name: str, dataset: Any, version: int | None = None) -> dict[str, float]:
        model, size = self.ensure(name, version)
        data = prepare(
            dataset,
            preprocessing=self.engine.base.preprocessing,
            image_size=size,
            num_classes=model.num_classes(name),
        )
        return evaluate(model, name, data, TrainConfig(device=str(self.engine.device)))

    def merged(self, name: str, version: int | None = None) -> nn.Module:
        return self.ensure(name, version)[0].merged(name)
