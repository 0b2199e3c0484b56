"""Pictures of one shift of one image (``transinv show``): the two views, a layer's maps for both,
the reference map moved by ``d / s``, and where the two disagree.

The maps are captured by the hooks the measurement uses (``FeatureTap``); the error map is the
per-position part of ``equivariance_error``, and each panel's number is that metric for this image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure, SubFigure

from ..engine import metrics as M
from ..engine.data import Preprocess, class_names, load_canvas
from ..errors import UserError
from ..fixes import apply_variant
from ..engine.layers import FeatureTap, LayerInfo, probe_layers, select_layers, to_nchw
from ..models import LoadedModel
from ..options import MeasureOptions
from ..models.outputs import class_logits
from ..plan import ModelSpec, prepare_model
from .plots import CMAP, figure_dpi, figure_file, fit_titles, save_figure
from ..engine.runner import resolve_device
from ..engine.shifts import Shift, ShiftPlan, parse_fill, parse_shift_values

ERROR_CMAP = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
PANEL = 1.7  # inches per map panel


@dataclass(frozen=True)
class LayerMaps:
    """One layer's maps ``(C, h, w)`` for both views: ``reference`` f(x), ``shifted`` f(T_d x),
    ``moved`` T_k f(x) (None where ``d`` is not aligned at this layer; NaN where no reference
    position lands), the relative ``error`` map ``(h, w)`` (see ``error_map``), and ``value``, this
    image's ``equivariance_error`` (None where not aligned)."""

    layer: LayerInfo
    reference: torch.Tensor
    shifted: torch.Tensor
    moved: torch.Tensor | None
    error: torch.Tensor
    value: float | None


@dataclass(frozen=True)
class VariantMaps:
    """One variant's top-1 ``(class, probability, name)`` for the two views, and its layers' maps."""

    variant: str
    predictions: tuple[tuple[int, float, str], tuple[int, float, str]]
    layers: list[LayerMaps]


@dataclass(frozen=True)
class Shown:
    """Everything a ``show`` figure draws: the two views as RGB pixels ``(2, H, W, 3)`` in 0..1
    (reference first) and each variant's maps."""

    model: str
    weights: str
    image: Path
    shift: Shift
    mode: str
    views: np.ndarray
    variants: list[VariantMaps]

    def rows(self) -> pd.DataFrame:
        """One row per variant and layer, in forward order: this image's ``equivariance_error``
        (empty where ``d`` is not aligned), ``error_map_mean`` (the drawn map's mean over the
        positions compared) and each view's top-1 class and probability."""
        records = []
        for variant in self.variants:
            (ref_class, ref_prob, ref_name), (cls, prob, name) = variant.predictions
            for maps in variant.layers:
                finite = maps.error[torch.isfinite(maps.error)]
                records.append({
                    "model": self.model, "variant": variant.variant, "layer": maps.layer.name,
                    "stride": maps.layer.stride[1], "aligned": maps.value is not None, "shift_x": self.shift[0],
                    "shift_y": self.shift[1], "equivariance_error": maps.value,
                    "error_map_mean": float(finite.mean()) if finite.numel() else math.nan,
                    "reference_class": ref_class, "reference_class_name": ref_name, "reference_prob": ref_prob,
                    "shifted_class": cls, "shifted_class_name": name, "shifted_prob": prob,
                })
        return pd.DataFrame.from_records(records)


def parse_shift(spec: str | int | float | Sequence[int | float]) -> Shift:
    """One shift in pixels: ``dx`` or ``dx,dy`` (``3``, ``-2,4``; fractional with ``--subpixel``)."""
    parts = spec.split(",") if isinstance(spec, str) else [str(spec)] if isinstance(spec, (int, float)) else [str(v) for v in spec]
    values = []
    for part in parts:
        try:
            found = parse_shift_values(part.strip()) if part.strip() and ".." not in part else []
        except UserError:
            found = []
        if len(parts) > 2 or len(found) != 1:
            raise UserError(f"--shift {spec!r}: give one shift, dx or dx,dy in pixels (e.g. 3 or 2,-1)")
        values.append(found[0])
    return values[0], values[1] if len(values) == 2 else 0


