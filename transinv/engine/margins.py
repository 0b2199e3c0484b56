"""Each layer's padding margin: how far from the map's border padding reaches, measured.

The model sees random images twice: alone, and in the middle of a larger random canvas. A
feature position whose receptive field stays inside the image takes the same value both times;
one whose field reaches the padding (zeros, or the wrapped or reflected image) does not. The
margin ``m_l`` (feature pixels, per axis) is the widest band from the border holding such a
difference along the map's centre lines, so ``equivariance_error_interior`` leaves out exactly where padding acts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import FeatureTap, LayerInfo, to_nchw

_PROBE_SEED = 20240613
_TOLERANCE = 1e-4  # a difference counts above this share of the map's largest magnitude


def _band(differs: torch.Tensor) -> int:
    """The widest band from either end of an axis that holds a differing position (0: none)."""
    where = torch.nonzero(differs).flatten().tolist()
    n = differs.numel()
    return max((min(i, n - 1 - i) + 1 for i in where), default=0)


@torch.no_grad()
def padding_margins(model: nn.Module, layers: list[LayerInfo], size: int, device: torch.device | str = "cpu"
                    ) -> dict[str, tuple[int, int]]:
    """``{layer: (my, mx)}``: the padding margin of each spatial layer at input ``size``.

    The larger canvas adds ``pad`` pixels on each side, ``pad`` a multiple of every stride and at
    least ``size``, so a margin as wide as half the map is still seen. Layers whose map does not
    follow the input (fixed), and models that reject the larger input, get no margin.
    """
    spatial = [layer for layer in layers if not layer.fixed]
    if not spatial:
        return {}
    step = math.lcm(*(s for layer in spatial for s in layer.stride))
    pad = step * math.ceil(size / step)
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    canvas = torch.randn(1, 3, size + 2 * pad, size + 2 * pad, generator=generator)
    image = canvas[..., pad : pad + size, pad : pad + size]
    maps: list[dict[str, torch.Tensor]] = [{}, {}]
    info = {layer.name: layer for layer in spatial}
    for seen, views in zip(maps, (image, canvas)):
        def keep(name: str, feature: torch.Tensor, seen: dict[str, torch.Tensor] = seen) -> None:
            if name in info:
                seen[name] = to_nchw(feature, info[name]).float().cpu()

        with FeatureTap(model, list(info), keep) as tap:
            tap.reset()
            try:
                model(views.to(device))
            except Exception:  # noqa: BLE001 - a fixed-size model: the interior is then not measured
                return {}
    margins = {}
    for name, small in maps[0].items():
        large = maps[1].get(name)
        layer = info[name]
        oy, ox = pad // layer.stride[0], pad // layer.stride[1]
        h, w = small.shape[-2:]
        if large is None or large.shape[-2] < oy + h or large.shape[-1] < ox + w:
            continue
        crop = large[..., oy : oy + h, ox : ox + w]
        scale = max(small.abs().max().item(), crop.abs().max().item(), 1e-30)
        differs = ((crop - small).abs() > _TOLERANCE * scale).any(dim=1)[0]
        cy, cx = h // 2, w // 2  # along the centre lines (three wide), away from the other axis' border
        margins[name] = (_band(differs[:, max(cx - 1, 0) : cx + 2].any(dim=1)),
                         _band(differs[max(cy - 1, 0) : cy + 2].any(dim=0)))
    return margins
