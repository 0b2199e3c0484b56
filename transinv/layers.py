"""What is captured and its stride: layer discovery, selection, and feature taps (forward hooks).

Layers are named by module path; a module that runs more than once in one forward pass (the
``relu`` shared inside a torchvision ResNet block) gets one layer per call, ``name#2``, ``name#3``.
Spatial axes and cumulative strides come from the shapes seen on a probe forward pass.
"""

from __future__ import annotations

import difflib
import fnmatch
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

    def aligned(self, shift: tuple[int, int]) -> bool:
        """True when the stride divides the shift, so it maps to a whole feature-pixel shift."""
        dx, dy = shift
        return dx % self.stride[1] == 0 and dy % self.stride[0] == 0

    def feature_shift(self, shift: tuple[int, int]) -> tuple[int, int]:
        """The feature-map shift ``(kx, ky)`` an aligned input shift corresponds to."""
        return shift[0] // self.stride[1], shift[1] // self.stride[0]


def _call_key(name: str, call: int) -> str:
    return name if call == 1 else f"{name}#{call}"


def _spatial(shape: torch.Size, size: int) -> tuple[int, int, int, bool] | None:
    """(C, h, w, channels_last) of a 4-D map from a square ``size`` input; None if not spatial.

    A square input gives a square map, so the equal pair of axes is spatial: NCHW is preferred,
    NHWC (swin, maxvit blocks) is recognised when only dims 1 and 2 are equal.
    """
    _, a, b, c = shape
    if b == c and b <= size:
        return a, b, c, False
    if a == b and a <= size:
        return c, a, b, True
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


def probe_layers(model: nn.Module, size: int, device: torch.device | str = "cpu") -> Probe:
    """Run one forward pass on a blank ``size`` x ``size`` image and describe every 4-D output.

    Default selection: the outputs of top-level children plus the first layer at each new
    cumulative stride; a layer whose output tensor is later returned by an enclosing module
    (a ``Sequential``'s last child, a ReLU applied in place) is left to that module.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return Probe(layers=[], token_layers=[])
    seen: list[tuple[str, torch.Tensor]] = []
    tokens: list[str] = []

    def record(key: str, output: torch.Tensor) -> None:
        if output.dim() == 4:
            seen.append((key, output))
        elif output.dim() == 3:
            tokens.append(key)

    with FeatureTap(model, None, record), torch.inference_mode():
        try:
            model(torch.zeros(1, 3, size, size, device=device))
        except (RuntimeError, ValueError, AssertionError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"the model fails on a {size}x{size} input ({first}): it may need a larger --size"
            ) from exc
    last_of: dict[int, int] = {}
    for i, (_, out) in enumerate(seen):
        last_of[id(out)] = i
    layers: list[LayerInfo] = []
    strides_seen: set[tuple[int, int]] = set()
    for i, (key, out) in enumerate(seen):
        spatial = _spatial(out.shape, size)
        if spatial is None:
            continue
        channels, h, w, channels_last = spatial
        stride = (max(1, round(size / h)), max(1, round(size / w)))
        superseded = last_of[id(out)] != i
        top = "." not in key.split("#")[0]
        new_stride = stride not in strides_seen
        strides_seen.add(stride)
        default = (top or new_stride) and not superseded
        layers.append(LayerInfo(key, channels, h, w, stride, channels_last, default))
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

