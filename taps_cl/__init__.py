"""taps_cl: Task Adaptive Parameter Sharing for continual learning on one frozen base."""

from taps_cl.config import TAPSConfig, TrainConfig
from taps_cl.errors import (
    BaseMismatchError,
    StoreIntegrityError,
    TAPSError,
    UnknownTaskError,
)
from taps_cl.taps.patch import TaskPatch

__version__ = "0.1.0"

__all__ = [
    "BaseMismatchError",
    "StoreIntegrityError",
    "TAPSConfig",
    "TAPSError",
    "TaskPatch",
    "TrainConfig",
    "UnknownTaskError",
    "__version__",
]
