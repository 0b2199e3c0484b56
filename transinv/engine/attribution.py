"""Layer-wise Lie-derivative attribution (Gruver et al. 2023): the output's derivative under an
infinitesimal shift, split into one signed contribution per leaf layer that add up to it.

For a shift ``T_{t·v}`` of the input (``v`` in input pixels per unit ``t``) the output's Lie
derivative is ``L p = d/dt p(T_{t·v} x)`` at ``t = 0`` (``p``: softmax probabilities). A map of
stride ``s`` moves by ``t·v/s`` of its own pixels, with the generator ``A h = d/dt T_{t·v/s} h``.
Each leaf module call ``l`` (a module without submodules) has its own Lie derivative at its input
``h``: ``e_l = J_l (A h) - A f_l(h)``, zero when the layer is exactly equivariant. By the chain
rule ``L p = Σ_l J_{>l} e_l`` plus what operations outside leaf modules add, so the components
``c_l = ⟨J_{>l} e_l, L p⟩ / ‖L p‖`` add up to ``‖L p‖``. One forward-mode pass gives ``L p``; one
pass with a zero scalar ``ε_l`` added as ``f_l(h) + ε_l·e_l`` and one backward pass of
``⟨u, p⟩`` (``u = L p / ‖L p‖``) give every ``c_l = ∂⟨u, p⟩/∂ε_l``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import jvp

from ..errors import UserError
from .layers import LayerInfo, _call_key, _snap
from ..metric_registry import LIE_CONTRIBUTION, LIE_DERIVATIVE, LIE_UNATTRIBUTED, OUTPUT_LAYER
from ..models.outputs import class_logits
from .shifts import ShiftPlan
from .subpixel import bilinear_shift_derivative, fourier_shift_derivative

Velocity = tuple[int, int]
VELOCITIES: dict[str, list[Velocity]] = {"x": [(1, 0)], "y": [(0, 1)], "diagonal": [(1, 1)], "grid": [(1, 0), (0, 1)]}
FEATURE_PADDING = "border"  # a bilinear shift of a feature map repeats its edge (as crop mode's canvas does)


def velocities(direction: str) -> list[Velocity]:
    """The infinitesimal shifts measured for a ``--direction``: along it, or along x and y for a grid."""
    return VELOCITIES[direction]


def generator(h: torch.Tensor, velocity: tuple[float, float], size: tuple[int, int], method: str) -> torch.Tensor:
    """``A h``: how a map ``(N, C, h, w)`` moves when an input of ``size = (H, W)`` moves by ``t·velocity``.

    Its stride per axis is ``H / h`` and ``W / w`` (snapped as probed strides are), a function of
    the shape alone, so a map gets the same ``A`` whether it leaves one layer or enters the next.
    Maps that are not 4-D (vectors, tokens) do not move: ``A h = 0``.
    """
    if h.dim() != 4:
        return torch.zeros_like(h)
    sy, sx = _snap(size[0] / h.shape[-2]), _snap(size[1] / h.shape[-1])
    vx, vy = velocity[0] / sx, velocity[1] / sy
    if method == "fourier":
        return fourier_shift_derivative(h, vx, vy)
    return bilinear_shift_derivative(h, vx, vy, FEATURE_PADDING)


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules without submodules, by path: the layers the attribution splits the network into."""
    return [(name, module) for name, module in model.named_modules() if name and not any(module.children())]


def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(class_logits(model(x)), dim=1)


@dataclass
class Attribution:
    """Per image: ``total`` = ``‖L p‖``, ``contributions`` = ``c_l`` per leaf call (forward order),
    ``unattributed`` = ``total - Σ_l c_l``."""

    total: torch.Tensor
    contributions: dict[str, torch.Tensor]
    unattributed: torch.Tensor


