"""Figures of transinv results: output metrics against shift, per-layer heatmaps, (dx, dy) maps.

Everything is drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so no display is
needed and pyplot's global state is never touched (safe inside a CLI, a server or a notebook).
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure, SubFigure
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from ..engine import metrics as M
from ..metric_registry import is_proportion, spec
from ..errors import UserError
from .results import TEXT_COLUMNS, atomic_target

NEEDED = ["model", "mode", "layer", "shift_x", "shift_y", "metric", "value"]
NUMBER_COLUMNS = ["shift_x", "shift_y", "value", "ci_low", "ci_high"]
# One line / heatmap / map per distinct combination; a column joins its label only where a model
# has several values of it (so "resnet18/blur", but not "resnet18/none" beside "vgg11/DEFAULT").
SERIES_COLUMNS = ["model", "weights", "mode", "variant"]
XLABEL = {"x": "shift (px)", "y": "shift (px), along y", "diagonal": "shift (px), dx = dy"}
CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
DPI = 110
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
MAX_PIXELS = 2**16  # per side: Agg renders only images smaller than this
LEGEND_CHAR = 0.075  # inches per legend character (small font), to widen a band for its legend
LEGEND_SHARE = 0.3  # longer legend labels wrap at this share of their band's width
Labels = Mapping[str, str] | Sequence[str]


@dataclass(frozen=True)
class Section:
    """One horizontal band of the figure (a row of panels of one kind) and the size it needs."""

    description: str
    width: float
    height: float
    draw: Callable[[SubFigure], None]


def plot_results(
    rows: pd.DataFrame,
    path: str | Path,
    metric: str | None = None,
    layer: str | None = None,
    *,
    labels: Labels | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | str | None = None,
    dpi: int | None = None,
) -> list[str]:
    """Draw the result rows into one figure saved at ``path`` (format from its suffix).

    Non-grid shifts: output metrics against shift (one panel per metric) and per-layer heatmaps
    (layers x shifts, one per model). Grid shifts: (dx, dy) maps of one output metric replace the
    line panels. ``metric`` keeps only that metric; ``layer`` draws that layer's metrics against
    shift (a map in grid mode) instead of the heatmaps. ``labels``, ``title``, ``figsize`` and
    ``dpi``: see ``draw_results``. Returns one description per band drawn. Raises ``ValueError``
    (one line) when the rows hold nothing to draw for the request or a style value is bad.
    """
    fig, descriptions = draw_results(rows, metric, layer, labels=labels, title=title, figsize=figsize, dpi=dpi)
    save_figure(fig, Path(path))
    return descriptions


def draw_results(
    rows: pd.DataFrame,
    metric: str | None = None,
    layer: str | None = None,
    *,
    labels: Labels | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | str | None = None,
    dpi: int | None = None,
) -> tuple[Figure, list[str]]:
    """The figure ``plot_results`` saves, laid out, with one description per band (for notebooks).

    ``labels`` renames series (a model, or ``model/variant`` where a model has several): a mapping
    from series name to display label, or one label per series in order of first appearance.
    ``title`` is the figure's title; ``figsize`` its ``(width, height)`` in inches, or ``"W,H"``
    (default: what the panels need); ``dpi`` its pixels per inch (default 110). Legends sit
    outside the axes and titles are wrapped to their panel's width, so neither covers data.
    """
    size, dots = _figsize(figsize), figure_dpi(dpi)
    data = _prepare(rows, labels)
    sections = _sections(data, metric, layer)
    natural = (max(s.width for s in sections), sum(s.height for s in sections))
    width, height = size or natural
    if max(width, height) * dots >= MAX_PIXELS:
        raise ValueError(f"a {width:g} x {height:g} in figure at {dots} dpi is not under {MAX_PIXELS} pixels a side")
    fig = Figure(figsize=(width, height), dpi=dots, layout="constrained")
    FigureCanvasAgg(fig)
    bands = fig.subfigures(len(sections), 1, height_ratios=[s.height for s in sections], squeeze=False)[:, 0]
    for section, band in zip(sections, bands):
        if section.width < natural[0] - 0.5:  # keep a narrower band at its own share of the width, on the left
            band = band.subfigures(1, 2, width_ratios=[section.width, natural[0] - section.width])[0]
        section.draw(band)
    heading = [title] if title else []
    partial = "partial" in data and data["partial"].astype(str).str.lower().eq("true").any()
    if partial:
        heading.append("partial results: the run was interrupted")
    if heading:
        text = fig.suptitle("\n".join(heading), color="firebrick" if partial else "black")
        _wrap(text, 0.95 * fig.bbox.width)
    fit_titles(fig, natural)
    return fig, [s.description for s in sections]


def fit_titles(fig: Figure, natural: tuple[float, float] | None = None) -> None:
    """Lay a constrained figure out and wrap each panel title to its panel's width (``natural``:
    the size the panels need, named when the figure is too small for them)."""
    with _layout_fits(natural):
        fig.draw_without_rendering()  # lay out once, so titles can be wrapped to their axes' width
        for ax in fig.axes:
            _wrap(ax.title, ax.get_window_extent().width)
        fig.draw_without_rendering()  # the taller titles must still leave the panels room


def plot_style(
    labels: Sequence[str] | None = None, title: str | None = None, figsize: str | None = None, dpi: int | None = None
) -> dict[str, object]:
    """``plot_results`` keywords from the command line's ``--label``, ``--title``, ``--figsize`` and
    ``--dpi`` (only those given), checked before any work. Each ``--label`` is ``OLD=NEW`` (split at
    the first ``=``), or every one is a bare label, in series order; ``ValueError`` otherwise."""
    style: dict[str, object] = {}
    if labels:
        pairs = [label.partition("=") for label in labels]
        if all(sep for _, sep, _ in pairs):
            style["labels"] = {old: new for old, _, new in pairs}
        elif not any(sep for _, sep, _ in pairs):
            style["labels"] = list(labels)
        else:
            raise ValueError("--label takes OLD=NEW pairs or bare labels in series order, not a mix of both")
    if title is not None:
        style["title"] = title
    if figsize is not None:
        style["figsize"] = _figsize(figsize)
    if dpi is not None:
        style["dpi"] = figure_dpi(dpi)
    return style


def _figsize(value: tuple[float, float] | str | None) -> tuple[float, float] | None:
    """``(width, height)`` in inches from a pair or ``"W,H"``; both finite and positive."""
    if value is None:
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        width, height = (float(v) for v in parts)
    except (TypeError, ValueError):
        width = height = math.nan
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        shown = value if isinstance(value, str) else ",".join(map(str, value))
        raise ValueError(f"figsize {shown!r}: give a positive width and height in inches, e.g. 8,5")
    return width, height


def figure_dpi(value: int | None) -> int:
    """Pixels per inch: a positive whole number (default ``DPI``)."""
    if value is None:
        return DPI
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"dpi {value!r}: give a positive whole number of pixels per inch, e.g. 150")
    return int(value)


def figure_file(path: str | Path, dpi: int | None = None) -> tuple[Path, int]:
    """A figure's file and pixels per inch, checked before any work: the suffix names PNG, PDF or
    SVG (the format follows it) and ``dpi`` is positive (default ``DPI``); ``UserError`` otherwise."""
    path = Path(path)
    if path.suffix.lower() not in FIGURE_SUFFIXES:
        raise UserError(f"{path}: name a .png, .pdf or .svg file (the format follows the suffix)")
    try:
        return path, figure_dpi(dpi)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@contextmanager
def _layout_fits(natural: tuple[float, float] | None = None) -> Iterator[None]:
    """Turn matplotlib's warning that the layout collapsed (a figure too small for its panels)
    into a one-line ``ValueError`` naming the size the panels need, when known."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="constrained_layout not applied", category=UserWarning)
        try:
            yield
        except UserWarning as exc:
            need = f"{math.ceil(natural[0])},{math.ceil(natural[1])}" if natural else "a larger one"
            raise ValueError(f"the figure is too small for its panels ({str(exc).split('.')[0]}): try figsize {need}") from None


