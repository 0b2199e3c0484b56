"""The small networks measured in the guided tour (``docs/tour.md``).

Each factory returns a tiny ``nn.Module`` mapping ``(N, 3, H, W)`` images to ``(N, 10)`` logits,
with named layers so the tour's tables read ``conv``, ``pool``, ``head``... Use them as
``transinv.tour_models:NAME`` (or ``transinv/tour_models.py:NAME``)::

    transinv measure transinv.tour_models:conv1 --mode circular --layers conv --shift 0..4

Weights are random but fixed: every factory seeds the torch RNG with ``SEED`` while it builds
(and restores the caller's RNG state after), so ``--seed`` only chooses the images, a rerun
gives the same numbers, and networks that the tour compares share their weights wherever they
share their layers (``conv1`` and ``conv1_circular`` hold the very same kernel; ``fc_head`` and
``gap_head`` the same convolutional trunk).

Networks, by the tour's claim:

1. ``conv1``, ``conv1_circular``, ``conv1_valid``: one 3x3 convolution (8 channels) with zero,
   circular or no padding, then global average pooling and a linear head.
2. ``maxpool2``, ``avgpool2``: circular conv, ReLU, a 2x2 pool of stride 2, circular conv, ReLU,
   global average pooling, linear head. ``maxpool4_stride1``, ``maxpool4_stride2``,
   ``maxpool4_stride4``: the same with a 4x4 max-pool of stride 1 (padded circularly, so the map
   keeps its size), 2 or 4.
3. ``fc_head``, ``gap_head``: one zero-padded trunk (conv, ReLU, max-pool, conv, ReLU, max-pool)
   ending in a flattened fully connected head (32 px inputs only) or a global-average-pooled one;
   both heads are rescaled once on the built-in images so their predictions are not flat
   (``_calibrate``).
4. (resnet18 from torchvision.)
5. ``position``, ``position_circular``: six stride-1 3x3 convolutions with ReLU (He
   initialisation, zero biases), zero or circular padding, global average pooling, linear head.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

import torch
from torch import nn

SEED = 0
CLASSES = 10
FC_INPUT_SIZE = 32  # fc_head's flattened head fixes the input size
LOGIT_STD = 3.0  # spread of the calibrated heads' logits (see _calibrate)
CALIBRATION_RESIZE = 48  # the tour measures the heads with --size 32 --resize 48


@contextmanager
def _seeded(seed: int = SEED) -> Iterator[None]:
    """Initialise the modules built inside from the torch RNG seeded with ``seed``, then restore
    the caller's RNG state: the factories are deterministic and leave the caller's RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _conv(cin: int, cout: int, padding_mode: str = "zeros", padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=padding, padding_mode=padding_mode)


