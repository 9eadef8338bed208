"""TaskPatch: everything one task owns on top of the frozen base, and nothing else.

Tensor names follow one scheme so that storage, export and loading need no other metadata:

- ``delta.<layer>``: weight delta of a gated layer whose gate is on (pruned layers have none),
  stored as float32, bfloat16 or int8 (``TAPSConfig.delta_dtype``)
- ``lora_a.<layer>``, ``lora_b.<layer>``: instead of ``delta``, the low-rank factors of a kept
  delta (``TAPSConfig.delta_rank``): ``delta = (lora_b @ lora_a).view(weight.shape)``, the
  ``alpha / rank`` scaling already folded into ``lora_b``; every registered delta kind
  (:mod:`taps_cl.taps.deltas`) stores its own tensors ``<key>.<layer>`` this way
- ``scale.<tensor>``: per-output-channel scales of an int8 tensor, e.g. ``scale.delta.<layer>``
- ``score.<layer>``: the gate score of every gated layer (0-d; kept for pictures and audits)
- ``norm.<module>.<name>``: the task's own normalisation parameters and buffers
- ``head.<name>``: the task's classifier head (``weight``, ``bias``)
- ``route.<name>``: optional statistics of the base features of the task's data, used to route
  inputs to tasks without a task name (see :mod:`taps_cl.routing`); not parameters
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from taps_cl.taps.deltas import delta_keys

TASK_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")  # used with fullmatch: no "\n"


def tensor_kinds() -> tuple[str, ...]:
    """The kinds of tensor a patch may hold (``<kind>.<name>``): the registered delta kinds'
    stored tensors, then ``score``, ``norm``, ``head``, ``route`` and int8 ``scale``."""
    return (*delta_keys(), "score", "norm", "head", "route", "scale")


def parameter_kinds() -> tuple[str, ...]:
    """The kinds that are the task's trained parameters ("route" holds data statistics)."""
    return tuple(k for k in tensor_kinds() if k != "route")


def validate_task_name(name: object) -> str:
    """Return ``name`` if it is a valid task name, else raise a ``ValueError`` that says why.

    Names become ``nn.ParameterDict`` keys, file names and SQL values, so they are kept to a
    safe alphabet: a letter, then up to 63 letters, digits, ``_`` or ``-``.
    """
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    if not TASK_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid task name {name!r}: use a letter followed by up to 63 letters, digits, "
            "'_' or '-' (e.g. 'flowers' or 'cub_200')"
        )
    return name


def validate_version(version: object) -> int | None:
    """``version`` if it is None (the current version) or an int >= 1, else ``ValueError``
    (``0`` or ``False`` must not silently mean "current")."""
    if version is not None and (type(version) is not int or version < 1):
        raise ValueError(f"version must be an int >= 1 or None (current), got {version!r}")
    return version


@dataclass
class TaskPatch:
    """The task-specific state of one task: gated deltas, scores, norms and head."""

    name: str  # task name (see validate_task_name)
    num_classes: int  # size of the task's head
    tensors: dict[str, torch.Tensor]  # tensor name (see module docstring) -> tensor
    active_layers: list[str]  # gated layers whose gate is on, in model order
    num_layers: int  # number of gated layers in the model
    base_fingerprint: str  # sha256 of the base this patch was trained on
    class_names: list[str] | None = None  # optional human names of the classes
    config: dict[str, Any] = field(default_factory=dict)  # TAPSConfig (and training) as JSON
    version: int | None = None  # set by the task store

    def __post_init__(self) -> None:
        validate_task_name(self.name)
        for what in ("num_classes", "num_layers"):
            if type(getattr(self, what)) is not int:
                raise TypeError(f"{what} must be an int, got {getattr(self, what)!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names given for {self.num_classes} classes"
            )
        kinds = tensor_kinds()
        for key, value in self.tensors.items():
            if key.split(".", 1)[0] not in kinds or "." not in key:
                raise ValueError(f"tensor name {key!r} must start with one of {kinds}")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"tensor {key!r} is {type(value).__name__}, not a torch.Tensor")

    def kind(self, kind: str) -> dict[str, torch.Tensor]:
        """Tensors of one kind with the ``kind.`` prefix stripped (e.g. ``kind("delta")``)."""
        prefix = kind + "."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def without(self, kind: str) -> TaskPatch:
        """A shallow copy without the tensors of one kind (e.g. ``without("route")`` gives the
        patch as code that predates routing statistics expects it)."""
        if kind not in tensor_kinds():
            raise ValueError(f"unknown tensor kind {kind!r}; kinds: {tensor_kinds()}")
        prefix = kind + "."
        kept = {k: v for k, v in self.tensors.items() if not k.startswith(prefix)}
        return replace(self, tensors=kept)

    @property
    def num_parameters(self) -> int:
        """Task-specific parameter count (float and int8 tensors of the parameter kinds; norm
        counters and routing statistics excluded: users pay parameters for what is trained)."""
        kinds = parameter_kinds()
        return sum(
            t.numel()
            for k, t in self.tensors.items()
            if (t.is_floating_point() or t.dtype == torch.int8) and k.split(".", 1)[0] in kinds
        )

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors as stored (the patch and its routing statistics, if any)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def route_nbytes(self) -> int:
        """Of :attr:`nbytes`: the routing statistics (``route.*`` tensors)."""
        return sum(t.numel() * t.element_size() for t in self.kind("route").values())

    # The file format is the store's export format: both read and write it through the
    # method's own file I/O (taps_cl.taps.patchfile), never through storage.

    def save(self, path: str | os.PathLike, *, allow_symlink: bool = False) -> Path:
        """Write the patch to one ``.safetensors`` file, the format ``taps-cl export`` writes
        (``taps-cl import`` and ``TaskStore.import_file`` read it). Atomic; returns the path."""
        from taps_cl.taps.patchfile import write_patch_file

        meta = {
            "name": self.name,
            "version": self.version,
            "base_fingerprint": self.base_fingerprint,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "num_layers": self.num_layers,
            "active_layers": self.active_layers,
            "config": self.config,
        }
        return write_patch_file(Path(path), self.tensors, meta, allow_symlink=allow_symlink)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskPatch:
        """Read a patch file written by :meth:`save` or ``taps-cl export`` (every tensor is
        checked against its sha256)."""
        from taps_cl.taps.patchfile import read_patch_file

        patch, meta = read_patch_file(path, cls)
        version = meta.get("version")
        patch.version = version if type(version) is int and version >= 1 else None
        return patch
