"""``set_padding``: one padding mode for every convolution and padded pool of a network."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.modules.utils import _pair

from .downsample import transformed_layer
from .rebuilt import ShiftPool2d, pool_parts, symmetric_pad
from .report import FixError, FixReport

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")


def pad_in_place(model: nn.Module, mode: str) -> tuple[nn.Module, FixReport]:
    """Set every conv's padding mode to ``mode``; padded pools pad explicitly in ``mode`` and then
    pool unpadded (a max-pool's implicit -inf padding is not circular); 'zeros' restores them."""
    if mode not in PADDING_MODES:
        raise FixError(f"unknown padding mode {mode!r}: use one of {', '.join(PADDING_MODES)}")
    if (layer := transformed_layer(model)) is not None:
        raise FixError(f"set_padding: {layer} is already transformed; apply padding before blurpool and aps")
    report = FixReport(f"padding:{mode}", verb="re-padded", noun="layers")
    done: dict[int, nn.Module] = {}  # a module shared by several parents gets one substitute

    def visit(module: nn.Module, path: str) -> nn.Module:
        if id(module) not in done:
            done[id(module)] = substitute(module, path)
        return done[id(module)]

    def substitute(module: nn.Module, path: str) -> nn.Module:
        if isinstance(module, nn.Conv2d):
            module.padding_mode = mode
            report.replaced.append(path)
            return module
        if isinstance(module, (ShiftPool2d, nn.MaxPool2d, nn.AvgPool2d)):
            pool, padding, _ = pool_parts(module)
            if mode == "zeros" or not any(padding):
                restored = copy.deepcopy(pool) if isinstance(module, ShiftPool2d) else module
                restored.padding = padding
                return restored
            inner = copy.deepcopy(pool)
            inner.padding = 0
            report.replaced.append(path)
            return ShiftPool2d(inner, symmetric_pad(_pair(padding)), mode).train(module.training)
        for name, child in list(module.named_children()):
            setattr(module, name, visit(child, f"{path}.{name}" if path else name))
        return module

    return visit(model, ""), report
