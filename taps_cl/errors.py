"""Every error taps_cl raises on purpose derives from :class:`TAPSError`.

Errors about bad user input also derive from ``ValueError`` so that generic ``except ValueError``
handlers (and users who never heard of taps_cl's classes) still catch them.
"""

from __future__ import annotations


class TAPSError(Exception):
    """Base class of all taps_cl errors."""


class UnknownTaskError(TAPSError, ValueError):
    """A task name was used that the model or store does not hold."""


class DuplicateTaskError(TAPSError, ValueError):
    """A task name was added twice to one model."""


class BaseMismatchError(TAPSError, ValueError):
    """A patch was trained on a different base than the one it is being applied to."""


class StoreIntegrityError(TAPSError):
    """Stored bytes do not match their sha256 (tampered, truncated or corrupted store)."""


class UnknownBaseError(TAPSError, ValueError):
    """A base fingerprint the store has never seen (or holds no weights for) was asked for."""


class StoreVersionError(TAPSError):
    """The store was written by a newer schema than this version of taps_cl understands."""


class TrainingDivergedError(TAPSError, FloatingPointError):
    """The loss became NaN or infinite; the model's earlier tasks are left untouched."""
