"""The model as a torch.fx graph: where it downsamples, what follows each strided layer, and how
to insert a module after a node while keeping the module tree (and every layer name) intact.

Tracing descends only into modules that hold a strided layer (every other module is one opaque
node), so models whose blocks use Python control flow still trace. The graph is used to find
things; the model is changed by replacing modules, and only the modules whose own ``forward``
must call something new (a blur after a ReLU the block shares, say) become ``GraphModule``s,
traced with their children as leaves: every child, parameter and state-dict key stays where it was.
"""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.pooling import _AvgPoolNd, _LPPoolNd, _MaxPoolNd
from torch.nn.modules.utils import _pair

from .rebuilt import ShiftPool2d
from .report import FixError, where

NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d)
ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardtanh, nn.PReLU, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid,
)
ACTIVATION_CALLS = {
    "relu", "relu_", "relu6", "silu", "hardswish", "gelu", "leaky_relu", "elu", "selu", "celu", "mish",
    "hardtanh", "softplus", "tanh", "sigmoid", "hardsigmoid",
}
FUNCTIONAL_STRIDED = {"conv2d": 3, "max_pool2d": 2, "avg_pool2d": 2, "lp_pool2d": 3}  # name: position of stride


def layer_stride(module: nn.Module) -> tuple[int, ...] | None:
    """The stride of a conv or pool (a pool's default stride is its kernel), None for other modules."""
    if isinstance(module, ShiftPool2d):
        return layer_stride(module.pool)
    if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
        stride = module.stride
    elif isinstance(module, (_MaxPoolNd, _AvgPoolNd, _LPPoolNd)):
        stride = module.stride if module.stride is not None else module.kernel_size
    else:
        return None
    if isinstance(stride, int):  # pools take one int for every axis
        return (stride,) * (2 if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)) else 1)
    return tuple(stride)


def strides(module: nn.Module) -> bool:
    stride = layer_stride(module)
    return stride is not None and any(s != 1 for s in stride)


class _Tracer(fx.Tracer):
    """Traces into a module only when it holds a strided layer; ``ShiftPool2d`` stays one node."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.opaque = {id(m) for m in model.modules() if not any(strides(s) for s in m.modules())}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.opaque or isinstance(m, ShiftPool2d) or super().is_leaf_module(m, qualname)


class _ChildrenTracer(fx.Tracer):
    """Traces one module's own ``forward``: every child (and every torch.nn layer) is a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return "." not in qualname or super().is_leaf_module(m, qualname)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def owner(node: fx.Node) -> tuple[str, bool]:
    """(path of the module whose ``forward`` made this node, whether that module runs more than once)."""
    stack = list(node.meta.get("nn_module_stack", {}).items())
    if node.op == "call_module":
        stack = stack[:-1]
    if not stack:
        return "", False
    key, (path, _) = stack[-1]
    return path, "@" in key


def _call_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


@dataclass
class Site:
    """One strided layer the fixes can rebuild, and where its downsampler goes."""

    path: str
    module: nn.Module
    node: fx.Node
    stride: tuple[int, ...]
    kind: str  # conv, max or avg
    after: fx.Node | None = None  # the activation after which to downsample (a conv's only)

    @property
    def pointwise(self) -> bool:
        """A 1x1 unpadded conv: downsampling its input equals downsampling its output."""
        conv = self.module
        return self.kind == "conv" and _pair(conv.kernel_size) == (1, 1) and not any(_pair(conv.padding))


@dataclass
class Analysis:
    """A model's graph, the strided layers that can be rebuilt (in forward order) and those that cannot."""

    model: nn.Module
    graph: fx.Graph
    sites: list[Site] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (layer, why), in forward order
    first: str | None = None  # the first strided layer in forward order

    @property
    def stem(self) -> Site | None:
        """The first strided layer when it is a convolution (Zhang's ``pool_only`` keeps it)."""
        site = next((s for s in self.sites if s.path == self.first), None)
        return site if site is not None and site.kind == "conv" else None


def trace(model: nn.Module) -> fx.Graph:
    """The model's graph, or a one-line FixError naming what could not be traced."""
    if isinstance(model, torch.jit.ScriptModule):
        raise FixError("cannot transform a TorchScript model: its modules cannot be rebuilt")
    if layer_stride(model) is not None:  # the model is one conv or pool: one node
        graph = fx.Graph()
        graph.output(graph.call_module("", (graph.placeholder("x"),)))
        return graph
    try:
        return _Tracer(model).trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported as one line
        name = type(model).__name__
        raise FixError(f"cannot trace {name} with torch.fx ({_first_line(exc)}); no fix applied") from exc


