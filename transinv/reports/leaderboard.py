"""The leaderboard of a sweep: one ranked row per model (and variant) from its results directory,
and the overview figure (one labelled point per model, as in the papers' accuracy-against-
consistency plots).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .. import metric_registry as R
from ..errors import UserError
from ..sweep import DONE, FAILED, FAILED_SUFFIX, read_record, result_files

Warn = Callable[[str], None]
SET_FALLBACK = R.WORST_CASE_AGREEMENT


def _records(directory: Path) -> list[dict[str, Any]]:
    """Every model's sweep document: its done file where there is one, else its failure record."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory (give the -o directory of transinv sweep)")
    docs: dict[str, dict[str, Any]] = {}
    for path in result_files(directory):
        doc = read_record(path)
        if doc is None:
            continue
        stem = path.name.removesuffix(FAILED_SUFFIX).removesuffix(".json")
        if doc["sweep"].get("status") == DONE or stem not in docs:
            docs[stem] = doc
    if not docs:
        raise UserError(f"{directory}: holds no sweep results (written by transinv sweep -o {directory})")
    return [docs[k] for k in sorted(docs)]


def choose_headline(rows: pd.DataFrame, configs: list[str], metric: str | None, warn: Warn) -> str:
    """The metric to rank by: ``metric``, else the presets' ``headline``, else the first whole-set
    metric present, else the first output metric (registry order)."""
    from ..presets import preset_headline

    present = set(rows["metric"])
    if metric is not None:
        spec = R.spec(metric)
        if spec is None or spec.scope == "layer":
            ranked = [m for m in R.order(list(present)) if R.METRICS.get(m) and R.METRICS[m].scope != "layer"]
            raise UserError(f"--metric {metric}: rank by an output or whole-set metric of these results: {', '.join(ranked)}")
        if metric not in present:
            raise UserError(f"--metric {metric}: no results hold it (they have: {', '.join(R.order(list(present)))})")
        return metric
    headlines = []
    for config in configs:
        try:
            headlines.append(preset_headline(config))
        except UserError as exc:
            warn(f"preset {config}: {exc}")
    wanted = next((h for h in headlines if h), None)
    if wanted in present:
        return wanted  # type: ignore[return-value]
    fallback = next((m for scope in ("set", "output") for m in R.names(scope) if m in present), None)  # type: ignore[arg-type]
    if fallback is None:
        raise UserError("the results hold no output or whole-set metric to rank by")
    if wanted is not None:
        warn(f"the preset's headline {wanted} is not in the results (it needs labels?): ranking by {fallback}")
    return fallback


def _headline_row(rows: pd.DataFrame, metric: str) -> pd.Series | None:
    """The row that stands for ``metric``: the whole-set row, or the output row at the largest shift."""
    part = rows[(rows["metric"] == metric) & (rows["layer"] == R.OUTPUT_LAYER)]
    if part.empty:
        return None
    size = np.hypot(part["shift_x"].astype(float).fillna(0), part["shift_y"].astype(float).fillna(0))
    return part.loc[size.idxmax()]


def _value(rows: pd.DataFrame, metric: str, shifted: bool = False) -> float:
    """A metric's value at the output: the whole-set row, or at shift 0 (``shifted`` False)."""
    part = rows[(rows["metric"] == metric) & (rows["layer"] == R.OUTPUT_LAYER)]
    if not shifted and R.METRICS[metric].scope == "output":
        part = part[(part["shift_x"].astype(float) == 0) & (part["shift_y"].astype(float) == 0)]
    return float(part["value"].iloc[0]) if len(part) else float("nan")


def _born_at(born: list[dict[str, Any]], model: str, variant: str) -> str | None:
    """The layer named for the most shifts (ties: the one at the largest shift)."""
    mine = [b for b in born if b.get("model") == model and b.get("variant") == variant]
    if not mine:
        return None
    counts = Counter(b["layer"] for b in mine)
    best = max(counts.values())
    mine.sort(key=lambda b: np.hypot(b["shift_x"], b["shift_y"]), reverse=True)
    return next(b["layer"] for b in mine if counts[b["layer"]] == best)