@dataclass
class _Hooks:
    """Pre- and forward hooks on every leaf: the pre-hook takes the layer's own Lie derivative
    ``e_l`` at its input, the forward hook returns ``f_l(h) + ε_l·e_l`` with a zero ``ε_l`` per image."""

    x: torch.Tensor
    x_tangent: torch.Tensor
    velocity: tuple[float, float]
    size: tuple[int, int]
    method: str
    names: dict[nn.Module, str]
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    pending: dict[nn.Module, tuple[str, torch.Tensor] | None] = field(default_factory=dict)
    eps: dict[str, torch.Tensor] = field(default_factory=dict)
    busy: bool = False  # inside a hook's own call of the layer: nothing to record

    def before(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if self.busy:
            return
        name = self.names[module]
        self.calls[name] += 1
        self.pending[module] = None
        if not inputs or not all(isinstance(i, torch.Tensor) and i.is_floating_point() for i in inputs):
            return  # a layer of integer or non-tensor inputs: its part stays unattributed
        primals = tuple(i.detach().clone() for i in inputs)  # in-place layers must not change the real input
        tangents = tuple(self.x_tangent if i is self.x else generator(p, self.velocity, self.size, self.method)
                         for i, p in zip(inputs, primals))
        self.busy = True
        try:
            with torch.no_grad():
                out, moved = _jvp(module, primals, tangents, f"layer {name}")
        finally:
            self.busy = False
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            own = moved - generator(out, self.velocity, self.size, self.method)
            self.pending[module] = (_call_key(name, self.calls[name]), own)

    def after(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if self.busy:
            return None
        found = self.pending.pop(module, None)
        if found is None or not isinstance(output, torch.Tensor) or output.shape != found[1].shape:
            return None
        key, own = found
        eps = torch.zeros((output.shape[0],) + (1,) * (output.dim() - 1), dtype=output.dtype, device=output.device,
                          requires_grad=True)
        self.eps[key] = eps
        return output + eps * own


def _jvp(function: Any, primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...], what: str) -> Any:
    """``torch.func.jvp``, its failures (an operation without a forward-mode rule) as one line."""
    try:
        return jvp(function, primals, tangents)
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--attribution lie: {what} cannot be differentiated in forward mode ({first})") from exc


def leaf_calls(model: nn.Module, size: int, device: torch.device | str) -> list[str]:
    """The call keys (``name``, ``name#2``...) of every leaf call of a blank forward pass, in order."""
    names = {module: name for name, module in leaf_modules(model)}
    calls: dict[str, int] = defaultdict(int)
    order: list[str] = []

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        calls[names[module]] += 1
        if isinstance(output, torch.Tensor):
            order.append(_call_key(names[module], calls[names[module]]))

    handles = [module.register_forward_hook(record) for module in names]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return order


def attribute(
    model: nn.Module, x: torch.Tensor, x_tangent: torch.Tensor, velocity: tuple[float, float], method: str,
) -> Attribution:
    """The Lie attribution of a batch of views ``x`` whose derivative under the shift is ``x_tangent``.

    ``method``: ``fourier`` or ``bilinear``, the generator of feature maps (see ``generator``).
    Runs with autograd on even inside ``inference_mode``; the model is left as it was.
    """
    size = (x.shape[-2], x.shape[-1])
    with torch.inference_mode(False), torch.enable_grad():
        x, x_tangent = x.clone(), x_tangent.clone()  # ordinary tensors: inference tensors cannot enter autograd
        with torch.no_grad():
            _, moved = _jvp(lambda v: probabilities(model, v), (x,), (x_tangent,), "the model")
        total = torch.linalg.vector_norm(moved.flatten(1), dim=1)
        direction = torch.where(total[:, None] > 0, moved / total.clamp_min(torch.finfo(moved.dtype).tiny)[:, None], 0.0)
        leaves = leaf_modules(model)
        hooks = _Hooks(x, x_tangent, velocity, size, method, {module: name for name, module in leaves})
        handles = [h for _, m in leaves for h in (m.register_forward_pre_hook(hooks.before),
                                                  m.register_forward_hook(hooks.after))]
        try:
            projected = (direction * probabilities(model, x)).sum()
        finally:
            for handle in handles:
                handle.remove()
        keys = list(hooks.eps) if projected.requires_grad else []  # no leaf output reached the output
        grads = torch.autograd.grad(projected, [hooks.eps[k] for k in keys], allow_unused=True) if keys else []
    contributions = {k: torch.zeros_like(total) if g is None else g.flatten(1).sum(1) for k, g in zip(keys, grads)}
    attributed = torch.stack(list(contributions.values())).sum(0) if contributions else torch.zeros_like(total)
    return Attribution(total.detach(), contributions, (total - attributed).detach())


class LieAttribution:
    """``--attribution lie`` for one model on one shift plan: its metric keys, and ``add`` for a batch."""

    def __init__(self, model: nn.Module, plan: ShiftPlan, directions: Sequence[Velocity], probed: Sequence[LayerInfo],
                 device: torch.device | str, label: str = "the model") -> None:
        if isinstance(model, torch.jit.ScriptModule):
            raise UserError(f"--attribution lie: {label} is TorchScript, which takes no hooks")
        if any(layer.channels_last for layer in probed):
            raise UserError(f"--attribution lie: {label} has channels-last (N, H, W, C) maps; "
                            f"the Lie attribution shifts (N, C, H, W) maps only")
        self.model, self.plan, self.directions = model, plan, list(directions)
        self.calls = leaf_calls(model, plan.size, device)
        called = set(self.calls)
        self.layers = [layer for layer in probed if layer.name in called]  # strides for the rows

    @property
    def keys(self) -> list[tuple[str, Velocity, str]]:
        """Every (layer, direction, metric) the attribution fills, output rows first."""
        keys = []
        for v in self.directions:
            keys += [(OUTPUT_LAYER, v, LIE_DERIVATIVE), (OUTPUT_LAYER, v, LIE_UNATTRIBUTED)]
            keys += [(call, v, LIE_CONTRIBUTION) for call in self.calls]
        return keys

    def add(self, canvases: torch.Tensor, state: Any) -> None:
        """Attribute one image batch along each direction into ``state`` (float32, whatever ``--precision``)."""
        x = self.plan.view(canvases, (0, 0)).float()
        for v in self.directions:
            found = attribute(self.model, x, self.plan.view_derivative(canvases, v).float(), v, self.plan.continuous)
            state.add((OUTPUT_LAYER, v, LIE_DERIVATIVE), found.total)
            known = {call: found.contributions.get(call, torch.zeros_like(found.total)) for call in self.calls}
            for call, values in known.items():
                state.add((call, v, LIE_CONTRIBUTION), values)
            state.add((OUTPUT_LAYER, v, LIE_UNATTRIBUTED), found.total - torch.stack(list(known.values())).sum(0)
                      if known else found.total)