def _following_activation(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The activation reached from ``node`` through single-use norm layers, or None."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        module = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(module, ACTIVATIONS) or (
            user.op in ("call_function", "call_method") and _call_name(user) in ACTIVATION_CALLS
        ):
            return user
        if not isinstance(module, NORMS):
            return None
        node = user
    return None


def _functional_stride(node: fx.Node) -> tuple[int, int] | None:
    """The stride of a functional strided call (``F.max_pool2d(x, 3, 2)``), None for other calls."""
    name = _call_name(node)
    if node.op != "call_function" or name not in FUNCTIONAL_STRIDED:
        return None
    position = FUNCTIONAL_STRIDED[name]
    stride = node.kwargs.get("stride", node.args[position] if len(node.args) > position else None)
    if stride is None and "pool" in name:  # a pool's stride defaults to its kernel
        stride = node.kwargs.get("kernel_size", node.args[1] if len(node.args) > 1 else 1)
    if stride is None or isinstance(stride, fx.Node):
        return None
    return _pair(stride)


def _why_not(module: nn.Module, stride: tuple[int, ...], calls: int, conv_strides: tuple[int, ...]) -> str | None:
    """Why a strided module cannot be rebuilt, or None when it can."""
    if calls > 1:
        return f"runs {calls} times in one forward pass"
    if isinstance(module, _ConvNd) and not isinstance(module, nn.Conv2d):
        return "only 2-D convolutions and max/avg pools can be rebuilt"
    if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d:
        return "a Conv2d subclass may compute differently; only nn.Conv2d is rebuilt"
    pool = module.pool if isinstance(module, ShiftPool2d) else module
    if not isinstance(pool, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return "only 2-D convolutions and max/avg pools can be rebuilt"
    allowed = conv_strides if isinstance(pool, nn.Conv2d) else (2,)
    if len(set(stride)) != 1 or stride[0] not in allowed:
        return f"stride {tuple(stride)}; only {' or '.join(f'({s}, {s})' for s in allowed)} can be rebuilt"
    if getattr(pool, "return_indices", False):
        return "a max pool that returns indices"
    return None


def analyse(model: nn.Module, conv_strides: tuple[int, ...] = (2,)) -> Analysis:
    """Trace ``model`` and sort its strided layers into rebuildable sites and refusals.

    ``conv_strides``: the convolution strides the caller can rebuild (BlurPool also takes 4,
    as Zhang's AlexNet does). A strided layer that runs more than once, a conv subclass, any
    other stride and strides taken by functional calls (``F.max_pool2d``) are refused.
    """
    analysis = Analysis(model, fx.Graph())
    if not any(strides(m) for m in model.modules()):
        return analysis
    analysis.graph = trace(model)
    modules = dict(model.named_modules())
    calls = defaultdict(int)
    for node in analysis.graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
    seen: set[str] = set()
    for node in analysis.graph.nodes:
        if node.op == "call_module" and strides(modules[node.target]) and node.target not in seen:
            seen.add(node.target)
            module = modules[node.target]
            stride = layer_stride(module)
            analysis.first = analysis.first or node.target
            why = _why_not(module, stride, calls[node.target], conv_strides)
            if why is not None:
                analysis.unsupported.append((where(node.target, module), why))
                continue
            pool = module.pool if isinstance(module, ShiftPool2d) else module
            kind = "conv" if isinstance(pool, nn.Conv2d) else "max" if isinstance(pool, nn.MaxPool2d) else "avg"
            after = _following_activation(node, modules) if kind == "conv" else None
            analysis.sites.append(Site(node.target, module, node, tuple(stride), kind, after))
        elif (stride := _functional_stride(node)) is not None and stride != (1, 1):
            path, _ = owner(node)
            analysis.first = analysis.first or path
            analysis.unsupported.append(
                (f"{_call_name(node)} in {where(path, model.get_submodule(path))}",
                 f"a functional call with stride {stride}; only modules can be rebuilt")
            )
    return analysis


def tensor_ranks(analysis: Analysis, size: int) -> dict[fx.Node, int]:
    """The rank of every tensor-valued node, from one forward pass of a blank ``size`` px image.

    The model runs in eval mode under ``no_grad`` (batch-norm statistics stay as they were) and
    every module's train/eval mode is restored afterwards.
    """
    model = analysis.model
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    modes = {m: m.training for m in model.modules()}
    probe = fx.GraphModule(model, analysis.graph)
    parameter = next(model.parameters(), torch.zeros(()))
    blank = torch.zeros(1, channels, size, size, device=parameter.device, dtype=parameter.dtype)
    try:
        with torch.no_grad():
            probe.eval()
            ShapeProp(probe).propagate(blank)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is one line
        raise FixError(
            f"aps: the model fails on a {size}x{size} probe input ({_first_line(exc)}); pass the size it takes"
        ) from exc
    finally:
        for module, training in modes.items():
            module.training = training
    return {n: len(n.meta["tensor_meta"].shape) for n in analysis.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), TensorMetadata)}


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Put each new module at its path; each takes the train/eval mode of the one it replaces."""
    for path, new in replacements.items():
        new.train(model.get_submodule(path).training)
        if not path:
            return new
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, new)
    return model


@dataclass
class Insertion:
    """A module to run on the output of a node of the model's graph, under a child name."""

    node: fx.Node
    module: nn.Module
    name: str


