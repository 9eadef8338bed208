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


class StoreError(TAPSError):
    """A task store could not be opened, read or written (the message says how to fix it)."""


class StoreUnavailableError(StoreError):
    """The store does not exist, is not a database, cannot be reached, or its location is
    unusable (a directory, a missing parent directory, an unknown URL scheme, no permission)."""


class StoreReadOnlyError(StoreError):
    """A write was asked of a store opened read-only."""


class StoreIntegrityError(StoreError):
    """Stored bytes or rows do not match their sha256 digests (tampered, truncated or corrupted
    store)."""


class InvalidPatchError(TAPSError, ValueError):
    """A patch (e.g. an imported file) does not fit the base it names: unknown tensors, wrong
    shapes or dtypes, non-finite values, or tensors of another base under this base's name."""


class UnsafeTargetError(TAPSError, ValueError):
    """An export target that must not be overwritten: a device, FIFO, socket, directory, or a
    symlink (unless following symlinks was asked for)."""


class UnknownBaseError(TAPSError, ValueError):
    """A base fingerprint the store has never seen (or holds no weights for) was asked for."""


class StoreVersionError(StoreError):
    """The store was written by a newer schema than this version of taps_cl understands."""


class TrainingDivergedError(TAPSError, FloatingPointError):
    """The loss became NaN or infinite; the model's earlier tasks are left untouched."""