def _wrap(text: Text, width: float) -> None:
    """Break ``text`` so no line is wider than ``width`` display pixels: after spaces, slashes,
    colons, commas or underscores where possible, anywhere in a word too long for a line."""
    renderer = text.figure.canvas.get_renderer()
    font = text.get_fontproperties()

    def fits(line: str) -> bool:
        return renderer.get_text_width_height_descent(line.rstrip(), font, ismath=False)[0] <= width

    lines = []
    for paragraph in text.get_text().split("\n"):
        line = ""
        for piece in re.split(r"(?<=[ /:,_])", paragraph):
            if fits(line + piece):
                line += piece
                continue
            if line.strip():
                lines.append(line.rstrip())
            line = piece
            if not fits(piece):  # a word wider than a line: break it anywhere
                line = ""
                for char in piece:
                    if line and not fits(line + char):
                        lines.append(line)
                        line = ""
                    line += char
        lines.append(line.rstrip())
    text.set_text("\n".join(lines))


def _prepare(rows: pd.DataFrame, labels: Labels | None = None) -> pd.DataFrame:
    """A copy with float shifts and values, text labels, a ``series`` label (renamed by ``labels``)
    and a ``position`` on the shift axis."""
    missing = [c for c in NEEDED if c not in rows.columns]
    if missing:
        raise ValueError(f"not transinv result rows (missing columns: {', '.join(missing)})")
    if rows.empty:
        raise ValueError("no result rows to plot")
    data = rows.copy()
    for column in NUMBER_COLUMNS:
        if column in data:
            data[column] = pd.to_numeric(data[column], errors="coerce").astype(float)
    for column in TEXT_COLUMNS:
        if column in data:
            data[column] = data[column].astype(object).where(data[column].notna(), "").astype(str)
    data["series"] = data["model"]
    for column in SERIES_COLUMNS[1:]:
        if column in data and data.groupby("model")[column].nunique().max() > 1:
            data["series"] = data["series"] + np.where(data[column] != "", "/" + data[column], "")
    if labels is not None:
        data["series"] = data["series"].map(_display_names(list(pd.unique(data["series"])), labels))
    data["position"] = data["shift_y"] if _direction(data) == "y" else data["shift_x"]
    colours = {name: f"C{i % 10}" for i, name in enumerate(pd.unique(data["series"]))}
    data["colour"] = data["series"].map(colours)  # one colour per series in every panel
    return data


