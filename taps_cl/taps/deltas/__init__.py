"""Kinds of per-task weight delta, one registered class each (see :mod:`.base`).

Adding a kind is one file holding a :class:`DeltaKind` subclass decorated with
:func:`register_delta_kind`, plus its import line below (a user's own kind registers wherever
it is imported; ``TAPSConfig(delta_kind=<name>)`` then selects it).
"""

from taps_cl.taps.deltas.dense import Dense  # importing a kind's module registers it
from taps_cl.taps.deltas.kind import (
    DeltaKind,
    decode_delta,
    decode_parts,
    delta_keys,
    delta_op,
    encode_delta,
    kind_for,
    kind_of,
    misfit,
    register_delta_kind,
    stored_keys,
    stored_nbytes,
    stored_numbers,
)
from taps_cl.taps.deltas.lowrank import LowRank

__all__ = [
    "Dense",
    "DeltaKind",
    "LowRank",
    "decode_delta",
    "decode_parts",
    "delta_keys",
    "delta_op",
    "encode_delta",
    "kind_for",
    "kind_of",
    "misfit",
    "register_delta_kind",
    "stored_keys",
    "stored_nbytes",
    "stored_numbers",
]
