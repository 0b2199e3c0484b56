"""What is captured and its stride: layer discovery, selection, and feature taps (forward hooks).

Layers are named by module path; a module that runs more than once in one forward pass (the
``relu`` shared inside a torchvision ResNet block) gets one layer per call, ``name#2``, ``name#3``.
Spatial axes and cumulative strides come from the shapes seen on a probe forward pass.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import UserError

FeatureCallback = Callable[[str, torch.Tensor], None]


@dataclass(frozen=True)
class LayerInfo:
    """One measurable layer: a 4-D output, its spatial size and cumulative stride."""

    name: str
    channels: int
    height: int
    width: int
    stride: tuple[int, int]  # (sy, sx): input pixels per feature pixel
    channels_last: bool
    default: bool
    fixed: bool = False  # the map's size does not follow the input's (adaptive or global pooling)

    def aligned(self, shift: tuple[int, int]) -> bool:
        """True when the stride divides the shift, so it maps to a whole feature-pixel shift.

        A fixed-size map has no feature-pixel shift matching an input shift, except shift 0.
        """
        dx, dy = shift
        if self.fixed:
            return dx == 0 and dy == 0
        return dx % self.stride[1] == 0 and dy % self.stride[0] == 0

    def feature_shift(self, shift: tuple[int, int]) -> tuple[int, int]:
        """The feature-map shift ``(kx, ky)`` an aligned input shift corresponds to."""
        return shift[0] // self.stride[1], shift[1] // self.stride[0]


def _call_key(name: str, call: int) -> str:
    return name if call == 1 else f"{name}#{call}"


PROBE_STEP = 32  # the second probe is this many pixels larger: every common stride divides it


def _snap(ratio: float) -> int:
    """A measured stride, snapped to the nearest power of two when within 15% of it.

    Unpadded layers and odd sizes make size ratios inexact (299 px -> 35 px at stride 8).
    """
    if ratio <= 1.15:
        return 1
    power = 2 ** round(math.log2(ratio))
    return power if abs(ratio - power) <= 0.15 * power else max(1, round(ratio))


def _geometry(shape: torch.Size, larger: torch.Size | None, size: int) -> tuple[int, int, int, bool, bool] | None:
    """(C, h, w, channels_last, fixed) of a 4-D map, or None when it has no spatial axes.

    The spatial axes are those that grow when the input grows (``larger``: the same layer's
    shape at ``size + PROBE_STEP``). Without a second probe (fixed-size models), a square input
    is assumed to give a square map: NCHW when dims 2 and 3 are equal, else NHWC.
    """
    _, a, b, c = shape
    if larger is not None and len(larger) == 4:
        changed = [d for d in (1, 2, 3) if larger[d] != shape[d]]
        if changed == [2, 3]:
            return a, b, c, False, False
        if changed == [1, 2]:
            return c, a, b, True, False
        if changed:
            return None
    if b == c and b <= size:
        return a, b, c, False, larger is not None or b == 1
    if a == b and a <= size:
        return c, a, b, True, larger is not None or a == 1
    return None


class FeatureTap:
    """Forward hooks on chosen layers that hand each output to a callback, keyed by call.

    Used as a context manager so the hooks never outlive a run; ``reset()`` before every forward
    pass restarts the per-module call counters.
    """

    def __init__(self, model: nn.Module, names: list[str] | None, callback: FeatureCallback) -> None:
        self.model, self.callback = model, callback
        wanted = None if names is None else {n.split("#")[0] for n in names}
        self.names = None if names is None else set(names)
        self.modules = [(n, m) for n, m in model.named_modules() if n and (wanted is None or n in wanted)]
        self.calls: dict[str, int] = defaultdict(int)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def reset(self) -> None:
        self.calls.clear()

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            self.calls[name] += 1
            key = _call_key(name, self.calls[name])
            if isinstance(output, torch.Tensor) and (self.names is None or key in self.names):
                self.callback(key, output)

        return hook

    def __enter__(self) -> "FeatureTap":
        self.reset()
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@dataclass
class Probe:
    """What one forward pass at the measuring size reveals about a model's layers."""

    layers: list[LayerInfo]
    token_layers: list[str]  # 3-D outputs: sequences of tokens with no spatial map


