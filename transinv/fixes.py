"""Model transformations that apply the known remedies for broken shift invariance to any network.

Every transform walks the module tree of a deep copy of the model (the caller's model is never
changed), replaces the stride-2 layers it finds, and keeps every learnable parameter and the
state-dict keys: a replaced ``Conv2d`` is a ``DownsampledConv2d`` holding the very same ``weight``
and ``bias``, and the blur filters are non-persistent buffers, so original checkpoints still load.
New modules take the train/eval mode of the module they replace.

* ``antialias`` (BlurPool, Zhang 2019, "Making convolutional networks shift-invariant again"):
  a stride-2 layer runs at stride 1 and is then low-pass filtered by a fixed binomial kernel and
  subsampled (``Blur``). Strided convs are kept simple: conv at stride 1, then the blur (Zhang
  puts the ReLU between the two for conv+ReLU pairs; here BN/ReLU come after the blur).
  ``AvgPool2d(stride 2)`` becomes the blur alone. The binomial response cos(w/2)^(K-1) is 0 at
  Nyquist for every K, so the aliases that make a global average jump at odd shifts vanish.
* ``adaptive_polyphase`` (APS, Chaman & Dokmanic 2021, "Truly shift-invariant convolutional
  neural networks"): a stride-2 layer runs at stride 1 and keeps, per image, the polyphase
  component (offset (0,0), (0,1), (1,0) or (1,1)) of largest L2 norm (``PolyphaseDown``).
* ``set_padding``: every ``Conv2d`` gets the padding mode, and padded pools pad explicitly in that
  mode (max pooling's implicit -inf padding is not circular).

Padding. A layer's *mode* is its own padding mode when it pads, else the mode shared by all the
network's padded convs (a 1x1 shortcut or an unpadded pool in a circular network is circular).
In circular mode the stride-1 map is the full periodic one: the input is padded circularly by
``(p, k-1-p)`` so the map has the input's size, and the blur pads circularly too. That keeps a
circular network exactly equivariant at even shifts after BlurPool, and exactly invariant after
APS when every downsampled map has an even size. Otherwise the blur pads by reflection (Zhang's
choice: no artificial edge; replication on maps too small to reflect). Each replacement keeps the
layer's output size (cropping, or padding the last row/column, where the stride-1 map is odd-sized
or a pool used ``ceil_mode``), so every architecture still fits together.

Residual blocks. APS must keep the same component on the main path and on the shortcut, or the
two branches move by different amounts and their sum is not shift-equivariant. In any module with
a ``downsample`` child (torchvision's ``BasicBlock`` and ``Bottleneck``), the first stride-2 layer
of the main path chooses the component per image and the first one in ``downsample`` reuses it.
Other blocks with parallel strided branches (Inception, ShuffleNet) are handled per layer, as are
strides applied in a ``forward`` by functional calls, which no module walk can see.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.pooling import _AvgPoolNd, _LPPoolNd, _MaxPoolNd
from torch.nn.modules.utils import _pair

from .errors import UserError

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
BLUR_KERNELS = range(2, 8)
VARIANT_PARTS = (
    "base, blurpool, blurpool:K (K = 2..7), aps, padding:MODE (MODE = zeros, circular, reflect, replicate)"
)

Size = tuple[int, int]


class FixError(UserError, ValueError):
    """A model (or a variant spec) that cannot be transformed; the one-line message names the layer.

    Also a ``UserError``, so the CLI prints the line instead of a traceback.
    """


@dataclass(frozen=True)
class _Geometry:
    """Effective (dilated) kernel, padding and rounding of the original stride-2 layer, per (h, w)."""

    kernel: Size
    padding: Size
    ceil_mode: bool = False

    def out_size(self, size: Size) -> Size:
        """The original layer's output size (PyTorch's formula for stride 2)."""
        return tuple(_strided_size(n, k, p, self.ceil_mode) for n, k, p in zip(size, self.kernel, self.padding))

    def symmetric_pad(self) -> tuple[int, int, int, int]:
        (ph, pw) = self.padding
        return (pw, pw, ph, ph)

    def periodic_pad(self) -> tuple[int, int, int, int]:
        """Padding that makes the stride-1 map as large as the input: the full circular map."""
        (kh, kw), (ph, pw) = self.kernel, self.padding
        return (pw, max(kw - 1 - pw, 0), ph, max(kh - 1 - ph, 0))


def _pool_geometry(pool: nn.MaxPool2d | nn.AvgPool2d, padding: Size) -> _Geometry:
    dilation = _pair(getattr(pool, "dilation", 1))
    kernel = tuple(d * (k - 1) + 1 for d, k in zip(dilation, _pair(pool.kernel_size)))
    return _Geometry(kernel, padding, pool.ceil_mode)


def _strided_size(n: int, kernel: int, padding: int, ceil_mode: bool) -> int:
    span = n + 2 * padding - kernel
    out = -(-span // 2) + 1 if ceil_mode else span // 2 + 1
    if ceil_mode and (out - 1) * 2 >= n + padding:  # the last window must start inside the input
        out -= 1
    return out


def _fit(x: torch.Tensor, size: Size, circular: bool) -> torch.Tensor:
    """Crop or pad (at the bottom/right; wrapping when circular, else replicating) to ``size``."""
    h, w = size
    x = x[..., :h, :w]
    dh, dw = h - x.shape[-2], w - x.shape[-1]
    if dh > 0 or dw > 0:
        x = F.pad(x, (0, max(dw, 0), 0, max(dh, 0)), mode="circular" if circular else "replicate")
    return x


def binomial_kernel(size: int) -> torch.Tensor:
    """The ``size x size`` binomial filter: outer product of a row of Pascal's triangle, sum 1."""
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float32)
    kernel = torch.outer(row, row)
    return kernel / kernel.sum()


