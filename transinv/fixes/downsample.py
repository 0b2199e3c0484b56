"""The two downsamplers the fixes insert: BlurPool's blur (Zhang 2019) and APS (Chaman & Dokmanic 2021).

Both take a full-resolution (stride-1) map and return it at half resolution, ``ceil(n / 2)`` per
axis. Their filters are non-persistent buffers: no parameter, no state-dict key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .report import where

# The polyphase components (row offset, column offset), in the order of the authors' code, so
# that ties (equal norms) go to the same component as theirs (argmax takes the first).
PHASES = ((0, 0), (1, 0), (0, 1), (1, 1))


def binomial_kernel(size: int) -> torch.Tensor:
    """The ``size x size`` binomial filter: outer product of a row of Pascal's triangle, sum 1."""
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float32)
    kernel = torch.outer(row, row)
    return kernel / kernel.sum()


class Blur(nn.Module):
    """BlurPool's downsampler: a fixed depthwise binomial low-pass filter, then stride 2.

    Pads ``(K-1)//2`` before and ``K//2`` after each axis (Zhang's ``BlurPool``, ``pad_off=0``):
    by reflection, or circularly in a circular network so circular equivariance survives. Maps
    too small to reflect are padded by replication (where Zhang's layer raises an error).
    """

    def __init__(self, kernel: int, circular: bool) -> None:
        super().__init__()
        self.circular = circular
        self.register_buffer("kernel", binomial_kernel(kernel), persistent=False)

    def filter(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """The padded depthwise blur at ``stride``; stride 2 gives ``ceil(n / 2)`` per axis."""
        size = self.kernel.shape[-1]
        before, after = (size - 1) // 2, size // 2
        if min(x.shape[-2:]) <= after:
            mode = "replicate"
        else:
            mode = "circular" if self.circular else "reflect"
        x = F.pad(x, (before, after, before, after), mode=mode)
        channels = x.shape[1]
        weight = self.kernel.to(x)[None, None].expand(channels, 1, size, size)
        return F.conv2d(x, weight, stride=stride, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.filter(x, 2)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel.shape[-1]}, circular={self.circular}"


class PhaseGroup:
    """The per-image component chosen by a group's leader, read once by each of its followers.

    The index is dropped once every follower has read it, so a follower that runs before its
    leader in a forward pass fails loudly instead of reusing the previous batch's choice.
    """

    def __init__(self, followers: int) -> None:
        self.followers = followers
        self.index: torch.Tensor | None = None
        self.unread = 0

    def put(self, index: torch.Tensor) -> None:
        self.index, self.unread = (index, self.followers) if self.followers else (None, 0)

    def take(self) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError("APS: a follower ran before its group's leader chose the polyphase component")
        index = self.index
        self.unread -= 1
        if self.unread == 0:
            self.index = None
        return index


class PolyphaseDown(nn.Module):
    """APS downsampler: keep, per image, the polyphase component of largest L2 norm.

    As in the authors' ``ApsPool``: the map is low-pass filtered first when ``lowpass`` is given
    (``blurpool+aps``), padded circularly by one row/column at the bottom/right when its size is
    odd, split into the four components of ``PHASES``, and the component whose L2 norm over all
    channels is largest is kept. Norms are summed in float64 (the authors' in float32; MPS has
    only float32): a shifted map holds the same values in another order, and in float32 that
    order can flip near-ties. A ``leader`` chooses and hands its choice to ``group``; a
    ``follower`` (another branch joined to the leader's) reuses it; with no group it chooses alone.
    """

    def __init__(
        self, lowpass: Blur | None = None, group: PhaseGroup | None = None, role: str | None = None
    ) -> None:
        super().__init__()
        self.lowpass, self.group, self.role = lowpass, group, role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowpass is not None:
            x = self.lowpass.filter(x, 1)
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2), mode="circular")
        phases = torch.stack([x[..., a::2, b::2] for a, b in PHASES], dim=1)  # N, 4, C, h/2, w/2
        if self.role == "follower":
            index = self.group.take()
        else:
            wide = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
            index = torch.linalg.vector_norm(phases.flatten(2), dim=2, dtype=wide).argmax(dim=1)
            if self.role == "leader":
                self.group.put(index)
        return phases[torch.arange(len(phases), device=phases.device), index]

    def extra_repr(self) -> str:
        return f"role={self.role}"


def transformed_layer(model: nn.Module) -> str | None:
    """The first downsampler a fix inserted into ``model`` (named as messages name layers), or None."""
    return next((where(p, m) for p, m in model.named_modules() if isinstance(m, (Blur, PolyphaseDown))), None)