def _record(model: nn.Module, size: int, device: torch.device | str) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Every 4-D output (by call key) and every 3-D (token) output of one blank forward pass."""
    maps: list[tuple[str, torch.Tensor]] = []
    tokens: list[str] = []

    def record(key: str, output: torch.Tensor) -> None:
        if output.dim() == 4:
            maps.append((key, output))
        elif output.dim() == 3:
            tokens.append(key)

    with FeatureTap(model, None, record), torch.inference_mode():
        try:
            model(torch.zeros(1, 3, size, size, device=device))
        except torch.cuda.OutOfMemoryError:  # a RuntimeError, but no sign of a wrong input size
            raise
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"the model fails on a {size}x{size} input ({first}): it may need a larger --size") from exc
    return maps, tokens


def probe_layers(model: nn.Module, size: int, device: torch.device | str = "cpu") -> Probe:
    """Describe every 4-D output from blank forward passes at ``size`` and ``size + PROBE_STEP``.

    Stride = input growth / map growth between the two passes (one pass and size / map size for
    models that take only one size). Default selection: outputs of top-level children plus the
    first layer at each new stride; a layer whose output tensor is returned again by a later
    module (a ``Sequential``'s last child, a ReLU applied in place) is left to that module, and
    fixed-size maps (adaptive or global pooling) are left out.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return Probe(layers=[], token_layers=[])
    maps, tokens = _record(model, size, device)
    try:
        larger = {key: out.shape for key, out in _record(model, size + PROBE_STEP, device)[0]}
    except UserError:
        larger = {}
    last_of = {id(out): i for i, (_, out) in enumerate(maps)}
    layers: list[LayerInfo] = []
    strides_seen: set[tuple[int, int]] = set()
    for i, (key, out) in enumerate(maps):
        geometry = _geometry(out.shape, larger.get(key) if larger else None, size)
        if geometry is None:
            continue
        channels, h, w, channels_last, fixed = geometry
        if larger and not fixed:
            grown = larger[key]
            gh, gw = (grown[1], grown[2]) if channels_last else (grown[2], grown[3])
            stride = (_snap(PROBE_STEP / (gh - h)), _snap(PROBE_STEP / (gw - w)))
        else:
            stride = (_snap(size / h), _snap(size / w))
        candidate = last_of[id(out)] == i and not fixed
        top = "." not in key.split("#")[0]
        default = candidate and (top or stride not in strides_seen)
        if candidate:
            strides_seen.add(stride)
        layers.append(LayerInfo(key, channels, h, w, stride, channels_last, default, fixed))
    return Probe(layers=layers, token_layers=tokens)


def select_layers(probe: Probe, spec: str) -> list[LayerInfo]:
    """``default``, ``all``, ``none``, or a comma list of names and glob patterns (``layer3.*``)."""
    spec = spec.strip()
    if spec == "none":
        return []
    if spec == "all":
        return list(probe.layers)
    if spec == "default":
        return [layer for layer in probe.layers if layer.default]
    names = [layer.name for layer in probe.layers]
    chosen: set[str] = set()
    for pattern in (p.strip() for p in spec.split(",") if p.strip()):
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            close = difflib.get_close_matches(pattern, names, n=4, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else "see `transinv layers MODEL`"
            raise UserError(f"--layers: no layer matches {pattern!r} ({hint})")
        chosen.update(matched)
    return [layer for layer in probe.layers if layer.name in chosen]


def to_nchw(feature: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
    """View a captured map as ``(N, C, h, w)`` whatever its memory layout."""
    return feature.permute(0, 3, 1, 2) if layer.channels_last else feature

