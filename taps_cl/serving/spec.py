"""What a routed model serves, as JSON: the ``model_config`` of
:mod:`taps_cl.serving.pyfunc` and the argument of :func:`~taps_cl.serving.open.open_served`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from taps_cl.serving.requests import RequestLimits
from taps_cl.serving.route import DEFAULT_METHOD

__all__ = ["ServedStore"]


@dataclass(frozen=True)
class ServedStore:
    """What a routed model serves (its ``model_config``; JSON only)."""

    base: str  # base spec for taps_cl.bases.load_base, e.g. "efficientnet_lite0"
    fingerprint: str  # the base's fingerprint; loading refuses any other weights
    store: str | None = None  # live mode: the store URL; None: the snapshot artifact
    arch: str | None = None  # timm architecture of a checkpoint-file base
    head: str | None = None  # the base's classifier attribute (Engine's ``head``)
    device: str = "cpu"
    max_loaded: int = 8  # task versions kept merged in memory
    version_ttl: float = 2.0  # live mode: seconds before a newly committed version is served
    method: str = DEFAULT_METHOD  # routing method (a request may pass params {"method": ...})
    limits: dict[str, int] = field(default_factory=dict)  # RequestLimits overrides
    versions: dict[str, int] = field(default_factory=dict)  # snapshot: task -> source version

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise ValueError(f"base must be a base spec string, got {self.base!r}")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError("fingerprint must be the base's fingerprint (a hex string)")
        RequestLimits.from_dict(self.limits)  # fails now, not at the first request

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServedStore:
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown model_config keys {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