def leaderboard(directory: str | Path, metric: str | None = None, warn: Warn = lambda m: None) -> tuple[pd.DataFrame, str]:
    """One row per (model, variant) of a sweep, ranked by the headline metric (its better
    direction from the registry; ties share a rank), failed models last without a rank.
    Returns the table and the headline metric's name."""
    docs = _records(Path(directory))
    done = [d for d in docs if d["sweep"].get("status") == DONE]
    hashes = {d["sweep"].get("settings_hash") for d in done}
    if len(hashes) > 1:
        warn(f"{directory} holds results of {len(hashes)} different settings: ranks compare unlike runs")
    all_rows = pd.concat([pd.DataFrame.from_records(d["rows"]) for d in done], ignore_index=True) if done else None
    configs = list(dict.fromkeys(d["settings"].get("config") for d in done if d["settings"].get("config")))
    if all_rows is None:  # every model failed: nothing to rank by
        all_rows = pd.DataFrame({"metric": [SET_FALLBACK], "layer": [R.OUTPUT_LAYER]})
    headline = choose_headline(all_rows, configs, metric, warn)
    records = []
    for doc in docs:
        record = doc["sweep"]
        if record.get("status") != DONE:
            records.append({"model": record.get("model"), "status": FAILED, "seconds": record.get("seconds"),
                            "reason": record.get("reason")})
            continue
        rows = pd.DataFrame.from_records(doc["rows"])
        per_model = doc["settings"].get("per_model", {})
        for (model, variant), part in rows.groupby(["model", "variant"], sort=False):
            row = _headline_row(part, headline)
            records.append({
                "model": model, "variant": variant, "weights": part["weights"].iloc[0],
                "parameters": per_model.get(model, {}).get("parameters"),
                "accuracy": _value(part, R.ACCURACY),
                headline: np.nan if row is None else row["value"],
                f"{headline}_low": np.nan if row is None else row["ci_low"],
                f"{headline}_high": np.nan if row is None else row["ci_high"],
                "n": None if row is None else row["n"],
                **{m: _value(part, m) for m in (R.WORST_CASE_AGREEMENT, R.WORST_CASE_ACCURACY) if m != headline},
                "born_at": _born_at(doc["summary"].get("born_at", []), model, variant),
                "seconds": record.get("seconds"), "status": DONE, "reason": None,
            })
    return _rank(pd.DataFrame.from_records(records), headline), headline


def _rank(frame: pd.DataFrame, headline: str) -> pd.DataFrame:
    """Sorted best first by ``headline``; ``rank`` 1.. (ties share the lower rank), failed rows last."""
    higher = R.METRICS[headline].better == "higher"
    if headline not in frame:
        frame[headline] = np.nan
    frame["rank"] = frame[headline].rank(ascending=not higher, method="min").astype("Int64")
    frame = frame.sort_values(["rank", "model"], na_position="last", kind="stable").reset_index(drop=True)
    frame["parameters"] = pd.array(frame["parameters"], dtype="Int64") if "parameters" in frame else pd.NA
    frame["n"] = pd.array(frame["n"], dtype="Int64") if "n" in frame else pd.NA
    columns = ["rank", "model", "variant", "weights", "parameters", "accuracy", headline, f"{headline}_low",
               f"{headline}_high", "n", R.WORST_CASE_AGREEMENT, R.WORST_CASE_ACCURACY, "born_at", "seconds",
               "status", "reason"]
    return frame.reindex(columns=list(dict.fromkeys(columns)))


def shown(frame: pd.DataFrame, headline: str) -> pd.DataFrame:
    """The table for a terminal: the headline with its interval in one cell, parameters in
    millions, a failure's reason in place of its numbers, columns without values dropped."""
    low, high = f"{headline}_low", f"{headline}_high"
    view = frame.drop(columns=[low, high, "status", "reason"]).astype(object)
    view[headline] = [
        f"{v:.3g} [{lo:.2g}, {hi:.2g}]" if status == DONE and pd.notna(v) else
        f"failed: {reason[:60]}" if status == FAILED else ""
        for v, lo, hi, status, reason in zip(frame[headline], frame[low], frame[high], frame["status"], frame["reason"])
    ]
    view["parameters"] = [_count(v) for v in frame["parameters"]]
    view["seconds"] = [f"{v:.1f}" if pd.notna(v) else "" for v in frame["seconds"]]
    if (frame["variant"].isin(["base"]) | frame["variant"].isna()).all():
        view = view.drop(columns=["variant"])
    view = view.where(view.notna(), "")
    return view.loc[:, [c for c in view.columns if (view[c].astype(str) != "").any()]]


