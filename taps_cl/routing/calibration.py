"""How confident a task's own patch is on its own data: the energy calibration stored with a
task's routing statistics (``route.calib``), so patches can be compared on one scale
(``"energy"`` and ``"combined"`` routing)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# count, temperature, mean and std of the energy -T logsumexp(logits / T) on the task's own data
_CALIB_FIELDS = 4


@dataclass(frozen=True)
class Calibration:
    """How confident a task's own patch is on its own training data, to compare patches.

    A patch's energy ``E(x) = -T logsumexp(logits / T)`` is low on inputs like its training data;
    ``score(logits) = (energy_mean - E) / energy_std`` puts every patch on one scale.
    """

    count: int  # training samples the statistics were taken on
    temperature: float  # T of the energy
    energy_mean: float  # mean energy on the task's training data
    energy_std: float  # its standard deviation (> 0)

    def __post_init__(self) -> None:
        values = (self.temperature, self.energy_mean, self.energy_std)
        if self.count < 1 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"calibration needs count >= 1 and finite values, got {self}")
        if self.temperature <= 0 or self.energy_std <= 0:
            raise ValueError(f"calibration temperature and energy_std must be > 0, got {self}")

    def energy(self, logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return -t * torch.logsumexp(logits.to(torch.float64) / t, dim=-1)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """Standardised negative energy: higher means more like the task's own data."""
        return (self.energy_mean - self.energy(logits)) / self.energy_std

    def to_tensor(self) -> torch.Tensor:
        fields = [self.count, self.temperature, self.energy_mean, self.energy_std]
        return torch.tensor(fields, dtype=torch.float64)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Calibration:
        if tensor.shape != (_CALIB_FIELDS,) or not tensor.is_floating_point():
            raise ValueError(f"route.calib must be a float [{_CALIB_FIELDS}], got {tensor.shape}")
        count, temperature, mean, std = (float(v) for v in tensor.to(torch.float64))
        if not math.isfinite(count) or count != int(count):
            raise ValueError(f"route.calib count must be an integer, got {count}")
        return cls(int(count), temperature, mean, std)


class CalibrationAccumulator:
    """Streams a patch's logits on its own training data into a :class:`Calibration`."""

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, logits: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError("logits must be a [n, classes] tensor")
        if not torch.isfinite(logits).all():
            raise ValueError("logits contain NaN or inf")
        t = self.temperature
        energy = -t * torch.logsumexp(logits.detach().to("cpu", torch.float64) / t, dim=-1)
        nb = energy.numel()
        if nb == 0:
            return
        mb = float(energy.mean())
        m2b = float(((energy - mb) ** 2).sum())
        n = self.count + nb
        delta = mb - self.mean
        self.m2 += m2b + delta * delta * self.count * nb / n
        self.mean += delta * nb / n
        self.count = n

    def result(self) -> Calibration:
        if self.count < 2:
            raise ValueError("calibration needs the logits of at least 2 samples")
        std = math.sqrt(self.m2 / (self.count - 1))
        return Calibration(self.count, self.temperature, self.mean, max(std, 1e-12))