def _gap_head(channels: int) -> list[tuple[str, nn.Module]]:
    return [("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("head", nn.Linear(channels, CLASSES))]


# 1. One convolution ---------------------------------------------------------------------------


def _conv1(padding_mode: str = "zeros", padding: int = 1) -> nn.Module:
    with _seeded():
        return nn.Sequential(OrderedDict([("conv", _conv(3, 8, padding_mode, padding)), *_gap_head(8)]))


def conv1() -> nn.Module:
    """One 3x3 convolution with zero padding (PyTorch's default), GAP, linear head."""
    return _conv1("zeros")


def conv1_circular() -> nn.Module:
    """``conv1`` with circular padding: the image wraps around, there is no border."""
    return _conv1("circular")


def conv1_valid() -> nn.Module:
    """``conv1`` without padding ('valid'): the map is 2 px smaller and never sees a border."""
    return _conv1("zeros", padding=0)


# 2. Pooling -----------------------------------------------------------------------------------


class CircularMaxPool(nn.Module):
    """A ``k x k`` max-pool of stride ``s`` on a map padded circularly by ``k - s`` pixels
    (``(k - s) // 2`` before, the rest after), so an ``n``-px map gives ``n / s`` px and the pooled
    map wraps around like its input. With ``k = s`` there is no padding: plain ``MaxPool2d(k)``."""

    def __init__(self, k: int, s: int) -> None:
        super().__init__()
        before, after = (k - s) // 2, (k - s) - (k - s) // 2
        self.pad = nn.CircularPad2d((before, after, before, after))
        self.pool = nn.MaxPool2d(k, stride=s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pad(x))

    def extra_repr(self) -> str:
        return f"circular padding {tuple(self.pad.padding)}"


def _pooled(pool: nn.Module) -> nn.Module:
    """circular conv, ReLU, ``pool``, circular conv, ReLU, GAP, linear: only ``pool`` can break
    circular equivariance, so the tour can watch what it does."""
    with _seeded():
        layers = [
            ("conv", _conv(3, 8, "circular")),
            ("relu", nn.ReLU()),
            ("pool", pool),
            ("conv2", _conv(8, 16, "circular")),
            ("relu2", nn.ReLU()),
            *_gap_head(16),
        ]
        return nn.Sequential(OrderedDict(layers))


def maxpool2() -> nn.Module:
    """A 2x2 max-pool of stride 2 between two circular convolutions."""
    return _pooled(nn.MaxPool2d(2, stride=2))


def avgpool2() -> nn.Module:
    """A 2x2 average pool of stride 2 between two circular convolutions."""
    return _pooled(nn.AvgPool2d(2, stride=2))


def maxpool4_stride1() -> nn.Module:
    """A 4x4 max-pool of stride 1 (circularly padded, the map keeps its size)."""
    return _pooled(CircularMaxPool(4, 1))


def maxpool4_stride2() -> nn.Module:
    """A 4x4 max-pool of stride 2 (circularly padded by 1 px per side)."""
    return _pooled(CircularMaxPool(4, 2))


def maxpool4_stride4() -> nn.Module:
    """A 4x4 max-pool of stride 4 (non-overlapping windows)."""
    return _pooled(CircularMaxPool(4, 4))


# 3. Heads -------------------------------------------------------------------------------------


def _trunk() -> list[tuple[str, nn.Module]]:
    return [
        ("conv", _conv(3, 16)),
        ("relu", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("conv2", _conv(16, 32)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
    ]


def _calibration_images() -> torch.Tensor:
    """The built-in photographs as ``transinv measure --size 32 --resize 48`` sees them, unshifted."""
    from transinv.engine.data import builtin_images_dir, load_canvas
    from transinv.models import default_preprocess

    pre = replace(default_preprocess(), resize=CALIBRATION_RESIZE, size=FC_INPUT_SIZE)
    files = sorted(p for p in builtin_images_dir().iterdir() if p.suffix == ".jpg")
    return torch.stack([load_canvas(p, pre, FC_INPUT_SIZE) for p in files])


def _calibrate(model: nn.Sequential) -> nn.Sequential:
    """Rescale and recentre the head so the untrained network answers like a classifier.

    With random weights the logits hardly differ between classes (softmax almost flat) and are
    dominated by a part common to every image (the GAP head then names one class for nearly all
    images), so no probability could move much. Here the head's weight and bias are changed, once
    and the same way for both heads, so that on the nine built-in images (unshifted, 32 px) each
    logit has mean 0 over the images and all logits have standard deviation ``LOGIT_STD``: the
    map ``z -> g (z - m)``, an affine change of the last layer only. The trunk is untouched.
    """
    head = model.head
    with torch.no_grad():
        logits = model.eval()(_calibration_images())
        m, g = logits.mean(dim=0), LOGIT_STD / (logits - logits.mean(dim=0)).std()
        head.weight.mul_(g)
        head.bias.copy_(g * (head.bias - m))
    return model


def fc_head() -> nn.Module:
    """The trunk, flattened (32 x 8 x 8 at 32 px), then one fully connected layer: every weight
    belongs to one position of the map. Takes 32 x 32 inputs only. Head calibrated (``_calibrate``)."""
    side = FC_INPUT_SIZE // 4
    with _seeded():
        trunk = _trunk()
    with _seeded(SEED + 1):
        head = nn.Linear(32 * side * side, CLASSES)
    return _calibrate(nn.Sequential(OrderedDict([*trunk, ("flatten", nn.Flatten()), ("head", head)])))


def gap_head() -> nn.Module:
    """The same trunk (same weights as ``fc_head``), averaged over positions, then a linear layer.
    Head calibrated like ``fc_head``'s (``_calibrate``)."""
    with _seeded():
        trunk = _trunk()
    with _seeded(SEED + 1):
        head = nn.Linear(32, CLASSES)
    layers = [*trunk, ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("head", head)]
    return _calibrate(nn.Sequential(OrderedDict(layers)))


# 5. Absolute position -------------------------------------------------------------------------


def _position(padding_mode: str) -> nn.Module:
    """Six 3x3 stride-1 convs with ReLU; He initialisation and zero biases keep the signal's size
    from layer to layer (PyTorch's default init lets it fade and the biases take over)."""
    with _seeded():
        layers: list[tuple[str, nn.Module]] = []
        channels = 3
        for i in range(1, 7):
            conv = _conv(channels, 16, padding_mode)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [(f"conv{i}", conv), (f"relu{i}", nn.ReLU())]
            channels = 16
        return nn.Sequential(OrderedDict([*layers, *_gap_head(16)]))


def position() -> nn.Module:
    """Six zero-padded stride-1 3x3 convolutions with ReLU, GAP, linear head."""
    return _position("zeros")


def position_circular() -> nn.Module:
    """``position`` with circular padding (the same weights)."""
    return _position("circular")


TOUR_MODELS: dict[str, Callable[[], nn.Module]] = {
    "conv1": conv1,
    "conv1_circular": conv1_circular,
    "conv1_valid": conv1_valid,
    "maxpool2": maxpool2,
    "avgpool2": avgpool2,
    "maxpool4_stride1": maxpool4_stride1,
    "maxpool4_stride2": maxpool4_stride2,
    "maxpool4_stride4": maxpool4_stride4,
    "fc_head": fc_head,
    "gap_head": gap_head,
    "position": position,
    "position_circular": position_circular,
}
