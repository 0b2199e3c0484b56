"""What is captured and its stride: layer discovery, selection, and feature taps (forward hooks).

Layers are named by module path; a module that runs more than once in one forward pass (the
``relu`` shared inside a torchvision ResNet block) gets one layer per call, ``name#2``, ``name#3``.
Spatial axes and cumulative strides come from the shapes seen on a probe forward pass, and the
main path (as opposed to parallel branches such as a residual shortcut) from its dataflow.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UserError

FeatureCallback = Callable[[str, torch.Tensor], None]
Resize = Callable[[nn.Module, int], None]  # rebuilds a module built for one input size for another


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
    main: bool = True  # on the main path from input to output, not on a parallel branch (a shortcut)
    tokens: int | None = None  # a token layer (N, T, C): its leading non-patch tokens, dropped; None: a map

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

    def compared_shift(self, shift: tuple[float, float]) -> tuple[float, float] | None:
        """The feature shift the maps are compared at: whole where aligned, fractional (``d / s``,
        resampled) otherwise; a fixed-size map only at shift 0 (None: not compared)."""
        if self.fixed:
            return (0, 0) if shift == (0, 0) else None
        if self.aligned(shift):
            return self.feature_shift(shift)
        return shift[0] / self.stride[1], shift[1] / self.stride[0]


def _call_key(name: str, call: int) -> str:
    return name if call == 1 else f"{name}#{call}"


PROBE_STEP = 32  # the second probe is this many pixels larger: every common stride divides it


def _snap(ratio: float) -> int:
    """A measured stride, snapped to the nearest power of two when within 15% of it.

    Unpadded layers and odd sizes make size ratios inexact (299 px -> 35 px at stride 8); a whole
    ratio is the stride (EVA's 14 px patches at 56 px: 4x4).
    """
    if ratio <= 1.15:
        return 1
    if ratio.is_integer():
        return int(ratio)
    power = 2 ** round(math.log2(ratio))
    return power if abs(ratio - power) <= 0.15 * power else max(1, round(ratio))


def _geometry(shape: torch.Size, larger: torch.Size | None, size: int) -> tuple[int, int, int, bool, bool] | None:
    """(C, h, w, channels_last, fixed) of a 4-D map, or None when it has no spatial axes.

    The spatial axes are those that grow when the input grows (``larger``: the same layer's
    shape at ``size + PROBE_STEP``). Without a second probe (fixed-size models), a square input
    is assumed to give a square map that fits the input at a whole stride (``fits``): NCHW when
    dims 2 and 3 are equal, else NHWC, and neither when all three are.
    """
    _, a, b, c = shape
    if larger is not None:
        if len(larger) != 4:
            return None
        changed = [d for d in (1, 2, 3) if larger[d] != shape[d]]
        if changed and not all(0 < larger[d] - shape[d] <= PROBE_STEP for d in changed):
            return None  # not a stride of at least 1 (a token-by-token attention map grows faster)
        if changed == [2, 3]:
            return a, b, c, False, False
        if changed == [1, 2]:
            return c, a, b, True, False
        if changed:
            return None
        # square, and it does not grow with the input: a fixed-size map (adaptive pooling)
        return (a, b, c, False, True) if b == c else (c, a, b, True, True) if a == b else None
    if a == b == c and b > 1:
        return None  # (C, h, w) or (h, w, C) alike: no way to tell from one size (Swin's 16 channels at 16x16)
    if b == c and fits(size, b):
        return a, b, c, False, b == 1
    if a == b and fits(size, a):
        return c, a, b, True, a == 1
    return None


def fits(size: int, side: int) -> bool:
    """True when a ``side`` px map can come from a ``size`` px input at a whole stride ``s``
    (``side`` is ``size // s`` or ``ceil(size / s)``): a window attention's 49x49 scores at 224 px do not."""
    first = size // side
    return any(side in (size // s, -(-size // s)) for s in (first, first + 1) if s)


class FeatureTap:
    """Forward hooks on chosen layers that hand each output to a callback, keyed by call.

    Used as a context manager so the hooks never outlive a run; ``reset()`` before every forward
    pass restarts the per-module call counters. ``untraced``: for a model run through
    ``torch.compile``, the hooks are left out of its graphs (run eagerly, with a graph break),
    so the comparisons are not traced and recompiled per layer (``--compile-metrics`` compiles them apart).
    """

    def __init__(self, model: nn.Module, names: list[str] | None, callback: FeatureCallback,
                 untraced: bool = False) -> None:
        self.model, self.callback, self.untraced = model, callback, untraced
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

        return torch.compiler.disable(hook) if self.untraced else hook

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
    token_layers: list[str]  # 3-D outputs: sequences of tokens with no spatial map found
    path_note: str | None = None  # why the main path could not be followed, when it could not
    output: object = None  # the model's output on the blank probe input (its kind is read from it)
    token_note: str | None = None  # which tokens of the token layers were dropped, when some were mapped
    repeats: frozenset[str] = frozenset()  # layers returning the very map another one returns (see ``_repeats``)


State = tuple[int, int]  # a tensor's identity and version: an in-place op makes a new state


def _state(tensor: torch.Tensor) -> State:
    return id(tensor), tensor._version


def _tensors(obj: object) -> list[torch.Tensor]:
    """The tensors in a (nested) call argument or result, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


class _Dataflow(TorchFunctionMode):
    """Every torch function call of one eager forward pass, as the tensor states it read and wrote.

    The outermost calls only (a module's ``F.conv2d``, a residual ``+=``, a ``torch.cat``); the
    tensors are kept alive for the pass so their ids stay unique.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[list[State], list[State]]] = []
        self.alive: list[torch.Tensor] = []

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        inputs = [_state(t) for t in _tensors((args, kwargs))]
        result = func(*args, **kwargs)
        outputs = _tensors(result)
        if outputs:
            self.alive.extend(outputs)
            self.ops.append((inputs, [_state(t) for t in outputs]))
        return result


def _main_path(flow: _Dataflow, source: State, sink: State, weight: Callable[[State], int]) -> set[State] | None:
    """The tensor states on the heaviest path from the input to the output (None: not connected).

    A path's weight is the number of measurable maps it passes through, so a residual block's main
    branch outweighs its shortcut and an Inception module's deepest branch the others. A state read
    but never written (an in-place change through a view) continues from its tensor's latest state.
    """
    dist: dict[State, int] = {source: 0}
    back: dict[State, State] = {}
    latest: dict[int, State] = {source[0]: source}
    for inputs, outputs in flow.ops:
        known = [s if s in dist else latest[s[0]] for s in inputs if s in dist or s[0] in latest]
        if not known:
            continue
        best = max(known, key=dist.__getitem__)
        for state in outputs:
            if state in known:
                continue
            length = dist[best] + weight(state)
            if length > dist.get(state, -1):
                dist[state], back[state] = length, best
                latest[state[0]] = state
    if sink not in dist:
        return None
    path, state = {sink}, sink
    while state in back:
        state = back[state]
        path.add(state)
    return path


Capture = tuple[str, torch.Tensor, State]


def _record(model: nn.Module, size: int, device: torch.device | str, flow: _Dataflow | None = None
            ) -> tuple[list[Capture], tuple[State, State] | None, object]:
    """Every 4-D output (a map) and 3-D output (a token sequence) of one blank forward pass, in
    forward order, by call key with its state, and the model's output; with ``flow``, also the
    dataflow and the (input, output) states it connects."""
    captured: list[Capture] = []

    def record(key: str, output: torch.Tensor) -> None:
        # an output whose first axis is not the batch of 1 (heads x N inside attention, images x
        # windows in a window attention's partitions) is not a layer
        if output.dim() in (3, 4) and output.shape[0] == 1:
            captured.append((key, output, _state(output)))

    x = torch.zeros(1, 3, size, size, device=device)
    source = _state(x)
    with FeatureTap(model, None, record), torch.no_grad(), flow if flow is not None else contextlib.nullcontext():
        try:
            output = model(x)
        except torch.cuda.OutOfMemoryError:  # a RuntimeError, but no sign of a wrong input size
            raise
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"the model fails on a {size}x{size} input ({first}): it may need a larger --size") from exc
    logits = _tensors(output)
    ends = (source, _state(logits[0])) if flow is not None and logits else None
    return captured, ends, output


MAX_EXTRA_TOKENS = 16  # class, distillation and register tokens a sequence may start with


def token_grid(tokens: int, size: int, larger: int | None) -> tuple[int, int, int] | None:
    """(leading extra tokens, grid side, patch size) of a sequence of ``tokens`` tokens from a
    ``size`` px input: ``tokens = extra + (size / p)²``, the fewest extra tokens that fit; with
    ``larger`` (its length at ``size + PROBE_STEP``), the grid must grow to match (its side the
    floor or ceil of the new size / p). None: no grid."""
    for extra in range(min(tokens, MAX_EXTRA_TOKENS + 1)):
        side = math.isqrt(tokens - extra)
        if side < 2 or side * side != tokens - extra or size % side:
            continue
        patch = size // side
        grown = {(size + PROBE_STEP) // patch, -(-(size + PROBE_STEP) // patch)}  # 14 px patches do not divide it
        if larger is None or larger - extra in {g * g for g in grown}:
            return extra, side, patch
    return None


def _token_names(model: nn.Module, extra: int) -> str:
    """What the ``extra`` leading tokens are, from the attributes timm and torchvision give them."""
    named = [(getattr(model, "cls_token", None) is not None or getattr(model, "class_token", None) is not None, "class"),
             (getattr(model, "dist_token", None) is not None, "distillation")]
    parts = [name for present, name in named if present][:extra]
    registers = extra - len(parts)
    if registers > 0:
        parts.append(f"{registers} register" if parts or getattr(model, "reg_token", None) is not None
                     else f"{registers} leading")
    return f"{extra} token{'s' if extra != 1 else ''} ({', '.join(parts)})"


PADDING = (nn.modules.padding.ZeroPad2d, nn.modules.padding.ConstantPad2d, nn.modules.padding.ReflectionPad2d,
           nn.modules.padding.ReplicationPad2d, nn.modules.padding.CircularPad2d)


def _is_padding(module: nn.Module) -> bool:
    """A module that only pads (torch's own, or one named like them: ``SamePad``, ``Pad2d``)."""
    return isinstance(module, PADDING) or type(module).__name__.endswith(("Pad", "Pad2d"))


def _stage_names(model: nn.Module, strides: dict[str, int]) -> set[str]:
    """Module names at the level of stages: the top-level children, where a container of stages
    (two or more child containers that each raise the stride, like EfficientNet's ``features`` or
    timm's ``blocks``) is replaced by its children, recursively. ``strides``: module name -> the
    stride of its output map (absent: no map that follows the input)."""
    stages: set[str] = set()

    def visit(children: list[tuple[str, nn.Module]], stride: int) -> None:
        for name, module in children:
            kids = [(f"{name}.{k}", m) for k, m in module.named_children()]
            if _holds_stages(kids, stride, strides):
                visit(kids, stride)
            else:
                stages.add(name)
            stride = strides.get(name, stride)

    visit(list(model.named_children()), 1)
    return stages


def _holds_stages(kids: list[tuple[str, nn.Module]], stride: int, strides: dict[str, int]) -> bool:
    raising = 0
    for name, module in kids:
        out = strides.get(name, stride)
        raising += out > stride and any(True for _ in module.children())
        stride = out
    return raising >= 2


def _is_attention(module: nn.Module) -> bool:
    """An attention module by its class (timm's ``Attention``, ``WindowAttention``,
    ``PartitionAttentionCl``; torch's ``MultiheadAttention``)."""
    return "Attention" in type(module).__name__


def _has_attention(module: nn.Module) -> bool:
    """A module holding an attention module."""
    return any(_is_attention(m) for m in module.modules())


def _inside_attention(model: nn.Module) -> Callable[[str], bool]:
    """Whether a layer key names a module inside an attention module: its projections, scores,
    softmax and dropout are per window or per head (Swin's 4x4 window scores at 64 px have a
    map's shape), so only the attention module's own output is a layer."""
    outer = [f"{name}." for name, m in model.named_modules() if name and _is_attention(m)]
    return lambda key: key.split("#")[0].startswith(tuple(outer))


def _transformer_blocks(model: nn.Module, token_layers: set[str], maps: set[str]) -> set[str]:
    """The blocks of transformers: containers of one class, two or more side by side in a
    ``Sequential`` or ``ModuleList``, whose outputs are token layers (timm's ``blocks.0``,
    torchvision's ``encoder_layer_0``) or maps of blocks holding attention (Swin's
    ``layers.0.blocks.0``, MaxViT's ``stages.0.blocks.0``); the innermost such level (blocks, not
    the stages holding them)."""
    blocks: set[str] = set()
    for parent, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        kids = [(f"{parent}.{k}" if parent else k, m) for k, m in module.named_children()]
        found = [(name, m) for name, m in kids if any(True for _ in m.children())
                 and (name in token_layers or name in maps and _has_attention(m))]
        kinds = Counter(type(m) for _, m in found)
        blocks.update(name for name, m in found if kinds[type(m)] >= 2)
    return {name for name in blocks if not any(inner.startswith(f"{name}.") for inner in blocks)}


def _default_layers(model: nn.Module, layers: list[LayerInfo], tensor_of: dict[str, int]) -> set[str]:
    """The default selection: the outputs of stages, and the first layer of the main path at each
    new stride (the stem's strided convolution, each stage's downsampling layer); never a padding
    module, a fixed-size map or a parallel branch. Names sharing one output tensor (a container and
    its last child, a layer and the in-place ReLU after it) give one layer: a transformer block's,
    else the stage's, else the last.
    """
    modules = dict(model.named_modules())
    usable = [layer for layer in layers if layer.main and not layer.fixed
              and not _is_padding(modules[layer.name.split("#")[0]])]
    strides = {layer.name: max(layer.stride) for layer in usable if "#" not in layer.name}
    blocks = _transformer_blocks(model, {layer.name for layer in usable if layer.tokens is not None},
                                 {layer.name for layer in usable})
    stages = _stage_names(model, strides) | blocks
    last = {tensor_of[layer.name]: layer.name for layer in usable}  # the outermost name of each tensor
    chosen: dict[int, tuple[bool, str]] = {}  # output tensor -> (is a stage, name)
    seen: set[tuple[int, int]] = set()
    for layer in usable:
        tensor, stage = tensor_of[layer.name], layer.name in stages
        kept = chosen.get(tensor, (False, ""))
        if kept[1] not in blocks and (stage or not kept[0] and layer.stride not in seen):  # a block keeps its name
            chosen[tensor] = (True, layer.name) if stage else (False, last[tensor])
        seen.add(layer.stride)
    return {name for _, name in chosen.values()}


def _larger_shapes(model: nn.Module, size: int, device: torch.device | str, resize: Resize | None
                   ) -> dict[str, torch.Size]:
    """Each layer's output shape at ``size + PROBE_STEP``: from the model itself, else from a copy
    rebuilt for that size (``resize``, for models built for one size); empty when neither runs."""
    try:
        return {key: out.shape for key, out, _ in _record(model, size + PROBE_STEP, device)[0]}
    except UserError:
        if resize is None:
            return {}
    twin = copy.deepcopy(model)
    resize(twin, size + PROBE_STEP)
    try:
        return {key: out.shape for key, out, _ in _record(twin, size + PROBE_STEP, device)[0]}
    except UserError:
        return {}


def _stride(size: int, side: int, grown: int) -> int:
    """The stride of a map ``side`` px wide at ``size`` px and ``grown`` px wide ``PROBE_STEP`` px
    later: ``size / side`` when whole and the grown side agrees (floor or ceil; EVA's 14 px
    patches), else the growth ratio snapped (``_snap``)."""
    exact = size // side
    if size % side == 0 and grown in ((size + PROBE_STEP) // exact, -(-(size + PROBE_STEP) // exact)):
        return exact
    return _snap(PROBE_STEP / (grown - side))


def probe_layers(model: nn.Module, size: int, device: torch.device | str = "cpu", resize: Resize | None = None) -> Probe:
    """Describe every 4-D output from blank forward passes at ``size`` and ``size + PROBE_STEP``.

    Stride = input growth / map growth between the two passes (``_stride``); a model that takes
    only one size is probed at the second on a copy rebuilt by ``resize``, and without one gets one
    pass and size / map size. Token sequences (N, T, C) whose length fits a square patch grid (see
    ``token_grid``) are layers too: their leading extra tokens dropped, the rest laid out
    (N, C, side, side), stride = the patch size. The first pass also records the dataflow, from
    which each layer is placed on the main path or on a parallel branch (a shortcut's
    ``downsample``). Default selection: see ``_default_layers``; fixed-size maps are left out.
    A layer's batch axis is the input's at both sizes (a window attention's partitions hold images
    x windows), and nothing inside an attention module is a layer (``_inside_attention``).
    """
    if isinstance(model, torch.jit.ScriptModule):
        return Probe(layers=[], token_layers=[])
    flow = _Dataflow()
    try:
        captured, ends, output = _record(model, size, device, flow)
    finally:
        flow.alive.clear()
    larger = _larger_shapes(model, size, device, resize)
    found: list[tuple[str, tuple[int, int, int, bool, bool], tuple[int, int], State, int | None]] = []
    unmapped: list[str] = []
    extras: set[int] = set()  # the counts of leading extra tokens dropped from the token layers
    inside_attention = _inside_attention(model)
    for key, out, state in captured:
        if larger and key not in larger:  # not one at the other size (there its batch axis holds windows)
            continue
        if inside_attention(key):
            continue
        if out.dim() == 3:
            grid = token_grid(out.shape[1], size, larger[key][1] if key in larger else None)
            if grid is None:
                unmapped.append(key)
                continue
            extra, side, patch = grid
            extras.add(extra)
            found.append((key, (out.shape[2], side, side, False, False), (patch, patch), state, extra))
            continue
        geometry = _geometry(out.shape, larger.get(key) if larger else None, size)
        if geometry is None:
            continue
        _, h, w, channels_last, fixed = geometry
        if larger and not fixed:
            grown = larger[key]
            gh, gw = (grown[1], grown[2]) if channels_last else (grown[2], grown[3])
            stride = (_stride(size, h, gh), _stride(size, w, gw))
        else:
            stride = (_snap(size / h), _snap(size / w))
        found.append((key, geometry, stride, state, None))
    weights = {state for _, geometry, _, state, _ in found if not geometry[4]}
    path = _main_path(flow, *ends, lambda s: int(s in weights)) if ends is not None else None
    note = None if path is not None or not found else (
        "the forward pass could not be followed from input to output, so every layer counts as on the main "
        "path (the default layers may include parallel branches; born at compares every measured layer)")
    layers = [
        LayerInfo(key, c, h, w, stride, channels_last, default=False, fixed=fixed,
                  main=not fixed and (path is None or state in path), tokens=tokens)
        for key, (c, h, w, channels_last, fixed), stride, state, tokens in found
    ]
    default = _default_layers(model, layers, {key: state[0] for key, _, _, state, _ in found})
    layers = [replace(layer, default=layer.name in default) for layer in layers]
    token_note = None
    if extras:
        dropped = " or ".join(_token_names(model, extra) for extra in sorted(extras) if extra)
        token_note = "token layers mapped back to their patch grid" + (
            f", the leading {dropped} dropped" if dropped else " (no extra tokens)")
    return Probe(layers=layers, token_layers=unmapped, path_note=note, output=output, token_note=token_note,
                 repeats=_repeats([(key, state) for key, _, _, state, _ in found], default))


def _repeats(outputs: list[tuple[str, State]], default: set[str]) -> frozenset[str]:
    """The layers whose output is the very tensor another layer returned: an identity (eval-mode
    ``Dropout``, ``Identity``) repeats its producer's map, a container its last child's. Each map
    is kept once: under its name among the ``default`` layers, else the outermost container that
    returns it, else the module that made it."""
    by_state: dict[State, list[str]] = defaultdict(list)
    for key, state in outputs:
        by_state[state].append(key)
    repeated: set[str] = set()
    for keys in by_state.values():
        maker = keys[0].split("#")[0]
        containers = [key for key in keys if maker.startswith(key.split("#")[0] + ".")]
        chosen = [key for key in keys if key in default]
        kept = chosen[0] if chosen else min(containers, key=len) if containers else keys[0]
        repeated.update(key for key in keys if key != kept)
    return frozenset(repeated)


def select_layers(probe: Probe, spec: str) -> list[LayerInfo]:
    """``default``, ``all`` (each distinct map once: see ``_repeats``), ``none``, or a comma list of
    names and glob patterns (``layer3.*``)."""
    spec = spec.strip()
    if spec == "none":
        return []
    if spec == "all":
        return [layer for layer in probe.layers if layer.name not in probe.repeats]
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
    """View a captured map as ``(N, C, h, w)`` whatever its memory layout; a token layer's
    sequence without its leading extra tokens, row-major on its patch grid."""
    if layer.tokens is not None:
        grid = feature[:, layer.tokens:, :].unflatten(1, (layer.height, layer.width))
        return grid.permute(0, 3, 1, 2)
    return feature.permute(0, 3, 1, 2) if layer.channels_last else feature

