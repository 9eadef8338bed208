"""Validated, JSON round-trippable configuration for the method and for training.

Each field's ``metadata["help"]`` (set with :func:`_doc`) is the single source of documentation
for that field; the CLI builds its option help from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from taps_cl.registry import DELTA_KINDS

__version__ = "0.1.0"  # the package version (taps_cl.__version__; recorded with MLflow runs)
DEFAULT_BASE = "efficientnet_lite0"  # the base an Engine uses when none is named
PENALTIES = ("uniform", "weighted")
AMP_DTYPES = ("bfloat16", "float16")
EPOCH_LENGTHS = ("own", "max", "min")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
DELTA_DTYPES = ("float32", "bfloat16", "int8")
KiB, MiB = 1024, 1024 * 1024
SIZES = {"tiny": 256 * KiB, "small": 512 * KiB, "compact": MiB, "large": 4 * MiB}
PAPER = "paper"  # TAPSConfig.size: the paper's penalty selection, dense float32 deltas
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": KiB, "mib": MiB, "gib": 1024**3}
NORM_STATS = ("base", "reset")
HEAD_INITS = ("ridge", "random")
DENSE_LR, LOWRANK_LR = 1e-3, 3e-3  # TrainConfig.lr=None: see TrainConfig.lr_for
DEVICES_HINT = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"

T = TypeVar("T", bound="_JSONConfig")


def _doc(default: Any, help: str) -> Any:
    """A field with ``default`` whose ``metadata["help"]`` documents it, so that the dataclass,
    ``field_docs`` and the CLI's ``--help`` read one text."""
    return dataclasses.field(default=default, metadata={"help": help})


