"""The registry of base sources and :func:`load_base`, which resolves a spec through it.

Each way of naming a base by a string (a packaged model, a timm name, a checkpoint file, ...) is
one :class:`BaseSource`: whether it recognises a spec, and how to load it. Adding a source is one
:func:`register_source` registration; :func:`load_base` asks the sources in registration order
and knows none of them by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from taps_cl.bases.identity import Base
from taps_cl.bases.preprocessing import Preprocessing

Loader = Callable[..., Base]
L = TypeVar("L", bound=Loader)


@dataclass(frozen=True)
class BaseSource:
    """One way to name a base: the specs it recognises and how it loads them."""

    name: str  # registry key
    matches: Callable[[str], bool]  # does this source recognise the spec?
    load: Loader  # load(spec, **timm_kwargs) -> Base; also arch= when takes_arch
    hints: tuple[str, ...]  # how its specs look, listed when a spec is unknown
    takes_arch: bool = False  # arch= applies (weights that need their architecture named)


BASE_SOURCES: dict[str, BaseSource] = {}


def register_source(
    name: str, *, matches: Callable[[str], bool], hints: Iterable[str], takes_arch: bool = False
) -> Callable[[L], L]:
    """Register the decorated loader as base source ``name`` (a name registered twice is an
    error, as in timm's ``register_model``: a second source would silently shadow the first)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a base source needs a non-empty name, got {name!r}")
    if not callable(matches):
        raise TypeError(f"matches must be a callable spec -> bool, got {type(matches).__name__}")

    def register(load: L) -> L:
        if name in BASE_SOURCES:
            raise ValueError(f"base source {name!r} is already registered")
        BASE_SOURCES[name] = BaseSource(name, matches, load, tuple(hints), takes_arch)
        return load

    return register


def find_source(spec: str) -> BaseSource | None:
    """The first registered source that recognises ``spec`` (None if none does)."""
    return next((s for s in BASE_SOURCES.values() if s.matches(spec)), None)


def load_base(
    spec: str | nn.Module | Base,
    *,
    arch: str | None = None,
    preprocessing: Preprocessing | None = None,
    **timm_kwargs: object,
) -> Base:
    """Resolve a base spec (see :mod:`taps_cl.bases`) to a :class:`Base` in eval mode."""
    if isinstance(spec, Base):
        return spec
    if isinstance(spec, nn.Module):
        if preprocessing is None:
            timm_cfg = isinstance(getattr(spec, "pretrained_cfg", None), dict)
            preprocessing = Preprocessing.from_timm(spec) if timm_cfg else Preprocessing()
        return Base(spec.eval(), type(spec).__name__, "module", preprocessing)
    if not isinstance(spec, str):
        raise TypeError(f"base must be a name, a path or an nn.Module, got {type(spec).__name__}")
    source = find_source(spec)
    if arch is not None and not (source is not None and source.takes_arch):
        raise ValueError(f"arch={arch!r} only applies to a checkpoint file base, not {spec!r}")
    if source is None:
        known = [hint for s in BASE_SOURCES.values() for hint in s.hints]
        raise ValueError(f"unknown base {spec!r}; use one of {known} or pass an nn.Module")
    options = {"arch": arch} if source.takes_arch else {}
    base = source.load(spec, **options, **timm_kwargs)
    if preprocessing is not None:
        base.preprocessing = preprocessing
    return base
