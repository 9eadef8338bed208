"""Validated, JSON round-trippable configuration for the method and for training.

One comment per field is the single source of documentation for that field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, TypeVar

PENALTIES = ("uniform", "weighted")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
DEVICES_HINT = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"

T = TypeVar("T", bound="_JSONConfig")


class _JSONConfig:
    """JSON round-trip shared by the config dataclasses (unknown keys are an error, not ignored)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))


@dataclass
class TAPSConfig(_JSONConfig):
    """How TAPS gates layers. Defaults follow the authors' code unless noted."""

    lam: float = 0.5  # sparsity penalty weight; larger -> fewer adapted layers (see docs)
    tau: float = 0.1  # gate threshold: layer i is adapted iff score_i >= tau
    score_init: float = 0.15  # initial score; > tau, so every layer starts adapted
    penalty: str = "uniform"  # "uniform": mean |s_i|; "weighted": |s_i| weighted by layer size
    warmup_epochs: float = 0.0  # epochs (may be fractional) before the penalty switches on
    task_norms: bool = True  # each task owns its norm layers (BN affine + stats, LN/GN affine)

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        if self.score_init < self.tau:
            raise ValueError(
                f"score_init ({self.score_init}) must be >= tau ({self.tau}) so that every layer "
                "starts adapted; a closed gate never receives a delta gradient"
            )
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclass
class TrainConfig(_JSONConfig):
    """How one task (or one joint run) is trained."""

    epochs: int = 3  # passes over the training data
    batch_size: int = 32  # minibatch size
    image_size: int | None = None  # input side in pixels; None = the base's own (e.g. 224)
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9)
    lr: float = 1e-3  # learning rate of deltas, norms and head
    score_lr: float | None = None  # None = auto: scores can cross (init - tau) ~4x in training
    weight_decay: float = 0.0  # decoupled weight decay of deltas and head (never of scores)
    schedule: str = "cosine"  # learning-rate schedule over all steps
    seed: int = 0  # seeds torch, the data order and head initialisation
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    amp: bool = True  # mixed precision (bf16 autocast) on CUDA; ignored on CPU unless amp_cpu
    amp_cpu: bool = False  # also use bf16 autocast on CPU (slower on most CPUs; for testing)
    num_workers: int = 0  # DataLoader worker processes
    max_grad_norm: float | None = 5.0  # gradient clipping; None disables

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be None or >= 8, got {self.image_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.score_lr is not None and self.score_lr <= 0:
            raise ValueError(f"score_lr must be None (auto) or > 0, got {self.score_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be {DEVICES_HINT}, got {self.device!r}")