class _JSONConfig:
    """JSON round-trip shared by the config dataclasses (unknown keys are an error, not ignored)."""

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Field name -> its help (``metadata["help"]``), the field's only documentation; the
        CLI's ``--help`` shows it."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def _check_types(self) -> None:
        """Numbers must be real numbers (not bools, NaN or inf), flags must be bools: a NaN
        ``lam`` would otherwise pass every comparison and fail only after training."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, kinds = getattr(self, f.name), str(f.type).replace(" ", "").split("|")
            if value is None and "None" in kinds:
                continue
            if kinds == ["bool"]:
                if not isinstance(value, bool):
                    raise TypeError(f"{f.name} must be True or False, got {value!r}")
                continue
            if "int" in kinds or "float" in kinds:
                if isinstance(value, str) and "str" in kinds:
                    continue
                integral = "float" not in kinds
                number = numbers.Integral if integral else numbers.Real
                if isinstance(value, bool) or not isinstance(value, number):
                    want = "an int" if integral else "a number"
                    raise TypeError(f"{f.name} must be {want}, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be finite, got {value!r}")

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
    """How TAPS gates layers. ``size`` (default "compact", about 1 MiB a task all in) chooses
    the representation and a byte budget; ``size="paper"`` is the paper's penalty selection,
    whose knobs (``lam``, ``penalty``, ``warmup_epochs``) follow the authors' code."""

    lam: float = _doc(
        0.5, "sparsity penalty weight (paper mode); larger -> fewer adapted layers (see docs)"
    )
    tau: float = _doc(0.1, "gate threshold: layer i is adapted iff score_i >= tau")
    score_init: float = _doc(0.15, "initial score; > tau, so every layer starts adapted")
    penalty: str = _doc(
        "uniform", '"uniform": mean |s_i|; "weighted": |s_i| weighted by layer size'
    )
    warmup_epochs: float = _doc(0.0, "epochs (may be fractional) before the penalty switches on")
    task_norms: bool = _doc(
        True, "each task owns its norm layers (BN affine + stats, LN/GN affine)"
    )
    norm_stats: str = _doc(
        "base",
        "how a task's own BatchNorm running statistics start: \"base\" copies the base's and "
        'moves them by its momentum; "reset" starts empty and keeps a cumulative average '
        "(momentum None)",
    )
    budget: float | None = _doc(
        None,
        "largest share of the base's parameters a task may store (deltas, norms, head, scores); "
        "wins over size's bytes. None = size decides (lam in paper mode). With a budget the "
        "gates are chosen once (see budget_select)",
    )
    budget_select: float = _doc(
        0.1, "with a size or budget: share of a task's steps before gates are chosen (>= 8)"
    )
    delta_rank: int | None = _doc(
        None, "None = dense deltas (the paper); N = low-rank B @ A, rank N"
    )
    delta_alpha: float | None = _doc(None, "low-rank deltas scale by alpha / rank; None = rank")
    delta_dtype: str | None = _doc(
        None,
        "how finalised deltas are stored: float32, bfloat16 or int8; None = int8 with a size, "
        "float32 in paper mode",
    )
    delta_kind: str | None = _doc(
        None,
        'a registered delta kind by name (taps_cl.taps.deltas: "dense", "lowrank", your own); '
        'None = "lowrank" if delta_rank is set, else "dense"',
    )
    size: int | str | None = _doc(
        "compact",
        "one knob for what a task stores, patch plus routing statistics: a name "
        f"({', '.join(f'{k} {v // KiB} KiB' for k, v in SIZES.items())}), bytes (an int, or "
        "'800KB', '1.5MiB'), or 'paper'/None for the paper's penalty selection with dense "
        "float32 deltas. A size means low-rank int8 deltas (rank 32 per MiB, 4 to 256) whose "
        "layers are chosen once, early, to fit the bytes (see budget_select); delta_rank, "
        "delta_dtype, delta_kind and budget, when given, win over what the size picks",
    )
    head_init: str = _doc(
        "ridge",
        "how a new task's head starts: \"ridge\" = the closed-form ridge probe on the task's own "
        "features (raw scores, logit scale 1), so training starts where a linear probe ends; "
        '"random" = seeded uniform init',
    )
    head_refit: bool = _doc(
        True,
        "after training, refit the head in closed form (ridge) on the trained task's own "
        "eval-mode features: short runs end with features the head never caught up with",
    )
    layers: list[str] | None = _doc(
        None,
        "which gated layers a task may adapt: fnmatch patterns over layer names (e.g. "
        '["blocks.5.*", "blocks.6.*"]); the others start and stay closed (base weight, no '
        "delta stored). None = every layer. With task_norms off, tasks that adapt only late "
        "layers let a routed batch resume from the routing pass (docs/serving.md)",
    )

    def __post_init__(self) -> None:
        self._check_types()
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
        if self.norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats must be one of {NORM_STATS}, got {self.norm_stats!r}")
        self._check_layers()
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        self._check_compact()

    def _check_layers(self) -> None:
        layers = self.layers
        if layers is None:
            return
        if isinstance(layers, str) or not isinstance(layers, list | tuple):
            raise TypeError(f"layers must be a list of name patterns or None, got {layers!r}")
        if not layers or not all(isinstance(p, str) and p for p in layers):
            raise ValueError(
                f"layers must be a non-empty list of non-empty patterns (None = every layer), "
                f"got {layers!r}"
            )
        self.layers = list(layers)  # (JSON gives lists; a tuple would not round-trip equal)

    def _check_compact(self) -> None:
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"budget must be None or in (0, 1] (a share), got {self.budget}")
        if not 0 <= self.budget_select < 1:
            raise ValueError(f"budget_select must be in [0, 1), got {self.budget_select}")
        r = self.delta_rank
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"delta_rank must be None (dense) or an int >= 1, got {r!r}")
        if self.delta_alpha is not None and not self.delta_alpha > 0:
            raise ValueError(f"delta_alpha must be None or > 0, got {self.delta_alpha}")
        if self.delta_dtype is not None and self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(
                f"delta_dtype must be None or one of {DELTA_DTYPES}, got {self.delta_dtype!r}"
            )
        parse_size(self.size)  # a clear error now, not when the first task is added
        if self.delta_kind is not None:
            if not isinstance(self.delta_kind, str):
                raise TypeError(f"delta_kind must be a str or None, got {self.delta_kind!r}")
            # unknown kind or settings the kind lacks: ValueError (the kind checks its own)
            DELTA_KINDS.get(self.delta_kind).from_config(self)

    # -- what the size knob resolves to (explicit fields win) ------------------------------

    @property
    def size_bytes(self) -> int | None:
        """The byte budget of a task's stored form (patch + routing statistics), or None in
        paper mode."""
        return parse_size(self.size)

    @property
    def rank(self) -> int | None:
        """The low-rank deltas' rank: ``delta_rank``, else the size's, unless ``delta_kind``
        names another kind; None = dense."""
        if self.delta_rank is not None or self.delta_kind not in (None, "lowrank"):
            return self.delta_rank
        nbytes = self.size_bytes
        return None if nbytes is None else size_rank(nbytes)

    @property
    def stored_dtype(self) -> str:
        """How finalised deltas are stored: ``delta_dtype``, else int8 with a size."""
        if self.delta_dtype is not None:
            return self.delta_dtype
        return "float32" if self.size_bytes is None else "int8"

    @property
    def budgeted(self) -> bool:
        """Gates are chosen once, early, to fit a budget (share or bytes), not by the penalty."""
        return self.budget is not None or self.size_bytes is not None