def _display_names(series: list[str], labels: Labels) -> dict[str, str]:
    """Series name -> display label: ``labels`` maps some names, or lists one label per series in
    order; unknown names, a wrong count or two series shown alike are errors."""
    known = ", ".join(series)
    if isinstance(labels, Mapping):
        unknown = [name for name in labels if name not in series]
        if unknown:
            raise ValueError(f"label for {unknown[0]!r}, which is not a series here; series: {known}")
        names = {name: str(labels.get(name, name)) for name in series}
    elif isinstance(labels, str) or len(labels) != len(series):
        count = 1 if isinstance(labels, str) else len(labels)
        raise ValueError(f"{count} label(s) for {len(series)} series ({known}): give one per series, in this order")
    else:
        names = dict(zip(series, map(str, labels)))
    shown = list(names.values())
    twice = next((label for label in shown if shown.count(label) > 1), None)
    if twice is not None:
        raise ValueError(f"two series would both be labelled {twice!r}; series: {known}")
    return names


def _direction(data: pd.DataFrame) -> str:
    """x, y, diagonal or grid, read off the shifts present (grid: any other mix of dx and dy)."""
    shifts = data[["shift_x", "shift_y"]].dropna()
    if (shifts["shift_y"] == 0).all():
        return "x"
    if (shifts["shift_x"] == 0).all():
        return "y"
    if (shifts["shift_x"] == shifts["shift_y"]).all():
        return "diagonal"
    return "grid"