def moved_reference(reference: torch.Tensor, k: Shift, circular: bool) -> torch.Tensor:
    """``T_k f(x)``: maps ``(..., h, w)`` moved by ``k = (kx, ky)`` feature pixels. Circular: a roll;
    otherwise the positions no reference position moves into are NaN (the region outside the
    overlap, which ``equivariance_error`` leaves out)."""
    kx, ky = int(k[0]), int(k[1])
    moved = torch.roll(reference, shifts=(ky, kx), dims=(-2, -1))
    if circular:
        return moved
    h, w = reference.shape[-2:]
    rows, cols = torch.arange(h) - ky, torch.arange(w) - kx
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    return moved.masked_fill(~inside.to(moved.device), float("nan"))


def error_map(reference: torch.Tensor, shifted: torch.Tensor, moved: torch.Tensor | None) -> torch.Tensor:
    """Per position ``|f(T_d x) − T_k f(x)|`` averaged over channels, divided by the mean ``|f(x)|``
    over channels and the same positions, so maps of different layers share one scale. NaN outside
    the overlap. ``moved`` None (not aligned): the in-place difference ``|f(T_d x) − f(x)|``."""
    target = reference if moved is None else moved
    difference = (shifted - target).abs().mean(dim=0)
    region = ~torch.isnan(difference)
    scale = target.abs().mean(dim=0)[region].mean() if region.any() else torch.zeros(())
    return difference / scale if scale > 0 else difference


