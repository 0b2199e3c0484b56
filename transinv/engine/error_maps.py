"""Spatial error maps: the mean absolute equivariance error per feature position, per layer and shift.

Sums over images are kept per (layer, shift) while a run goes, added across processes like the
metric states, and written as one ``.npz`` array per (model, variant, layer, shift).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .layers import LayerInfo
from ..reports.results import atomic_target
from .shifts import Shift


def map_name(model: str, variant: str, layer: str, shift: Shift) -> str:
    """The array's name in the file: ``model/variant/layer/dx,dy``."""
    return f"{model}/{variant}/{layer}/{shift[0]:g},{shift[1]:g}"


class ErrorMaps:
    """Per (layer, shift): the sum over images of ``mean_c |f(T_d x) - T_k f(x)|`` at each position
    (NaN where the shift leaves no compared content), and the number of images added."""

    def __init__(self, compared: Iterable[tuple[LayerInfo, Shift]], device: torch.device) -> None:
        """``compared``: the (layer, shift) pairs whose maps are compared (only those get a map)."""
        self.sums = {(layer.name, shift): torch.zeros(layer.height, layer.width, dtype=torch.float64, device=device)
                     for layer, shift in compared if not layer.fixed}
        self.images = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, layer: str, shift: Shift, error_sum: torch.Tensor) -> None:
        """Add one batch's summed error map (ignored when its size is not the probed one)."""
        total = self.sums.get((layer, shift))
        if total is not None and total.shape == error_sum.shape:
            total += error_sum

    def tensors(self) -> list[torch.Tensor]:
        """Every additive tensor, in a fixed order (for adding across processes)."""
        return [*self.sums.values(), self.images]

    def means(self) -> dict[tuple[str, Shift], np.ndarray]:
        """The mean map of each (layer, shift), float32."""
        count = max(self.images.item(), 1.0)
        return {key: (total / count).float().cpu().numpy() for key, total in self.sums.items()}


def save_error_maps(path: str | Path, maps: list[tuple[str, str, ErrorMaps]]) -> None:
    """Write every (model label, variant, maps) to one ``.npz`` file, atomically."""
    arrays = {map_name(model, variant, layer, shift): mean
              for model, variant, found in maps for (layer, shift), mean in found.means().items()}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_target(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