def _sections(data: pd.DataFrame, metric: str | None, layer: str | None) -> list[Section]:
    """Decide which bands to draw for the request, checking that it names something present."""
    if metric is not None and metric not in set(data["metric"]):
        raise ValueError(f"no {metric!r} rows to plot; available metrics: {', '.join(pd.unique(data['metric']))}")
    if layer is not None and layer not in set(data["layer"]):
        raise ValueError(f"no layer {layer!r} in the rows; available layers: {', '.join(pd.unique(data['layer']))}")
    if metric == M.WORST_CASE_ACCURACY and layer in (None, M.OUTPUT_LAYER):
        return [_bar_section(data, metric)]
    direction = _direction(data)
    grid = direction == "grid"
    if layer is not None:
        at = data[data["layer"] == layer]
        shown = [m for m in _shifted_metrics(at) if m == metric or (metric is None and _drawn_by_default(m))]
        if not shown:
            wanted = f"{metric!r} rows" if metric else "rows"
            present = ", ".join(pd.unique(at["metric"]))
            raise ValueError(f"layer {layer!r} has no {wanted} against shift; its metrics: {present}")
        if grid:
            return [_map_section(data, layer, _map_default(shown))]
        return [_line_section(data, layer, shown, direction)]
    output = _shifted_metrics(data[data["layer"] == M.OUTPUT_LAYER])
    inner = _shifted_metrics(data[data["layer"] != M.OUTPUT_LAYER])
    if metric is not None:
        output, inner = [m for m in output if m == metric], [m for m in inner if m == metric]
    else:
        inner = [m for m in inner if _drawn_by_default(m)]
    sections = []
    if output:
        sections.append(
            _map_section(data, M.OUTPUT_LAYER, _map_default(output))
            if grid
            else _line_section(data, M.OUTPUT_LAYER, output, direction)
        )
    if inner:
        sections.append(_heatmap_section(data, inner, direction))
    if not sections:
        raise ValueError(f"nothing to plot against shift; metrics present: {', '.join(pd.unique(data['metric']))}")
    return sections


def _drawn_by_default(metric: str) -> bool:
    """Per-layer metrics drawn when none is named: the two headline ones (the resampled, interior
    and in-place errors are drawn when named, so a default figure keeps its size)."""
    return metric not in (M.EQUIVARIANCE_ERROR_RESAMPLED, M.EQUIVARIANCE_ERROR_INTERIOR, M.INPLACE_CHANGE)


def _shifted_metrics(rows: pd.DataFrame) -> list[str]:
    """Metrics with rows at some shift, in order of appearance (worst_case_accuracy has none; the
    Lie rows' shift columns hold a direction, not a shift, so they are not drawn against shift)."""
    shifted = pd.unique(rows.loc[rows["shift_x"].notna(), "metric"])
    return [m for m in shifted if not (spec(m) is not None and spec(m).attribution)]


def _map_default(metrics: list[str]) -> str:
    """The metric a (dx, dy) map shows when none is named: agreement at the output, pooled error inside."""
    return next((m for m in (M.TOP1_AGREEMENT, M.POOLED_INVARIANCE_ERROR) if m in metrics), metrics[0])


def _line_section(data: pd.DataFrame, layer: str, metrics: list[str], direction: str) -> Section:
    """One panel per metric of ``layer`` against shift, one line per series (with a CI band if present)."""
    at = data[data["layer"] == layer]
    ncols = 2 if len(metrics) == 4 else min(len(metrics), 3)
    nrows = math.ceil(len(metrics) / ncols)
    bands = [c for c in ("ci_low", "ci_high") if c in at]
    span = (data["position"].min() - 0.5, data["position"].max() + 0.5)  # every panel spans every shift

    legend = {name: name + _worst_case(at, name, metrics) for name in pd.unique(at["series"])}

    def draw(band: SubFigure) -> None:
        axes = band.subplots(nrows, ncols, squeeze=False).ravel()
        handles = {}
        for ax, metric in zip(axes, metrics):
            rows = at[at["metric"] == metric]
            for series, group in rows.groupby("series", sort=False):
                curve = group.groupby("position")[["value", *bands]].mean()
                colour = group["colour"].iloc[0]
                (handles[series],) = ax.plot(curve.index, curve["value"], marker="o", color=colour, label=series)
                if len(bands) == 2:
                    low, high = curve["ci_low"], curve["ci_high"]
                    ax.fill_between(curve.index, low, high, color=colour, alpha=0.2, linewidth=0)
            where = "" if layer == M.OUTPUT_LAYER else f" at {layer}"
            ax.set_title(f"{metric}{where} ({_modes(rows)})")
            ax.set_xlabel(XLABEL[direction])
            ax.set_xlim(*span)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if is_proportion(metric):
                ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        for ax in axes[len(metrics):]:
            ax.set_axis_off()
        shown = [name for name in legend if name in handles]  # outside the axes: it never covers a line
        key = band.legend([handles[n] for n in shown], [legend[n] for n in shown], loc="outside right upper",
                          fontsize="small")
        for text in key.get_texts():
            _wrap(text, LEGEND_SHARE * band.bbox.width)

    return Section(
        f"{', '.join(metrics)} at {layer} against shift, one line per model: {', '.join(pd.unique(at['series']))}",
        4.6 * ncols + 0.8 + LEGEND_CHAR * min(max(map(len, legend.values())), 40), 3.4 * nrows, draw,
    )


