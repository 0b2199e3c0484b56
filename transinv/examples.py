"""Small constructed networks whose translation behaviour is known exactly.

They serve the known-answer tests and let users check the tool themselves:
``transinv measure example:circular_gap --weights none --mode circular``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1, padding_mode: str = "zeros", padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, padding_mode=padding_mode)


def circular_gap(classes: int = 10) -> nn.Module:
    """Stride-1 circular convolutions, global average pooling, linear head: exactly equivariant
    at every layer and exactly invariant at the output under circular shifts."""
    return nn.Sequential(
        _conv(3, 16, padding_mode="circular"),
        nn.ReLU(),
        _conv(16, 32, padding_mode="circular"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def strided_circular(classes: int = 10) -> nn.Module:
    """A stride-1 circular convolution, then a stride-2 one: after it, even shifts are aligned and
    exactly equivariant under circular shifts; odd shifts are not aligned."""
    return nn.Sequential(
        _conv(3, 16, padding_mode="circular"),
        nn.ReLU(),
        _conv(16, 32, stride=2, padding_mode="circular"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def valid_conv(classes: int = 10) -> nn.Module:
    """Unpadded ('valid') stride-1 convolutions: exactly equivariant on the overlap in crop mode."""
    return nn.Sequential(
        _conv(3, 16, padding=0),
        nn.ReLU(),
        _conv(16, 16, padding=0),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


class Constant(nn.Module):
    """Ignores its input: the output distribution never changes (``prob_change = 0``)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def constant(classes: int = 10) -> nn.Module:
    """A model whose output does not depend on its input."""
    return Constant(classes)


EXAMPLES: dict[str, Callable[[], nn.Module]] = {
    "circular_gap": circular_gap,
    "strided_circular": strided_circular,
    "valid_conv": valid_conv,
    "constant": constant,
}
