"""The serving-facing half of :class:`~taps_cl.engine.Engine`: what it answers about stored tasks.

Each method validates its arguments and hands the call to the engine's
:class:`~taps_cl.serving.TaskServer`, which does the work from what it was given (base
fingerprint and preprocessing, store, device); nothing here reaches the store directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taps_cl.bases import Base
from taps_cl.config import TrainConfig
from taps_cl.data import preprocess
from taps_cl.serving import Routed, TaskServer, save_timm_pretrained
from taps_cl.taps.patch import TaskPatch, validate_version


class Inference:
    """Prediction, routing, merged modules and exported files of stored tasks (the ``Engine``
    methods that only read: inherited once by ``Engine``, which sets these attributes)."""

    base: Base
    server: TaskServer
    train_config: TrainConfig

    def load_patch(self, name: str, version: int | None = None) -> TaskPatch:
        """The stored patch (verified against its sha256s and this engine's base)."""
        validate_version(version)
        return self.server.load_patch(name, version)

    def image_size(self, name: str, version: int | None = None) -> int:
        """The input side the task was trained at (what ``predict`` resizes to)."""
        validate_version(version)
        return self.server.served(name, version).image_size

    def preprocess(self, inputs: Any, name: str | None = None) -> torch.Tensor:
        """Raw images (tensors, arrays, PIL, paths) -> model input, exactly as training saw them."""
        if name is None:
            return preprocess(inputs, self.base.preprocessing, self.train_config.image_size)
        served = self.server.served(name)
        return preprocess(inputs, served.preprocessing, served.image_size)

    def model(self, name: str, version: int | None = None) -> nn.Module:
        """The task as a plain merged ``nn.Module`` (eval mode; expects preprocessed input);
        an independent copy: modifying it changes nothing the engine serves."""
        validate_version(version)
        return self.server.merged(name, version)

    def class_names(self, name: str, version: int | None = None) -> list[str] | None:
        validate_version(version)
        return self.server.served(name, version).class_names

    def predict(
        self,
        name: str | Sequence[str],
        inputs: Any,
        logits: bool = False,
        version: int | None = None,
    ) -> torch.Tensor:
        """Class indices (or logits with ``logits=True``) for raw ``inputs``. Safe to call
        from any number of threads (each task version is served by its own merged module).

        ``name`` may also be a sequence of task names, one per input (current versions, no
        ``version=``): then every row runs through its task in ONE mixed-task forward (the
        base once, each task's delta, norms and head on its rows), and logits are padded with
        ``-inf`` to the widest head. It agrees with each task's own ``predict`` to float
        rounding (same argmax); the single-name path stays the bit-for-bit one."""
        validate_version(version)
        out = self.server.predict(name, inputs, version)
        return out if logits else out.argmax(1)

    def evaluate(self, name: str, dataset: Any, version: int | None = None) -> dict[str, float]:
        """Accuracy and loss of the stored task on ``dataset``."""
        validate_version(version)
        return self.server.evaluate(name, dataset, version)

    def route(
        self, inputs: Any, tasks: list[str] | None = None, method: str | None = None
    ) -> Routed:
        """Task-free prediction: for each raw input, the task it belongs to, its class there
        and a confidence (router's task probability x the patch's class probability).

        Candidates are the routable current versions of this base's tasks (``tasks=`` restricts
        them). Cost: one base forward per distinct trained input size, the discriminant, then
        one mixed-task forward running each input through its chosen task (``"lda"``,
        ``"ncm"``; equal to each task's merged module to float rounding, same argmax).
        ``method``: ``"lda"`` (default: pooled-covariance discriminant on base features; see
        ``benchmarks/routing.py`` and the docs for how the methods compare), ``"ncm"``
        (cosine to class means), ``"combined"`` (LDA shortlists 2 tasks, their patches'
        calibrated energy decides) or ``"energy"`` (every patch on every input; for comparison).
        """
        return self.server.route(inputs, tasks, method)

    def save_pretrained(
        self, name: str, directory: str | os.PathLike, version: int | None = None
    ) -> Path:
        """Write the merged task in timm's Hugging Face layout (``config.json`` +
        ``model.safetensors``): ``timm.create_model("local-dir:DIR", pretrained=True)`` loads
        it with the task's classes and preprocessing. Needs a timm base."""
        validate_version(version)
        served = self.server.served(name, version)
        return save_timm_pretrained(
            served.module, directory, self.base.preprocessing, served.image_size
        )

    def refresh(self) -> None:
        """Read current task versions from the store on the next call (they are cached for
        ``version_ttl`` seconds; writes through this engine are seen at once anyway)."""
        self.server.refresh()
