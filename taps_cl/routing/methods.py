"""Routing methods are registered, not branched on: a method is one function and one
``@register_method`` (a dict plus a decorator that refuses duplicates, as timm's models).

A method receives the router, the inputs' base features, the ``patched_logits`` callback (or
``None``) and an optional ``top_k``, and returns a
:class:`~taps_cl.routing.task_router.RouteResult`. ``patched=True`` marks a method that runs
task patches while choosing the task (the router then refuses to run it without
``patched_logits``). The built-in ``lda``, ``ncm``, ``energy`` and ``combined`` register in
:mod:`taps_cl.routing.task_router`; :data:`METHODS` and :data:`PATCHED_METHODS` are live views
of the registered names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from taps_cl.registry import Registry

__all__ = ["METHODS", "PATCHED_METHODS", "ROUTING_METHODS", "RoutingMethod", "register_method"]


@dataclass(frozen=True)
class RoutingMethod:
    """A registered method: ``route(router, features, patched_logits, top_k) -> RouteResult``."""

    name: str
    route: Callable[..., Any]
    patched: bool = False  # runs task patches while choosing the task (needs patched_logits)


ROUTING_METHODS: Registry[RoutingMethod] = Registry("routing method")


def register_method(name: str, *, patched: bool = False) -> Callable:
    """Decorator: register ``fn(router, features, patched_logits, top_k)`` as method ``name``
    (``ValueError`` if the name is taken)."""

    def add(fn: Callable) -> Callable:
        ROUTING_METHODS.add(name, RoutingMethod(name, fn, bool(patched)))
        return fn

    return add


class _Names(Sequence):
    """The registered method names (optionally only the patched ones), read at each use."""

    def __init__(self, patched_only: bool) -> None:
        self._patched_only = patched_only

    def _names(self) -> tuple[str, ...]:
        return tuple(m.name for m in ROUTING_METHODS if m.patched or not self._patched_only)

    def __getitem__(self, index: Any) -> Any:
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, tuple | list | _Names):
            return NotImplemented
        return tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


METHODS: Sequence[str] = _Names(patched_only=False)  # every registered method
PATCHED_METHODS: Sequence[str] = _Names(patched_only=True)  # those that run task patches