def _label_points(ax: Any, xs: np.ndarray, ys: np.ndarray, labels: list[str], size: float = 8) -> None:
    """Name each point; a label that would overlap one already placed moves down a line, so that
    models with equal values (ties are common) stay readable."""
    ax.figure.canvas.draw()  # the axes' limits and scales are final only now
    points = ax.transData.transform(np.column_stack([xs, ys]))
    pixels = ax.figure.dpi / 72  # per point
    line = (size + 2) * pixels
    placed: list[tuple[float, float, float]] = []  # each label's left, bottom and right, in pixels
    for x, y, (px, py), label in zip(xs, ys, points, labels):
        left, right, bottom = px + 4 * pixels, px + (4 + 0.6 * size * len(label)) * pixels, py + 3 * pixels
        while any(a < right and left < b and abs(c - bottom) < line for a, c, b in placed):
            bottom -= line
        placed.append((left, bottom, right))
        ax.annotate(label, (x, y), xytext=(4, (bottom - py) / pixels), textcoords="offset points", fontsize=size)


def _count(value: Any) -> str:
    """'11.7M', '5.4k', '10': a parameter count for reading."""
    if pd.isna(value):
        return ""
    return f"{value / 1e6:.3g}M" if value >= 1e6 else f"{value / 1e3:.3g}k" if value >= 1e3 else str(value)


LOG_COLUMNS = ("parameters", "seconds")


def plot_leaderboard(frame: pd.DataFrame, path: str | Path, x: str | None = None, y: str | None = None,
                     headline: str | None = None) -> str:
    """Draw one labelled point per measured row, ``y`` against ``x`` (default: the headline
    against accuracy, or against parameters when accuracy is missing or the same for all), with
    the headline's interval as an error bar. Returns a one-line description; ``ValueError`` for a
    bad column."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plots import save_figure

    data = frame[frame["status"] == DONE]
    numeric = [c for c in data.columns if c != "rank" and pd.api.types.is_numeric_dtype(data[c])
               and data[c].notna().any()]
    varies = "accuracy" in numeric and data["accuracy"].nunique() > 1  # all 0 with random weights: no axis
    x = x or ("accuracy" if varies else "parameters")
    y = y or headline or next(c for c in numeric if c not in LOG_COLUMNS)
    for axis, column in (("x", x), ("y", y)):
        if column not in numeric:
            raise ValueError(f"--{axis} {column}: not a numeric column with values; choose one of {', '.join(numeric)}")
    drawn = data.dropna(subset=[x, y])
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for axis, column in (("x", x), ("y", y)):
        low, high = f"{column}_low", f"{column}_high"
        if low in drawn and high in drawn:
            err = np.vstack([drawn[column] - drawn[low], drawn[high] - drawn[column]]).clip(min=0)
            ax.errorbar(drawn[x], drawn[y], **{f"{axis}err": err}, fmt="none", ecolor="lightgrey", zorder=1)
        if column in LOG_COLUMNS:
            (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    ax.scatter(drawn[x], drawn[y], zorder=2, color="tab:blue")
    ax.margins(x=0.12)  # room for the rightmost labels
    labels = [m if v == "base" else f"{m} [{v}]" for m, v in zip(drawn["model"], drawn["variant"])]
    _label_points(ax, drawn[x].to_numpy(float), drawn[y].to_numpy(float), labels)
    ax.set_xlabel(x)
    ax.set_ylabel(y + (" (95% interval)" if f"{y}_low" in drawn else ""))
    ax.grid(alpha=0.3)
    ax.set_title(f"{y} against {x}: {len(drawn)} models")
    save_figure(fig, Path(path))
    missing = len(data) - len(drawn)
    return f"{y} against {x}, {len(drawn)} models" + (f" ({missing} without a value left out)" if missing else "")
