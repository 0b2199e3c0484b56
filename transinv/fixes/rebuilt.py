"""Strided layers rebuilt to run at a smaller stride, keeping their weights and state-dict keys.

A ``RestridedConv2d`` is a ``Conv2d`` holding the very same ``weight`` and ``bias``; a
``ShiftPool2d`` pads explicitly (in a chosen mode) before pooling. Either may carry a downsampler
(``pre`` or ``post``) whose filters are non-persistent buffers, so original checkpoints still load.

Padding. A layer's *mode* is its own padding mode when it pads, else the mode shared by all the
network's padded convs (a 1x1 shortcut or an unpadded pool in a circular network is circular).
In circular mode a layer run at stride 1 gives the full periodic map: its input is padded
circularly by ``(p, k-1-p)`` so the map has the input's size, which keeps a circular network
exactly equivariant.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

Pad = tuple[int, int, int, int]  # F.pad order: left, right, top, bottom


def padded(conv: nn.Conv2d) -> bool:
    """True when the conv pads its input."""
    return conv.padding == "same" or (not isinstance(conv.padding, str) and any(conv.padding))


def network_mode(model: nn.Module) -> str:
    """The padding mode all padded convs share ('zeros' when they disagree or none pads)."""
    modes = {m.padding_mode for m in model.modules() if isinstance(m, nn.Conv2d) and padded(m)}
    return modes.pop() if len(modes) == 1 else "zeros"


def conv_mode(conv: nn.Conv2d, network: str) -> str:
    """A conv's own padding mode when it pads or names one, else the network's."""
    return conv.padding_mode if padded(conv) or conv.padding_mode != "zeros" else network


def periodic_pad(kernel: tuple[int, int], padding: tuple[int, int]) -> Pad:
    """Circular padding that makes a stride-1 map as large as its input."""
    (kh, kw), (ph, pw) = kernel, padding
    return (pw, max(kw - 1 - pw, 0), ph, max(kh - 1 - ph, 0))


def symmetric_pad(padding: tuple[int, int]) -> Pad:
    (ph, pw) = padding
    return (pw, pw, ph, ph)


def dilated_kernel(layer: nn.Module) -> tuple[int, int]:
    """The span of a conv's or pool's window, dilation included."""
    dilation = _pair(getattr(layer, "dilation", 1))
    return tuple(d * (k - 1) + 1 for d, k in zip(dilation, _pair(layer.kernel_size)))


class RestridedConv2d(nn.Conv2d):
    """A strided ``Conv2d`` run at ``stride`` (same weight and bias), with an optional downsampler
    on its input (``pre``, Zhang's place for a 1x1 shortcut) or on its output (``post``)."""

    def __init__(
        self, conv: nn.Conv2d, stride: int, circular: bool, pre: nn.Module | None = None, post: nn.Module | None = None
    ) -> None:
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=stride, padding=padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device="meta",
        )
        self.weight, self.bias = conv.weight, conv.bias
        self.circular = circular
        self.pre, self.post = pre, post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        if self.circular:
            pad = periodic_pad(dilated_kernel(self), self.padding)
            x = F.pad(x, pad, mode="circular") if any(pad) else x
            out = F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        else:
            out = self._conv_forward(x, self.weight, self.bias)
        return out if self.post is None else self.post(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", circular={self.circular}"


class ShiftPool2d(nn.Module):
    """A max/avg pool that pads explicitly by ``pad`` in ``pad_mode`` (then pools unpadded), or
    not at all (``pad`` None: the pool's own padding), followed by an optional ``post`` downsampler."""

    def __init__(self, pool: nn.Module, pad: Pad | None, pad_mode: str | None, post: nn.Module | None = None) -> None:
        super().__init__()
        self.pool, self.pad, self.pad_mode, self.post = pool, pad, pad_mode, post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None and any(self.pad):
            x = F.pad(x, self.pad, mode=self.pad_mode)
        out = self.pool(x)
        return out if self.post is None else self.post(out)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, pad_mode={self.pad_mode}"


def pool_parts(module: nn.Module) -> tuple[nn.Module, tuple[int, int], str | None]:
    """(the plain pool, its padding, the explicit padding mode or None) of a pool or ShiftPool2d."""
    if isinstance(module, ShiftPool2d):
        pw, _, ph, _ = module.pad if module.pad is not None else (0, 0, 0, 0)
        return module.pool, (ph, pw), module.pad_mode
    return module, _pair(module.padding), None


def stride1_pool(
    module: nn.Module, network: str, post: nn.Module, kernel: int | None = None
) -> ShiftPool2d:
    """A strided max/avg pool (or ShiftPool2d) rebuilt at stride 1 and followed by ``post``.

    ``kernel`` replaces the window (Zhang's ResNet turns its 3x3 max-pool into an unpadded 2x2
    one). In a circular network the pool pads periodically; otherwise it keeps its padding.
    """
    pool, padding, mode = pool_parts(module)
    inner = copy.deepcopy(pool)
    inner.stride, inner.padding, inner.ceil_mode = 1, 0, False
    if kernel is not None:
        inner.kernel_size, padding = kernel, (0, 0)
    if (mode or network) == "circular":
        return ShiftPool2d(inner, periodic_pad(dilated_kernel(inner), padding), "circular", post)
    if mode is not None:
        return ShiftPool2d(inner, symmetric_pad(padding), mode, post)
    inner.padding = padding
    return ShiftPool2d(inner, None, None, post)