def _owner_node(owner_graph: fx.Graph, owner_path: str, node: fx.Node, model_graph: fx.Graph) -> fx.Node:
    """The node of a module's own graph that is ``node`` of the whole model's graph.

    Both graphs come from tracing the same ``forward``, so the k-th call of a target by this
    owner in one is the k-th call of the same (relative) target in the other.
    """
    prefix = f"{owner_path}." if owner_path else ""

    def key(n: fx.Node, relative: bool) -> tuple[str, object]:
        target = n.target
        if n.op == "call_module" and relative:
            target = target[len(prefix):]
        return n.op, target

    same = [n for n in model_graph.nodes if owner(n)[0] == owner_path and key(n, True) == key(node, True)]
    index = same.index(node)
    matches = [n for n in owner_graph.nodes if key(n, False) == key(node, True)]
    return matches[index]


def insert_after(model: nn.Module, graph: fx.Graph, insertions: list[Insertion]) -> nn.Module:
    """Run each insertion's module (in its owner's train/eval mode) on its node's output, rewriting
    only the modules that own the nodes.

    The owner (the module whose ``forward`` made the node) becomes a ``GraphModule`` of the same
    class name that calls the new child after that node; its children, parameters, buffers and
    their order (so the state-dict keys) are kept, and it keeps its own train/eval flag.
    """
    by_owner: dict[str, list[Insertion]] = defaultdict(list)
    for insertion in insertions:
        path, repeated = owner(insertion.node)
        if repeated:
            raise FixError(f"cannot insert after a node of {where(path, model.get_submodule(path))}: "
                           "that module runs more than once in one forward pass")
        by_owner[path].append(insertion)
    for path in sorted(by_owner, key=lambda p: -p.count(".") - bool(p)):  # deepest first
        module = model.get_submodule(path)
        for insertion in by_owner[path]:
            insertion.module.train(module.training)
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            _insert_in_sequence(module, path, by_owner[path])
            continue
        try:
            owner_graph = _ChildrenTracer().trace(module)
        except Exception as exc:  # noqa: BLE001
            raise FixError(f"cannot trace {where(path, module)} with torch.fx ({_first_line(exc)})") from exc
        for insertion in by_owner[path]:
            module.add_module(insertion.name, insertion.module)
            target = _owner_node(owner_graph, path, insertion.node, graph)
            with owner_graph.inserting_after(target):
                new = owner_graph.call_module(insertion.name, (target,))
            target.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        rebuilt = _rebuild(module, owner_graph)
        if not path:
            model = rebuilt
        else:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, rebuilt)
    return model


def _insert_in_sequence(sequence: nn.Sequential, path: str, insertions: list[Insertion]) -> None:
    """Insert each module right after its node's child: a ``Sequential`` stays one, and keeps its names."""
    prefix = f"{path}." if path else ""
    after = {insertion.node.target[len(prefix):]: insertion for insertion in insertions}
    children = OrderedDict()
    for name, child in sequence._modules.items():
        children[name] = child
        if name in after:
            children[after[name].name] = after[name].module
    sequence._modules = children


def _rebuild(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` with all of ``module``'s children, parameters and buffers, in order."""
    rebuilt = fx.GraphModule(module, graph, class_name=type(module).__name__)
    rebuilt._modules = OrderedDict(module._modules)
    rebuilt._parameters = OrderedDict(module._parameters)
    rebuilt._buffers = OrderedDict(module._buffers)
    rebuilt._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    rebuilt.training = module.training
    return rebuilt


def child_name(node: fx.Node, suffix: str) -> str:
    """A module name for what is inserted after ``node``: ``relu_blurpool``, ``act_aps``."""
    base = node.target.rpartition(".")[2] if node.op == "call_module" else node.name
    return re.sub(r"\W", "_", f"{base}_{suffix}")