def parse_size(size: int | str | None) -> int | None:
    """Bytes of a :attr:`TAPSConfig.size` (None for paper mode): a name in :data:`SIZES`, an
    int, or a number with a unit (B, KB, MB, GB, KiB, MiB, GiB; case and spaces ignored)."""
    if size is None or size == PAPER:
        return None
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise TypeError(f"size must be a name, a byte count or None, got {size!r}")
    if isinstance(size, int):
        nbytes = size
    elif size.lower() in SIZES:
        nbytes = SIZES[size.lower()]
    else:
        text = size.replace(" ", "").lower()
        number = text.rstrip("kmgib")
        unit = text[len(number) :] or "b"
        try:
            nbytes = int(float(number) * _UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(
                f"size {size!r} is not a size: use {sorted(SIZES)}, {PAPER!r}/None, an int of "
                "bytes or a number with a unit, e.g. '800KB' or '1.5MiB'"
            ) from None
    if nbytes < 1:
        raise ValueError(f"size must be at least 1 byte, got {size!r}")
    return nbytes


def size_rank(nbytes: int) -> int:
    """The low-rank deltas' rank for a size: 32 per MiB, a power of two from 4 to 256 (the
    transfer sweep's rank 32 fills about 1 MiB with every layer adapted, in int8)."""
    return int(min(256, max(4, 2 ** round(math.log2(max(1.0, 32 * nbytes / MiB))))))


@dataclass
class TrainConfig(_JSONConfig):
    """How one task (or one joint run) is trained."""

    epochs: int = _doc(3, "passes over the training data")
    batch_size: int = _doc(32, "minibatch size")
    image_size: int | None = _doc(None, "input side in pixels; None = the base's own (e.g. 224)")
    optimizer: str = _doc("adamw", '"adamw" or "sgd" (momentum 0.9)')
    lr: float | None = _doc(
        None,
        "learning rate of deltas, norms and head; None = 3e-3 for low-rank deltas (the sized "
        "default), 1e-3 for dense ones (the paper's; also full fine-tuning and the base)",
    )
    score_lr: float | None = _doc(
        None, "None = auto: scores can cross (init - tau) ~4x in training"
    )
    weight_decay: float = _doc(0.0, "decoupled weight decay of deltas and head (never of scores)")
    schedule: str = _doc("cosine", "learning-rate schedule over all steps")
    seed: int = _doc(0, "seeds torch, the data order and head initialisation")
    device: str = _doc("auto", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    amp: bool = _doc(True, "mixed precision (bf16 autocast) on CUDA; ignored on CPU unless amp_cpu")
    amp_cpu: bool = _doc(False, "also use bf16 autocast on CPU (slower on most CPUs; for testing)")
    amp_dtype: str = _doc("bfloat16", 'autocast dtype: "bfloat16" or "float16" (with loss scaling)')
    num_workers: int = _doc(0, "DataLoader worker processes")
    max_grad_norm: float | None = _doc(5.0, "gradient clipping; None disables")

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be None or >= 8, got {self.image_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be None (auto) or > 0, got {self.lr}")
        if self.score_lr is not None and self.score_lr <= 0:
            raise ValueError(f"score_lr must be None (auto) or > 0, got {self.score_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be {DEVICES_HINT}, got {self.device!r}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {AMP_DTYPES}, got {self.amp_dtype!r}")

    def lr_for(self, rank: int | None) -> float:
        """The learning rate: ``lr``, else the rule for the deltas' ``rank`` (None = dense).
        Low-rank factors start at zero and move the weight by a product of two small factors,
        so every low-rank run of the defaults sweep preferred the larger rate."""
        if self.lr is not None:
            return self.lr
        return DENSE_LR if rank is None else LOWRANK_LR


@dataclass
class JointConfig(_JSONConfig):
    """How a joint run samples its tasks (training itself is set by :class:`TrainConfig`)."""

    epoch_length: int | str | None = _doc(
        None,
        'None: "own" (each task makes its own passes, exactly as alone), "max" with train_base; '
        '"max"/"min": every task steps each step, epochs of the longest/shortest task; or N steps',
    )
    ratios: dict[str, float] | None = _doc(
        None, "task -> multiple of batch_size per step (default 1)"
    )
    base_lr: float | None = _doc(None, "lr of the shared base weights (train_base); None = lr")

    def __post_init__(self) -> None:
        self._check_types()
        e = self.epoch_length
        ok = e is None or e in EPOCH_LENGTHS or (isinstance(e, int) and e >= 1)
        if isinstance(e, bool) or not ok:
            raise ValueError(f"epoch_length must be None, {EPOCH_LENGTHS} or an int >= 1: {e!r}")
        if self.ratios is not None:
            if not isinstance(self.ratios, Mapping):
                raise TypeError(f"ratios must be a dict task -> float, got {type(self.ratios)}")
            bad = {
                k: v
                for k, v in self.ratios.items()
                if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf
            }
            if bad:
                raise ValueError(f"ratios must be finite numbers > 0, got {bad}")
            self.ratios = {str(k): float(v) for k, v in self.ratios.items()}
        if self.base_lr is not None and not self.base_lr > 0:
            raise ValueError(f"base_lr must be None or > 0, got {self.base_lr}")


@dataclass(frozen=True)
class Environment:
    """Every environment variable taps_cl reads, read in this one place (:func:`environment`)."""

    base: str  # TAPS_CL_BASE: the base an Engine uses when none is named (else DEFAULT_BASE)
    store: str | None  # TAPS_CL_STORE: store URL or SQLite path (None: the default file)
    tracking: str | None  # MLFLOW_TRACKING_URI: MLflow tracking for the default engine and CLI
    data_home: Path  # XDG_DATA_HOME (default ~/.local/share): holds taps_cl/tasks.db
    world_size: int  # WORLD_SIZE set by torchrun (1 outside it)
    local_rank: int  # LOCAL_RANK set by torchrun: this rank's GPU


def environment() -> Environment:
    """The environment as it is now (read on each call, so tests and users may change it)."""
    env = os.environ
    return Environment(
        base=env.get("TAPS_CL_BASE") or DEFAULT_BASE,
        store=env.get("TAPS_CL_STORE") or None,
        tracking=env.get("MLFLOW_TRACKING_URI") or None,
        data_home=Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"),
        world_size=int(env.get("WORLD_SIZE") or 1),
        local_rank=int(env.get("LOCAL_RANK") or 0),
    )
