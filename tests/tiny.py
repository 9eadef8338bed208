"""Tiny models shared by the test modules (import as ``from tests.tiny import ...``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv + BatchNorm + Linear head: the smallest model with every kind of per-task state."""

    def __init__(self, in_ch: int = 3, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width * 2, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width * 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def tiny_cnn(seed: int = 0, **kw: int) -> TinyCNN:
    """A TinyCNN with seeded weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TinyCNN(**kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_images(n: int = 16, classes: int = 3, size: int = 16, seed: int = 0):
    """Random images in [0, 1] with a class signal in the mean brightness, and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (
        torch.rand(n, 3, size, size, generator=g) * 0.5
        + (y.float() / classes).view(-1, 1, 1, 1) * 0.5
    )
    return x, y
