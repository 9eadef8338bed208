"""Named registries: a dict plus a decorator that refuses duplicates (timm's ``register_model``).

A registry lives here, below every layer, when code of a lower layer must look a name up:
:class:`~taps_cl.config.TAPSConfig` validates ``delta_kind`` against :data:`DELTA_KINDS`, whose
entries the method registers (:mod:`taps_cl.taps.deltas`, imported with ``taps_cl``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry. Registering a name twice is an error, never a silent replacement."""

    def __init__(self, what: str) -> None:
        self.what = what  # what an entry is, for messages ("delta kind")
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {self.what} name must be an identifier, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@registry.register("name")``."""
        return lambda entry: self.add(name, entry)

    def remove(self, name: str) -> T:
        """Unregister ``name`` (tests that register a toy entry clean up with this)."""
        self.get(name)  # the helpful error for an unknown name
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} {name!r}; registered: {self.names()}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))


# Kinds of weight delta (dense, low-rank, ...): name -> DeltaKind subclass (taps_cl.taps.deltas).
DELTA_KINDS: Registry[type] = Registry("delta kind")