def _worst_case(rows: pd.DataFrame, series: str, metrics: list[str]) -> str:
    """A legend suffix giving the series' worst-case accuracy, when the accuracy panel is drawn."""
    if M.ACCURACY not in metrics:
        return ""
    worst = rows.loc[(rows["metric"] == M.WORST_CASE_ACCURACY) & (rows["series"] == series), "value"]
    return f" (worst-case accuracy {worst.mean():.2f})" if len(worst) else ""


def _heatmap_section(data: pd.DataFrame, metrics: list[str], direction: str) -> Section:
    """Layers (forward order) x shifts images, a row per metric and a column per series.

    A lone series puts its metrics side by side instead, unless it is a grid run, whose wide
    images (one column per (dx, dy) pair) stay stacked. Missing cells (equivariance at shifts not
    aligned with a layer's stride) stay grey.
    """
    inner = data[(data["layer"] != M.OUTPUT_LAYER) & data["shift_x"].notna() & data["metric"].isin(metrics)]
    series = list(pd.unique(inner["series"]))
    grid = direction == "grid"
    side_by_side = len(series) == 1 and not grid
    shape = (1, len(metrics)) if side_by_side else (len(metrics), len(series))
    keys = ["shift_x", "shift_y"] if grid else "position"
    tables = {}
    for name in series:
        own = inner[inner["series"] == name]
        layers = list(pd.unique(own["layer"]))
        if grid:
            shifts = sorted(set(zip(own["shift_x"], own["shift_y"])), key=lambda s: (s[1], s[0]))
            labels = [f"{dx:g},{dy:g}" for dx, dy in shifts]
        else:
            shifts = sorted(own["position"].unique())
            labels = [f"{s:g}" for s in shifts]
        for metric in metrics:
            rows = own[own["metric"] == metric]
            if len(rows):
                table = rows.pivot_table(index="layer", columns=keys, values="value", aggfunc="mean")
                tables[metric, name] = (table.reindex(index=layers, columns=shifts).to_numpy(float), layers, labels)
    most_layers = max(len(t[1]) for t in tables.values())
    most_shifts = max(len(t[2]) for t in tables.values())
    has_gaps = any(np.isnan(t[0]).any() for t in tables.values())

    def draw(band: SubFigure) -> None:
        axes = band.subplots(*shape, squeeze=False)
        for i, metric in enumerate(metrics):
            norm = _norm(metric, inner.loc[inner["metric"] == metric, "value"])
            row = [axes[0, i]] if side_by_side else list(axes[i])
            for ax, name in zip(row, series):
                if (metric, name) not in tables:
                    ax.set_axis_off()
                    ax.set_title(f"{metric}: {name} (no rows)")
                    continue
                table, layers, labels = tables[metric, name]
                ax.imshow(np.ma.masked_invalid(table), aspect="auto", cmap=CMAP, norm=norm, interpolation="nearest")
                _label_ticks(ax.set_yticks, layers, most=80, fontsize=9 if len(layers) <= 25 else 7)
                if grid:
                    _label_ticks(ax.set_xticks, labels, most=48, rotation=90, fontsize=7)
                else:
                    _label_ticks(ax.set_xticks, labels)
                ax.set_ylabel("layer")
                ax.set_xlabel("shift (px): dx,dy" if grid else XLABEL[direction])
                ax.set_title(f"{metric}: {name} ({_modes(inner[inner['series'] == name])})")
            band.colorbar(ScalarMappable(norm, CMAP), ax=row, label=metric, shrink=0.9)
        if has_gaps:
            note = "grey: not measured (equivariance_error exists only at shifts aligned with the layer's stride)"
            _wrap(band.supxlabel(note, fontsize="small", color="dimgrey"), 0.95 * band.bbox.width)

    cell_width = min(max(2.5 + 0.32 * most_shifts, 4.5), 10.0)
    cell_height = min(max(1.6 + 0.2 * most_layers, 3.0), 15.0)
    colorbars = len(metrics) if side_by_side else 1  # per row of heatmaps
    return Section(
        f"{', '.join(metrics)} heatmap(s), layers x shifts, one per model: {', '.join(series)}",
        cell_width * shape[1] + 1.2 * colorbars, cell_height * shape[0] + 0.4 * has_gaps, draw,
    )