class Blur(nn.Module):
    """BlurPool's downsampler: a fixed depthwise binomial low-pass filter, then stride 2.

    Pads ``(K-1)//2`` before and ``K//2`` after each axis, circularly in a circular network (so
    circular equivariance survives) and by reflection otherwise (replication when the map is too
    small to reflect). The kernel is a non-persistent buffer: no parameter, no state-dict key.
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

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return _fit(self.filter(x, 2), size, self.circular)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel.shape[-1]}, circular={self.circular}"


class _PhaseGroup:
    """The per-image component chosen by a block's main path, handed to its shortcut once."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None

    def take(self) -> torch.Tensor:
        index, self.index = self.index, None
        if index is None:
            raise RuntimeError("APS: a shortcut ran before its block's main path chose the polyphase component")
        return index


class PolyphaseDown(nn.Module):
    """APS downsampler: keep, per image, the polyphase component of largest L2 norm.

    Receives the layer's stride-1 map, optionally low-pass filtered first (``lowpass``, for
    ``blurpool+aps``). ``role`` ``lead`` records the choice in ``group``, ``follow`` reuses it
    (a residual block's shortcut), ``None`` chooses alone.
    """

    def __init__(
        self, circular: bool, lowpass: Blur | None = None, group: _PhaseGroup | None = None, role: str | None = None
    ) -> None:
        super().__init__()
        self.circular, self.lowpass, self.group, self.role = circular, lowpass, group, role

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        if self.lowpass is not None:
            x = self.lowpass.filter(x, 1)
        h, w = size
        x = _fit(x, (2 * h, 2 * w), self.circular)
        phases = torch.stack([x[..., a::2, b::2] for a in (0, 1) for b in (0, 1)], dim=1)  # N, 4, C, h, w
        if self.role == "follow":
            index = self.group.take()
        else:
            index = torch.linalg.vector_norm(phases.flatten(2), dim=2).argmax(dim=1)
            if self.role == "lead":
                self.group.index = index
        return phases[torch.arange(len(phases), device=phases.device), index]

    def extra_repr(self) -> str:
        return f"circular={self.circular}, role={self.role}"


