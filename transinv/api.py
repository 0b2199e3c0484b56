"""The library entry points a notebook or the CLI calls: ``measure`` and ``list_layers``."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import pandas as pd
from torch import nn

from . import metrics as M
from .data import Preprocess, find_images, select_images
from .errors import UserError
from .layers import Probe, probe_layers, select_layers
from .models import LoadedModel, default_preprocess, load_model
from .results import Result, born_at, make_rows
from .runner import Measurement, RunState, make_loader, resolve_device
from .shifts import ShiftPlan, check_shifts, make_shifts, parse_shift_values

Warn = Callable[[str], None]


def _stderr_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Overrides:
    """User overrides of the weights' preprocessing (``None`` keeps the weights' own value)."""

    size: int | None = None
    resize: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    def check(self) -> None:
        """Reject impossible values before any model is built."""
        for name, value in (("mean", self.mean), ("std", self.std)):
            if value is not None and len(value) != 3:
                raise UserError(f"--{name} takes three numbers (R,G,B), got {len(value)}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise UserError("--std values must be positive")
        for name, value in (("size", self.size), ("resize", self.resize)):
            if value is not None and value < 1:
                raise UserError(f"--{name} must be a positive number of pixels")

    def apply(self, pre: Preprocess) -> Preprocess:
        self.check()
        size = self.size or pre.size
        resize = self.resize or (max(pre.resize, size) if self.size else pre.resize)
        return replace(
            pre,
            size=size,
            resize=resize,
            mean=tuple(self.mean) if self.mean is not None else pre.mean,
            std=tuple(self.std) if self.std is not None else pre.std,
        )


def prepare_model(
    model: str | nn.Module, weights: str = "DEFAULT", seed: int = 0, overrides: Overrides = Overrides()
) -> LoadedModel:
    """Load a model spec (or wrap a module from a notebook) and settle its preprocessing."""
    if isinstance(model, nn.Module):
        loaded = LoadedModel(type(model).__name__, "given", model.eval(), default_preprocess())
    else:
        loaded = load_model(model, weights, seed)
    return replace(loaded, preprocess=overrides.apply(loaded.preprocess))


def list_layers(
    model: str | nn.Module,
    weights: str = "none",
    size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> pd.DataFrame:
    """The measurable layers in forward order: name, output shape, cumulative stride, default."""
    loaded = prepare_model(model, weights, seed, Overrides(size=size))
    dev = resolve_device(device)
    probe = probe_layers(loaded.module.to(dev), loaded.preprocess.size, dev)
    return pd.DataFrame(
        [
            {
                "layer": layer.name,
                "shape": f"{layer.channels}x{layer.height}x{layer.width}",
                "stride": layer.stride[1] if layer.stride[0] == layer.stride[1] else f"{layer.stride[0]}x{layer.stride[1]}",
                "channels_last": layer.channels_last,
                "default": layer.default,
            }
            for layer in probe.layers
        ],
        columns=["layer", "shape", "stride", "channels_last", "default"],
    )


def _explain_probe(loaded: LoadedModel, probe: Probe, layer_spec: str, warn: Warn) -> None:
    if loaded.scripted and layer_spec != "none":
        warn(f"{loaded.name} is TorchScript, which takes no forward hooks: measuring output metrics only")
    elif probe.token_layers and layer_spec != "none":
        warn(
            f"{loaded.name}: {len(probe.token_layers)} layers output token sequences with no spatial map "
            f"(e.g. {probe.token_layers[0]}); measuring output metrics and the 4-D maps only"
        )


def measure(
    model: str | nn.Module = "resnet18",
    *,
    weights: str = "DEFAULT",
    data: Sequence[str] | str | None = None,
    shift: str = "0..16",
    direction: str = "x",
    mode: str = "crop",
    fill: float = 0.0,
    layers: str = "default",
    size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_images: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    workers: int = 0,
    device: str = "cpu",
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    warn: Warn = _stderr_warn,
) -> Result:
    """Measure how a model's layers and output respond to shifting its input images.

    Returns a ``Result`` whose ``rows`` are tidy (one row per layer, shift and metric); see the
    README for every metric's definition. ``progress(total, start)`` may return a per-batch
    callback that receives the number of images just finished.
    """
    shifts = make_shifts(parse_shift_values(shift), direction)
    overrides = Overrides(size, resize, mean, std)
    overrides.check()
    loaded = prepare_model(model, weights, seed, overrides)
    pre = loaded.preprocess
    check_shifts(shifts, pre.size, mode, pre.resize)
    plan = ShiftPlan(shifts, pre.size, mode, fill)
    items = select_images(find_images(data), num_images, seed)
    dev = resolve_device(device)
    module = loaded.module.to(dev)
    probe = probe_layers(module, pre.size, dev)
    _explain_probe(loaded, probe, layers, warn)
    chosen = select_layers(probe, layers)
    labelled = any(item.label >= 0 for item in items)
    measurement = Measurement(module, plan, chosen, labelled, dev)
    run = RunState(M.MetricState(measurement.keys, dev))
    loader = make_loader(items, pre, plan.canvas, batch_size, workers)
    advance = progress(len(items), 0) if progress is not None else None
    measurement.run(iter(loader), run, advance)
    for message in run.skipped:
        warn(f"skipped unreadable image {message}")
    if run.images == 0 and not run.partial:
        raise UserError("no readable images: every file was skipped (see the warnings above)")
    settings = {
        "model": loaded.name,
        "weights": loaded.weights,
        "data": [str(d) for d in ([data] if isinstance(data, str) else (data or ["builtin"]))],
        "shift": shift,
        "direction": direction,
        "mode": mode,
        "fill": fill,
        "layers": layers,
        "num_images": num_images,
        "batch_size": batch_size,
        "seed": seed,
        "device": str(dev),
        "preprocess": {**asdict(pre), "interpolation": str(pre.interpolation.value)},
    }
    return _result(run, chosen, loaded, settings)


def _result(run: RunState, chosen: list, loaded: LoadedModel, settings: dict[str, Any]) -> Result:
    strides = {layer.name: layer for layer in chosen}
    records = []
    for row in run.state.rows():
        layer = strides.get(row["layer"])
        shift = (row["shift_x"], row["shift_y"])
        records.append(
            {
                "model": loaded.name,
                "weights": loaded.weights,
                "mode": settings["mode"],
                "stride": None if layer is None else layer.stride[1],
                "aligned": None if layer is None else layer.aligned(shift),
                "partial": run.partial,
                **row,
            }
        )
    rows = make_rows(records)
    summary = {
        "images": run.images,
        "skipped": len(run.skipped),
        "partial": run.partial,
        "born_at": born_at(rows),
    }
    return Result(rows=rows, settings=settings, summary=summary)