def _map_section(data: pd.DataFrame, layer: str, metric: str) -> Section:
    """(dx, dy) maps of one metric at one layer, one per series on a shared colour scale.

    dx runs along the x axis and dy up the y axis (positive dy moves image content down).
    """
    rows = data[(data["layer"] == layer) & (data["metric"] == metric) & data["shift_x"].notna()]
    xs, ys = sorted(rows["shift_x"].unique()), sorted(rows["shift_y"].unique())
    series = list(pd.unique(rows["series"]))
    ncols = min(len(series), 3)
    nrows = math.ceil(len(series) / ncols)

    def draw(band: SubFigure) -> None:
        axes = band.subplots(nrows, ncols, squeeze=False).ravel()
        norm = _norm(metric, rows["value"])
        for ax, name in zip(axes, series):
            own = rows[rows["series"] == name]
            table = own.pivot_table(index="shift_y", columns="shift_x", values="value", aggfunc="mean")
            table = table.reindex(index=ys, columns=xs).to_numpy(float)
            ax.imshow(np.ma.masked_invalid(table), origin="lower", cmap=CMAP, norm=norm, interpolation="nearest")
            _label_ticks(ax.set_xticks, [f"{x:g}" for x in xs])
            _label_ticks(ax.set_yticks, [f"{y:g}" for y in ys])
            ax.set_xlabel("dx shift (px)")
            ax.set_ylabel("dy shift (px)")
            where = "" if layer == M.OUTPUT_LAYER else f" at {layer}"
            ax.set_title(f"{metric}{where}: {name} ({_modes(own)})")
        for ax in axes[len(series):]:
            ax.set_axis_off()
        band.colorbar(ScalarMappable(norm, CMAP), ax=list(axes[: len(series)]), label=metric, shrink=0.9)

    return Section(
        f"{metric} at {layer} over (dx, dy), one map per model: {', '.join(series)}",
        4.4 * ncols + 1.2, 4.0 * nrows, draw,
    )


def _bar_section(data: pd.DataFrame, metric: str) -> Section:
    """One bar per series for a metric with no shift (worst_case_accuracy)."""
    rows = data[data["metric"] == metric]
    values = rows.groupby("series", sort=False)["value"].mean()
    colours = rows.groupby("series", sort=False)["colour"].first()

    def draw(band: SubFigure) -> None:
        ax = band.subplots()
        bars = ax.bar(range(len(values)), values.to_numpy(), color=colours.to_numpy())
        ax.bar_label(bars, fmt="%.2f")
        tilt = {"rotation": 30, "ha": "right"} if len(values) > 3 else {}
        ax.set_xticks(range(len(values)), values.index, **tilt)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{metric} ({_modes(rows)})")
        ax.grid(axis="y", alpha=0.3)

    return Section(f"{metric} per model: {', '.join(values.index)}", max(4.6, 1.0 * len(values)), 3.6, draw)


def _norm(metric: str, values: pd.Series) -> Normalize:
    """A colour scale shared by all images of one metric: 0..1 for fractions, else the data's range."""
    if is_proportion(metric):
        return Normalize(0.0, 1.0)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    return Normalize(low, high if high > low else low + 1.0)


def _label_ticks(set_ticks: Callable[..., object], labels: list[str], most: int = 16, **text: object) -> None:
    """Tick and label at most ``most`` evenly spaced cells so the labels never overlap."""
    positions = range(0, len(labels), math.ceil(len(labels) / most))
    set_ticks(positions, [labels[i] for i in positions], **text)


def _modes(rows: pd.DataFrame) -> str:
    """The shift mode(s) of the rows, for titles."""
    return ", ".join(m for m in pd.unique(rows["mode"]) if m) or "mode unknown"


def save_figure(fig: Figure, path: Path) -> None:
    """Render the figure to ``path`` atomically (no half-written images), at the figure's dpi."""
    with atomic_target(path) as tmp, _layout_fits():
        fig.savefig(tmp, format=path.suffix[1:].lower() or "png", dpi="figure")