class DownsampledConv2d(nn.Conv2d):
    """A stride-2 ``Conv2d`` run at stride 1 (same weight and bias), then downsampled by ``down``."""

    def __init__(self, conv: nn.Conv2d, down: nn.Module, circular: bool) -> None:
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=1, padding=padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device="meta",
        )
        self.weight, self.bias = conv.weight, conv.bias
        kernel = tuple(d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size))
        self.geometry = _Geometry(kernel, padding)
        self.circular = circular
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.geometry.out_size(x.shape[-2:])
        if self.circular:
            pad = self.geometry.periodic_pad()
            padded = F.pad(x, pad, mode="circular") if any(pad) else x
            out = F.conv2d(padded, self.weight, self.bias, 1, 0, self.dilation, self.groups)
        else:
            out = self._conv_forward(x, self.weight, self.bias)
        return self.down(out, size)


class ShiftPool2d(nn.Module):
    """A max/avg pool with explicit padding in ``pad_mode`` (None: the pool's own implicit padding),
    run at its own stride, or at stride 1 and then downsampled by ``down``.

    ``pool`` is ``nn.Identity`` where BlurPool replaced an average pool by the blur alone.
    """

    def __init__(
        self, pool: nn.Module, pad_mode: str | None, geometry: _Geometry, down: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.pool, self.pad_mode, self.geometry, self.down = pool, pad_mode, geometry, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        if self.pad_mode == "circular" and self.down is not None:
            x = F.pad(x, self.geometry.periodic_pad(), mode="circular")
        elif self.pad_mode is not None and any(self.geometry.padding):
            x = F.pad(x, self.geometry.symmetric_pad(), mode=self.pad_mode)
        out = self.pool(x)
        return out if self.down is None else self.down(out, self.geometry.out_size(size))

    def extra_repr(self) -> str:
        return f"pad_mode={self.pad_mode}, padding={self.geometry.padding}"


Replace = Callable[[str, nn.Module], "nn.Module | None"]


def _rewrite(model: nn.Module, replace: Replace) -> nn.Module:
    """Walk the tree (in place): ``replace(path, module)`` returns a substitute, or None to descend.

    A module shared by several parents gets one substitute; a substitute takes the train/eval
    mode of the module it replaces.
    """
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module, path: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = replace(path, module)
        if new is None:
            for name, child in list(module.named_children()):
                setattr(module, name, visit(child, f"{path}.{name}" if path else name))
            new = module
        elif new is not module:
            new.train(module.training)
        done[id(module)] = new
        return new

    return visit(model, "")


def _where(path: str, module: nn.Module) -> str:
    return f"layer {path or '<model>'} ({type(module).__name__})"


def _padded(conv: nn.Conv2d) -> bool:
    return conv.padding == "same" or (not isinstance(conv.padding, str) and any(conv.padding))


def _network_mode(model: nn.Module) -> str:
    """The padding mode all padded convs share ('zeros' when they disagree or none pads)."""
    modes = {m.padding_mode for m in model.modules() if isinstance(m, nn.Conv2d) and _padded(m)}
    return modes.pop() if len(modes) == 1 else "zeros"


def _conv_mode(conv: nn.Conv2d, network: str) -> str:
    """A conv's own padding mode when it pads or names one, else the network's."""
    return conv.padding_mode if _padded(conv) or conv.padding_mode != "zeros" else network


def _strided(path: str, module: nn.Module, stride: object) -> bool:
    """True for stride 2, False for stride 1; FixError for any other stride."""
    pair = _pair(stride)
    if pair == (1, 1):
        return False
    if pair != (2, 2):
        raise FixError(
            f"cannot transform {_where(path, module)}: stride {pair}; only stride 1 or 2 on both axes is supported"
        )
    return True


def _downsampler(
    path: str, module: nn.Module, network: str, make_down: Callable[[bool], nn.Module], blur_avg: bool
) -> nn.Module | None:
    """The stride-1 version of a stride-2 conv or pool followed by ``make_down(circular)``.

    None for stride-1 layers and for modules that are not convs or pools (their children are
    visited instead); FixError for strided layers this cannot rebuild.
    """
    if isinstance(module, nn.Conv2d):
        if not _strided(path, module, module.stride):
            return None
        if type(module) is not nn.Conv2d:
            raise FixError(
                f"cannot transform {_where(path, module)}: a Conv2d subclass may compute differently; "
                "only nn.Conv2d is rebuilt"
            )
        circular = _conv_mode(module, network) == "circular"
        return DownsampledConv2d(module, make_down(circular), circular)
    pool, pad_mode = module, None
    if isinstance(module, ShiftPool2d) and module.down is None:  # padded explicitly by set_padding
        pool, pad_mode = module.pool, module.pad_mode
    if isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
        if not _strided(path, module, pool.stride):
            return None
        if getattr(pool, "return_indices", False):
            raise FixError(f"cannot transform {_where(path, module)}: a max pool that returns indices")
        geometry = _pool_geometry(pool, module.geometry.padding if pad_mode is not None else _pair(pool.padding))
        if pad_mode is None and not any(geometry.padding) and network != "zeros":
            pad_mode = network
        down = make_down(pad_mode == "circular")
        if blur_avg and isinstance(pool, nn.AvgPool2d):
            return ShiftPool2d(nn.Identity(), None, geometry, down)
        inner = copy.deepcopy(pool)
        inner.stride = 1
        return ShiftPool2d(inner, pad_mode, geometry, down)
    if isinstance(module, (_ConvNd, _MaxPoolNd, _AvgPoolNd, _LPPoolNd)) and not isinstance(module, _ConvTransposeNd):
        stride = module.stride if module.stride is not None else module.kernel_size
        if any(s != 1 for s in (stride if isinstance(stride, tuple) else (stride,))):
            raise FixError(
                f"cannot transform {_where(path, module)}: only 2-D convolutions and max/avg pools can be rebuilt"
            )
    return None


def _check_untransformed(model: nn.Module, what: str) -> None:
    for path, module in model.named_modules():
        if isinstance(module, (Blur, PolyphaseDown)):
            raise FixError(
                f"{what}: {_where(path, module)} is already transformed; apply padding before blurpool and aps"
            )


def _set_padding(model: nn.Module, mode: str) -> nn.Module:
    if mode not in PADDING_MODES:
        raise FixError(f"unknown padding mode {mode!r}: use one of {', '.join(PADDING_MODES)}")
    _check_untransformed(model, "set_padding")

    def replace(path: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Conv2d):
            module.padding_mode = mode
            return module
        if isinstance(module, ShiftPool2d):  # an earlier set_padding: back to the plain pool first
            module.pool.padding = module.geometry.padding
            module = module.pool
        if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            padding = _pair(module.padding)
            if mode == "zeros" or not any(padding):
                return module
            pool = copy.deepcopy(module)
            pool.padding = 0
            return ShiftPool2d(pool, mode, _pool_geometry(module, padding))
        return None

    return _rewrite(model, replace)


def _antialias(model: nn.Module, kernel: int) -> nn.Module:
    if not isinstance(kernel, int) or kernel not in BLUR_KERNELS:
        raise FixError(f"blur kernel {kernel!r} is not supported: use a size from 2 to 7")
    network = _network_mode(model)
    return _rewrite(
        model, lambda path, m: _downsampler(path, m, network, lambda circular: Blur(kernel, circular), True)
    )


def _downsamples(module: nn.Module) -> bool:
    """A layer APS acts on: a stride-2 conv or pool, or one BlurPool already rebuilt."""
    if isinstance(module, (DownsampledConv2d, ShiftPool2d)) and module.down is not None:
        return True
    layer = module.pool if isinstance(module, ShiftPool2d) else module
    return isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and _pair(layer.stride) != (1, 1)


def _block_roles(model: nn.Module) -> dict[int, tuple[_PhaseGroup, str]]:
    """Pair each residual block's first main-path downsampling layer (lead) with its shortcut's (follow)."""
    roles: dict[int, tuple[_PhaseGroup, str]] = {}
    for block in model.modules():
        shortcut = getattr(block, "downsample", None)
        if not isinstance(shortcut, nn.Module):
            continue
        main = (m for name, m in block.named_modules() if name and name.split(".")[0] != "downsample")
        lead = next((m for m in main if _downsamples(m)), None)
        follow = next((m for m in shortcut.modules() if _downsamples(m)), None)
        if lead is not None and follow is not None:
            group = _PhaseGroup()
            roles[id(lead)], roles[id(follow)] = (group, "lead"), (group, "follow")
    return roles


def _adaptive_polyphase(model: nn.Module) -> nn.Module:
    network = _network_mode(model)
    roles = _block_roles(model)

    def replace(path: str, module: nn.Module) -> nn.Module | None:
        group, role = roles.get(id(module), (None, None))
        if isinstance(module, (DownsampledConv2d, ShiftPool2d)) and isinstance(module.down, Blur):
            blur = module.down
            module.down = PolyphaseDown(blur.circular, blur, group, role).train(blur.training)
            return module

        def make_down(circular: bool) -> PolyphaseDown:
            return PolyphaseDown(circular, None, group, role)

        return _downsampler(path, module, network, make_down, False)

    return _rewrite(model, replace)


def set_padding(model: nn.Module, mode: str) -> nn.Module:
    """A copy whose convs pad in ``mode`` (zeros, circular, reflect, replicate) and whose padded
    pools pad explicitly in that mode before pooling unpadded ('zeros' keeps pools as they are)."""
    return _set_padding(copy.deepcopy(model), mode)


def antialias(model: nn.Module, kernel: int = 3) -> nn.Module:
    """A BlurPool copy: stride-2 convs and max pools run at stride 1, then a ``kernel`` binomial
    blur with stride 2; stride-2 average pools become the blur alone."""
    return _antialias(copy.deepcopy(model), kernel)


def adaptive_polyphase(model: nn.Module) -> nn.Module:
    """An APS copy: stride-2 layers run at stride 1 and keep the max-norm polyphase component,
    one choice per residual block for the main path and its shortcut."""
    return _adaptive_polyphase(copy.deepcopy(model))


def parse_variant(variant: str) -> tuple[str | None, int | None, bool]:
    """``padding:MODE``, ``blurpool[:K]``, ``aps`` and ``base`` joined by '+': (padding mode, blur
    kernel, aps); None where the part is absent."""
    padding: str | None = None
    kernel: int | None = None
    aps = False
    seen: set[str] = set()
    for part in variant.split("+"):
        name, colon, arg = part.strip().partition(":")
        if name in seen:
            raise FixError(f"variant {variant!r} repeats {name!r}")
        seen.add(name)
        if name in ("base", "aps") and not colon:
            aps = aps or name == "aps"
        elif name == "blurpool":
            if colon and not (arg.strip().isdigit() and int(arg) in BLUR_KERNELS):
                raise FixError(f"variant {variant!r}: blurpool:K takes a kernel size K from 2 to 7, not {arg!r}")
            kernel = int(arg) if colon else 3
        elif name == "padding" and arg.strip() in PADDING_MODES:
            padding = arg.strip()
        else:
            raise FixError(f"unknown variant part {part.strip()!r} in {variant!r}: use {VARIANT_PARTS}, joined by '+'")
    return padding, kernel, aps


def apply_variant(model: nn.Module, variant: str) -> nn.Module:
    """A transformed copy for a variant spec, e.g. ``aps+padding:circular``: padding first, then
    blurpool, then aps (``base`` alone is an unchanged copy)."""
    padding, kernel, aps = parse_variant(variant)
    out = copy.deepcopy(model)
    if padding is not None:
        out = _set_padding(out, padding)
    if kernel is not None:
        out = _antialias(out, kernel)
    if aps:
        out = _adaptive_polyphase(out)
    return out