def capture(
    model: ModelSpec, image: str | Path, shift: str | Shift, layer: str = "all",
    options: MeasureOptions | None = None, **keywords: Any,
) -> Shown:
    """The views and maps of ``image`` and its view at ``shift`` through ``model`` and each variant.

    ``layer``: ``all`` (every layer ``measure`` measures by default, in forward order), a layer
    name, or names and globs, comma-separated. Options come as for ``transinv.measure`` (weights,
    mode, fill, size, resize, mean, std, variants and fixes, subpixel, embed_size, seed, device).
    """
    opts = MeasureOptions.from_mapping({**(options.settings() if options else {}), **keywords}, "show()").validate()
    d = parse_shift(shift)
    path = Path(image).expanduser()
    if not path.is_file():
        raise UserError(f"{image}: no such image file")
    loaded = prepare_model(model, opts)
    if not loaded.hooks:
        raise UserError(f"{loaded.label} ({loaded.source}) takes no forward hooks: transinv show needs its layers")
    pre = loaded.preprocess
    plan = ShiftPlan(((0, 0), d), pre.size, opts.mode, parse_fill(opts.fill, pre.mean, pre.std), opts.subpixel,
                     embed=opts.embed_size)
    plan.check(pre.resize)
    try:
        canvas = load_canvas(path, plan.decoding(pre), plan.canvas)[None]
    except (OSError, ValueError) as exc:
        raise UserError(f"{image}: not a readable image ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
    device = resolve_device(opts.device)
    views = torch.cat([plan.view(canvas, (0, 0)), plan.view(canvas, d)]).to(device)
    variants = [_variant_maps(loaded, spec, views, layer, d, opts.mode == "circular", device) for spec in opts.variant_specs()]
    return Shown(loaded.label, loaded.weights, path, d, opts.mode, _pixels(views, pre), variants)


def _variant_maps(
    loaded: LoadedModel, variant: str, views: torch.Tensor, layer: str, shift: Shift, circular: bool, device: torch.device,
) -> VariantMaps:
    """One forward pass of both views through a variant, its chosen layers' maps compared."""
    module = (loaded.module if variant == "base" else apply_variant(loaded.module, variant)).to(device).eval()
    probe = probe_layers(module, views.shape[-1], device, loaded.set_size)
    try:
        layers = select_layers(probe, "default" if layer.strip() == "all" else layer)
    except UserError as exc:  # the message names measure's flag
        raise UserError(str(exc).replace("--layers:", "--layer:", 1)) from None
    if not layers:
        raise UserError(f"{loaded.label}: no layer with a spatial map to show (see `transinv layers {loaded.name}`)")
    by_name = {info.name: info for info in layers}
    maps: dict[str, torch.Tensor] = {}

    def keep(name: str, feature: torch.Tensor) -> None:  # a copy: in-place ops later may change it
        maps[name] = to_nchw(feature, by_name[name]).to("cpu", torch.float64, copy=True)

    with FeatureTap(module, list(by_name), keep), torch.inference_mode():
        logits = class_logits(module(views)).double().cpu()
    probs = torch.softmax(logits, dim=1)
    names = class_names(logits.shape[1])
    top = [(int(c), float(probs[i, c]), names[int(c)] or f"class {int(c)}") for i, c in enumerate(logits.argmax(dim=1))]
    out = []
    for info in layers:
        reference, shifted = maps[info.name][0], maps[info.name][1]
        moved, value = None, None
        if info.aligned(shift):
            k = info.feature_shift(shift)
            k = (int(k[0]), int(k[1]))
            moved = moved_reference(reference, k, circular)
            comparison = M.compare_shift(M.Reference.of(reference[None]), shifted[None], k, circular, spatial=False)
            value = float(comparison.error[0])  # the comparison `measure` makes
        out.append(LayerMaps(info, reference, shifted, moved, error_map(reference, shifted, moved), value))
    return VariantMaps(variant, (top[0], top[1]), out)


def _pixels(views: torch.Tensor, pre: Preprocess) -> np.ndarray:
    """Normalised views back to RGB in 0..1, channels last, for drawing."""
    mean = torch.tensor(pre.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(pre.std).reshape(1, 3, 1, 1)
    return (views.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


# -- drawing ------------------------------------------------------------------------------------


def _stride(layer: LayerInfo) -> str:
    sy, sx = layer.stride
    return f"{sx}" if sx == sy else f"{sy}x{sx}"


def _shift_text(shift: Shift) -> str:
    return f"({shift[0]:g}, {shift[1]:g})"


def _prediction(top: tuple[int, float, str]) -> str:
    return f"{top[2]} ({top[1]:.2g})"


def _series(shown: Shown, variant: str) -> str:
    return shown.model if variant == "base" else f"{shown.model} [{variant}]"


def _error_norm(shown: Shown) -> Normalize:
    """One colour scale for every error map of the figure: 0 to the 99th percentile of all values."""
    values = np.concatenate([lm.error.numpy().ravel() for v in shown.variants for lm in v.layers])
    finite = values[np.isfinite(values)]
    top = float(np.percentile(finite, 99)) if finite.size else 0.0
    return Normalize(0.0, top if top > 0 else 1.0)


def _image(ax: Any, pixels: np.ndarray, title: str) -> None:
    ax.imshow(pixels, interpolation="nearest")
    ax.set_title(title, fontsize="small")
    ax.set_axis_off()


def _map(ax: Any, values: torch.Tensor, title: str, norm: Normalize, cmap: Any = CMAP) -> None:
    ax.imshow(np.ma.masked_invalid(values.numpy()), cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_title(title, fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])


def _channels(maps: LayerMaps, count: int) -> list[int]:
    """The ``count`` channels of largest energy in ``f(x)``, strongest first."""
    energy = maps.reference.pow(2).sum(dim=(-2, -1))
    return energy.argsort(descending=True)[:count].tolist()


def _channel_norm(maps: LayerMaps, channel: int) -> Normalize:
    values = torch.cat([maps.reference[channel].ravel(), maps.shifted[channel].ravel()])
    low, high = float(values.min()), float(values.max())
    return Normalize(low, high if high > low else low + 1.0)


def _error_title(maps: LayerMaps, short: bool) -> str:
    """The error panel's title: the layer and E (the strip), or the formula (the detailed band);
    where ``d`` is not aligned, that the map is the in-place difference."""
    if short:
        where = f"{maps.layer.name} (s={_stride(maps.layer)})"
        return f"{where}: in place, not aligned" if maps.value is None else f"{where}: E = {maps.value:.3g}"
    if maps.value is None:
        return "in place |f(T_d x) - f(x)| (not aligned)"
    return f"error |f(T_d x) - T_k f(x)|, E = {maps.value:.3g}"


def _draw_detail(band: SubFigure, shown: Shown, variant: VariantMaps, channels: int, norm: Normalize) -> None:
    """One layer: x, T_d x and the error map down the first column; per channel, f(x), f(T_d x)
    and T_k f(x) down the others."""
    maps = variant.layers[0]
    chosen = _channels(maps, channels)
    axes = band.subplots(3, 1 + len(chosen), squeeze=False)
    _image(axes[0, 0], shown.views[0], f"x: {_prediction(variant.predictions[0])}")
    _image(axes[1, 0], shown.views[1], f"T_d x, d = {_shift_text(shown.shift)}: {_prediction(variant.predictions[1])}")
    _map(axes[2, 0], maps.error, _error_title(maps, short=False), norm, ERROR_CMAP)
    k = maps.layer.feature_shift(shown.shift) if maps.moved is not None else None
    for column, channel in enumerate(chosen, start=1):
        scale = _channel_norm(maps, channel)
        _map(axes[0, column], maps.reference[channel], f"f(x) ch {channel}", scale)
        _map(axes[1, column], maps.shifted[channel], f"f(T_d x) ch {channel}", scale)
        if maps.moved is not None and k is not None:
            _map(axes[2, column], maps.moved[channel], f"T_k f(x) ch {channel}, k = {_shift_text(k)}", scale)
        else:
            ratio = (shown.shift[0] / maps.layer.stride[1], shown.shift[1] / maps.layer.stride[0])
            axes[2, column].set_axis_off()
            axes[2, column].set_title(f"T_k f(x) ch {channel}: not aligned", fontsize="small")
            axes[2, column].text(0.5, 0.5, f"d / s = {_shift_text(ratio)}\nfeature px", ha="center", va="center",
                                 transform=axes[2, column].transAxes, fontsize="small")
    band.colorbar(ScalarMappable(norm, ERROR_CMAP), ax=axes[2, 0], label="error / mean |f(x)|", shrink=0.9)
    value = "not aligned" if maps.value is None else f"equivariance_error {maps.value:.3g}"
    band.suptitle(f"{_series(shown, variant.variant)}: {maps.layer.name}, stride {_stride(maps.layer)}, {value}",
                  fontsize="medium")


def _draw_strip(band: SubFigure, shown: Shown, variant: VariantMaps, norm: Normalize) -> None:
    """Several layers: x, T_d x, then each layer's error map in forward order."""
    axes = band.subplots(1, 2 + len(variant.layers), squeeze=False)[0]
    _image(axes[0], shown.views[0], f"x: {_prediction(variant.predictions[0])}")
    _image(axes[1], shown.views[1], f"T_d x, d = {_shift_text(shown.shift)}: {_prediction(variant.predictions[1])}")
    for ax, maps in zip(axes[2:], variant.layers):
        _map(ax, maps.error, _error_title(maps, short=True), norm, ERROR_CMAP)
    band.colorbar(ScalarMappable(norm, ERROR_CMAP), ax=list(axes[2:]), label="error / mean |f(x)|", shrink=0.9)
    band.suptitle(_series(shown, variant.variant), fontsize="medium")


def draw(shown: Shown, channels: int = 4, *, title: str | None = None, dpi: int | None = None) -> Figure:
    """The figure of ``shown``, laid out: one band per variant. One layer per variant: the detailed
    band (views, ``channels`` maps of largest energy for both views and the moved reference, the
    error map); several: the error map of each layer in forward order."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise UserError(f"--channels must be a whole number of at least 1 (got {channels!r})")
    dots = figure_dpi(dpi)
    detail = all(len(v.layers) == 1 for v in shown.variants)
    columns = 1 + min(channels, shown.variants[0].layers[0].reference.shape[0]) if detail else 2 + max(len(v.layers) for v in shown.variants)
    band_height = 3 * (PANEL + 0.35) + 0.4 if detail else PANEL + 0.8
    width, height = columns * PANEL + 1.2, band_height * len(shown.variants) + 0.5
    fig = Figure(figsize=(width, height), dpi=dots, layout="constrained")
    FigureCanvasAgg(fig)
    norm = _error_norm(shown)
    bands = fig.subfigures(len(shown.variants), 1, squeeze=False)[:, 0]
    for band, variant in zip(bands, shown.variants):
        if detail:
            _draw_detail(band, shown, variant, channels, norm)
        else:
            _draw_strip(band, shown, variant, norm)
    fig.suptitle(title or f"{shown.model} (weights {shown.weights}), {shown.image.name}: shift d = "
                 f"{_shift_text(shown.shift)} px, mode {shown.mode}")
    try:
        fit_titles(fig, (width, height))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return fig


def show(
    model: ModelSpec, image: str | Path, path: str | Path, shift: str | Shift, layer: str = "all",
    options: MeasureOptions | None = None, *, channels: int = 4, title: str | None = None, dpi: int | None = None,
    **keywords: Any,
) -> Shown:
    """Draw ``image`` and its view at ``shift`` through ``model`` into ``path`` (PNG, PDF or SVG,
    written atomically); returns what was drawn. See ``capture`` and ``draw``."""
    target = figure_file(path, dpi)[0]
    shown = capture(model, image, shift, layer, options, **keywords)
    save_figure(draw(shown, channels, title=title, dpi=dpi), target)
    return shown
