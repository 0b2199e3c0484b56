"""Re-estimating batch-norm statistics after a fix, on the images being measured.

A fix changes the maps every later batch norm sees (a blur lowers their variance), so the running
statistics learned by the original network no longer match. Re-estimating them is the cheapest
remedy short of the fine-tuning the papers do; it changes no weight.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def recalibrate_batchnorm(model: nn.Module, views: Iterable[torch.Tensor]) -> int:
    """Reset every batch norm's running mean and variance and re-estimate them as the plain
    average over ``views`` (batches of preprocessed images), in train mode without gradients;
    every module's train/eval mode is restored afterwards. Returns the number of batch norms."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over all batches
        model.train()
        with torch.no_grad():
            for batch in views:
                model(batch)
    finally:
        for module, training in modes.items():
            module.training = training
        for norm, momentum in momenta.items():
            norm.momentum = momentum
    return len(norms)
