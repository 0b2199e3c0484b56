"""The images whose class flips most easily (``transinv flips``): ranked from a ``--per-image``
file, drawn as a contact sheet of their reference views with the shift and the two classes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..engine.data import Preprocess, load_canvas
from ..errors import UserError
from .per_image import COLUMNS
from .plots import figure_dpi, figure_file, fit_titles, save_figure

KEYS = ["model", "variant", "image"]
RANKED = [*KEYS, "shift_x", "shift_y", "distance", "flips", "shifts", "share", "reference_class",
          "reference_class_name", "reference_prob", "shifted_class", "shifted_class_name", "shifted_prob",
          "label", "label_name", "size", "resize"]
TILE = (2.4, 2.9)  # inches per tile: the image and three lines of title
TILE_PIXELS = 192  # a tile's image is decoded at least this large


def load_per_image(path: str | Path) -> pd.DataFrame:
    """A ``--per-image`` CSV; anything else is a one-line ``UserError`` naming the file."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"model": str, "variant": str, "image": str, "label_name": str,
                                         "reference_class_name": str, "shifted_class_name": str})
    except OSError as error:
        raise UserError(f"{path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise UserError(f"{path}: not a --per-image file ({str(error).strip().splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: not a --per-image file (missing columns: {', '.join(missing)}); "
                        "write one with transinv measure ... --per-image FILE")
    return frame


def rank_flips(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, variant, image) whose top-1 class changes at some shift, easiest first:
    by the length ``|d| = sqrt(dx² + dy²)`` of the shortest shift that flips it (its first such
    shift in file order is the one named), then by the larger share of its non-zero shifts that
    flip it, then in file order. Images that never flip are left out."""
    data = frame.reset_index(drop=True).assign(_order=lambda f: np.arange(len(f)))
    data["flipped"] = data["flipped"].astype(str).str.lower() == "true"
    data["distance"] = np.hypot(data["shift_x"].astype(float), data["shift_y"].astype(float))
    moved = data[data["distance"] > 0]
    counts = moved.groupby(KEYS, sort=False)["flipped"].agg(flips="sum", shifts="size").reset_index()
    first = moved[moved["flipped"]].sort_values(["distance", "_order"], kind="stable").drop_duplicates(KEYS)
    ranked = first.merge(counts, on=KEYS)
    ranked["share"] = ranked["flips"] / ranked["shifts"]
    ranked = ranked.sort_values(["distance", "share", "_order"], ascending=[True, False, True], kind="stable")
    return ranked[RANKED].reset_index(drop=True)


def _name(name: object, index: object) -> str:
    """A class's name, or ``class N`` where the file has none (not an ImageNet output)."""
    return name if isinstance(name, str) and name else f"class {index}"


def _reference_view(row: pd.Series) -> np.ndarray | None:
    """The image's standard view (resize, centre crop: the region the model saw at shift 0) as RGB
    in 0..1, decoded at ``TILE_PIXELS`` or more so small views stay sharp; None if unreadable."""
    scale = max(1, math.ceil(TILE_PIXELS / int(row["size"])))
    pre = Preprocess(int(row["resize"]) * scale, int(row["size"]) * scale, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    try:
        return load_canvas(Path(row["image"]), pre, pre.size).clamp(0, 1).permute(1, 2, 0).numpy()
    except (OSError, ValueError):
        return None


def draw_flips(ranked: pd.DataFrame, top: int = 12, *, title: str | None = None, dpi: int | None = None) -> Figure:
    """The contact sheet of the first ``top`` ranked images: each tile the reference view, the
    shift that flips it, the two classes and how many of its shifts flip it."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise UserError(f"--top must be a whole number of at least 1 (got {top!r})")
    if ranked.empty:
        raise UserError("no image changes its top-1 class at any shift: nothing to draw")
    shown = ranked.head(top)
    several = len(ranked[["model", "variant"]].drop_duplicates()) > 1  # then each tile names its series
    columns = min(len(shown), 4)
    rows = math.ceil(len(shown) / columns)
    fig = Figure(figsize=(TILE[0] * columns, TILE[1] * rows + 0.5), dpi=figure_dpi(dpi), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (_, row) in zip(axes, shown.iterrows()):
        pixels = _reference_view(row)
        if pixels is None:
            ax.text(0.5, 0.5, "image not readable", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(pixels)
        series = f"{row['model']}" + ("" if row["variant"] == "base" else f" [{row['variant']}]") + ", " if several else ""
        ax.set_title(
            f"{Path(row['image']).name}\n{series}d = ({row['shift_x']:g}, {row['shift_y']:g}): "
            f"{_name(row['reference_class_name'], row['reference_class'])} -> "
            f"{_name(row['shifted_class_name'], row['shifted_class'])}\n"
            f"flips at {row['flips']} of {row['shifts']} shifts", fontsize="small")
        ax.set_axis_off()
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    fig.suptitle(title or f"The {len(shown)} images that flip most easily (of {len(ranked)} that flip)")
    fit_titles(fig)
    return fig


def plot_flips(per_image: str | Path | pd.DataFrame, path: str | Path, top: int = 12, *,
               title: str | None = None, dpi: int | None = None) -> pd.DataFrame:
    """Rank a ``--per-image`` file (or frame) and draw its contact sheet to ``path`` (PNG, PDF or
    SVG, atomically); returns the ranked rows drawn."""
    target = figure_file(path, dpi)[0]
    frame = per_image if isinstance(per_image, pd.DataFrame) else load_per_image(per_image)
    ranked = rank_flips(frame)
    save_figure(draw_flips(ranked, top, title=title, dpi=dpi), target)
    return ranked.head(top)
