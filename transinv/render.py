"""Rich tables for the terminal: the result's rows arranged for reading, rounded only here."""

from __future__ import annotations

import pandas as pd
from rich.console import Console, Group
from rich.markup import escape
from rich import box
from rich.table import Table
from rich.text import Text

from . import metrics as M
from .metric_registry import LIE_CONTRIBUTION, LIE_DERIVATIVE, LIE_UNATTRIBUTED, order, spec
from .results import Result



def _shift_label(sx: object, sy: object) -> str:
    return f"{sx}" if sy == 0 else f"({sx},{sy})" if sx != 0 else f"y{sy}"


def _series_label(model: str, variant: str) -> str:
    return model if variant == "base" else f"{model} [{variant}]"


def _header(result: Result) -> Text:
    s, summary = result.settings, result.summary
    rows = result.rows
    series = rows.drop_duplicates(["model", "variant"])
    text = Text()
    text.append(", ".join(_series_label(r.model, r.variant) for r in series.itertuples()), style="bold")
    weights = ",".join(dict.fromkeys(rows["weights"].astype(str))) or s["weights"]
    text.append(f"  weights={weights}  mode={s['mode']}  direction={s['direction']}  ")
    text.append(f"images={summary['images']}")
    if summary.get("skipped"):
        text.append(f"  skipped={summary['skipped']}", style="yellow")
    if result.partial:
        text.append("  PARTIAL (interrupted)", style="bold red")
    return text


def output_tables(rows: pd.DataFrame) -> list[Table]:
    """Output metrics by shift: one table with a column per metric for one model, or, to compare
    several models and variants side by side, one table per metric with a column per series."""
    out = rows[(rows["layer"] == M.OUTPUT_LAYER) & rows["shift_x"].notna() & ~rows["metric"].map(_is_lie)]
    if out.empty:
        return []
    metrics = order(list(out["metric"]))
    series = list(dict.fromkeys(zip(out["model"], out["variant"])))
    wide = out.pivot_table(index=["shift_x", "shift_y"], columns=["model", "variant", "metric"],
                           values=["value", "ci_low", "ci_high"], sort=False)
    counts = out.groupby(["shift_x", "shift_y"], sort=False)["n"].max()
    layouts = [("output", [(s, m) for s in series for m in metrics], metrics)] if len(series) == 1 else [
        (f"output {metric}", [(s, metric) for s in series], [_series_label(*s) for s in series]) for metric in metrics
    ]
    tables = []
    for title, cells, headers in layouts:
        table = Table(title=title, title_justify="left", caption="value [95% interval]", caption_justify="left")
        table.add_column("shift", justify="right")
        for header in headers:
            table.add_column(escape(header), justify="right")
        table.add_column("n", justify="right")
        for (sx, sy), values in wide.iterrows():
            row = [_with_interval(values, (m, v, metric)) for (m, v), metric in cells]
            table.add_row(_shift_label(sx, sy), *row, str(counts[(sx, sy)]))
        tables.append(table)
    return tables


def _is_lie(metric: str) -> bool:
    found = spec(metric)
    return found is not None and found.attribution


LIE_SHOWN = 0.005  # contributions below this share of the total stay in the CSV/JSON only


def lie_tables(rows: pd.DataFrame) -> list[Table]:
    """``--attribution lie``: per series and direction, the total, the unattributed part, and each
    leaf layer's contribution with its share of the total (layers under ``LIE_SHOWN`` left out)."""
    tables = []
    for (model, variant, sx, sy), part in rows[rows["metric"].map(_is_lie)].groupby(
            ["model", "variant", "shift_x", "shift_y"], sort=False):
        cells = {(r.layer, r.metric): r for r in part.itertuples()}
        total = cells.get((M.OUTPUT_LAYER, LIE_DERIVATIVE))
        if total is None:
            continue
        layers = part[part["metric"] == LIE_CONTRIBUTION]
        shown = layers[(layers["value"].abs() >= LIE_SHOWN * total.value)] if total.value > 0 else layers.iloc[:0]
        table = Table(title=f"lie_contribution, {_series_label(model, variant)}, along ({sx},{sy}) "
                            f"(signed; the rows add up to lie_derivative)", title_justify="left",
                      caption=f"n = {total.n}; {len(layers) - len(shown)} layers under {LIE_SHOWN:.1%} of the total "
                              f"not shown (see the CSV/JSON)", caption_justify="left", box=box.SIMPLE_HEAD)
        for column in ("layer", "stride", "value [95% interval]", "share"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for r in shown.itertuples():
            table.add_row(escape(r.layer), "" if pd.isna(r.stride) else str(r.stride),
                          _interval_text(r.value, r.ci_low, r.ci_high), f"{r.value / total.value:.1%}")
        unattributed = cells.get((M.OUTPUT_LAYER, LIE_UNATTRIBUTED))
        if unattributed is not None:
            table.add_row("(outside leaf layers)", "", _interval_text(unattributed.value, unattributed.ci_low,
                          unattributed.ci_high), f"{unattributed.value / total.value:.1%}" if total.value > 0 else "")
        table.add_row(LIE_DERIVATIVE, "", _interval_text(total.value, total.ci_low, total.ci_high), "100%",
                      style="bold")
        tables.append(table)
    return tables


def whole_set_table(rows: pd.DataFrame) -> Table | None:
    """Metrics over the whole shift set (worst cases, jaggedness, consistency): a row per series."""
    whole = rows[(rows["layer"] == M.OUTPUT_LAYER) & rows["shift_x"].isna()]
    if whole.empty:
        return None
    metrics = list(dict.fromkeys(whole["metric"]))
    table = Table(title="over the whole shift set", title_justify="left", caption="value [95% interval] (n)",
                  caption_justify="left")
    table.add_column("model")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for (model, variant), part in whole.groupby(["model", "variant"], sort=False):
        cells = part.set_index("metric")
        table.add_row(escape(_series_label(model, variant)), *[
            f"{_interval_text(*cells.loc[m, ['value', 'ci_low', 'ci_high']])} ({cells.loc[m, 'n']})"
            if m in cells.index else "" for m in metrics])
    return table


def _with_interval(values: pd.Series, key: tuple) -> str:
    """A pivoted cell of ``output_tables`` as value and interval."""
    return _interval_text(values[("value", *key)], values[("ci_low", *key)], values[("ci_high", *key)])


def _interval_text(value: float, low: float, high: float) -> str:
    """'0.969 [0.84, 0.99]': the mean and its 95% interval (Wilson or bootstrap, see README)."""
    return f"{value:.3g} [{low:.2g}, {high:.2g}]"


def layer_tables(rows: pd.DataFrame, metric: str, width: int) -> list[Table]:
    """One per-layer metric: layers as rows in forward order, shifts as columns ('.' = not aligned).

    Shifts are split over several tables when they would not fit ``width`` columns of terminal.
    """
    part = rows[rows["metric"] == metric]
    if part.empty:
        return []
    pooled = rows[rows["metric"] == M.POOLED_INVARIANCE_ERROR]
    layers = list(dict.fromkeys(pooled["layer"]))
    shifts = list(dict.fromkeys(zip(pooled["shift_x"], pooled["shift_y"])))
    strides = pooled.drop_duplicates("layer").set_index("layer")["stride"]
    cells = {(r.layer, r.shift_x, r.shift_y): r.value for r in part.itertuples()}
    if metric == M.EQUIVARIANCE_ERROR:  # columns where no layer is aligned hold nothing
        shifts = [s for s in shifts if any((layer, *s) in cells for layer in layers)]
    fixed_width = max(len(layer) for layer in layers) + 10  # layer and stride columns
    per_table = max(1, (width - fixed_width) // 6)
    tables = []
    for start in range(0, len(shifts), per_table):
        chunk = shifts[start : start + per_table]
        last = start + per_table >= len(shifts)
        caption = None
        if last:
            low, high = int(part["n"].min()), int(part["n"].max())
            caption = f"n = {low} images per cell" if low == high else f"n = {low}..{high} images per cell"
            caption += "; 95% intervals in the CSV/JSON"
            if metric == M.EQUIVARIANCE_ERROR:
                caption += "; '.' = shift not a multiple of the layer's stride (not aligned)"
        table = Table(title=f"{metric} by layer (rows) and shift in px (columns)" if start == 0 else None,
                      title_justify="left", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
                      padding=(0, 1), pad_edge=False, collapse_padding=True)
        table.add_column("layer", no_wrap=True)
        table.add_column("stride", justify="right", no_wrap=True)
        for sx, sy in chunk:
            table.add_column(_shift_label(sx, sy), justify="right", no_wrap=True, min_width=4)
        for layer in layers:
            values = [cells.get((layer, sx, sy)) for sx, sy in chunk]
            table.add_row(layer, str(strides[layer]), *["." if v is None else _compact(v) for v in values])
        tables.append(table)
    return tables


def _compact(value: float) -> str:
    """Three decimals without the leading zero, so a row of 17 shifts fits a terminal."""
    text = f"{value:.3f}"
    return text[1:] if text.startswith("0.") else text


def render(result: Result, width: int = 120) -> Group:
    """Everything a terminal shows: header, layer tables per model/variant, outputs side by side."""
    parts: list = [_header(result)]
    groups = list(result.rows.groupby(["model", "variant"], sort=False))
    for (model, variant), rows in groups:
        tables = [t for metric in (M.EQUIVARIANCE_ERROR, M.POOLED_INVARIANCE_ERROR) for t in layer_tables(rows, metric, width)]
        if tables and len(groups) > 1:
            parts.append(Text(f"\n{_series_label(model, variant)}", style="bold"))
        parts.extend(tables)
    parts.extend(output_tables(result.rows))
    whole = whole_set_table(result.rows)
    if whole is not None:
        parts.append(whole)
    parts.extend(lie_tables(result.rows))
    born = pd.DataFrame(result.summary.get("born_at") or [])
    if not born.empty:
        for (model, variant), entries in born.groupby(["model", "variant"], sort=False):
            parts.append(Text(f"born at, {_series_label(model, variant)} (layer where pooled_invariance_error "
                              f"grows most): {_born_line(entries.to_dict('records'))}"))
    for entry in result.summary.get("born_at_lie") or []:
        parts.append(Text(f"born at (Lie), {_series_label(entry['model'], entry['variant'])} along "
                          f"({entry['shift_x']},{entry['shift_y']}) (largest lie_contribution): {entry['layer']} "
                          f"({entry['share']:.0%} of lie_derivative)"))
    return Group(*parts)


def _born_line(born: list[dict]) -> str:
    """Runs of consecutive shifts with the same layer, e.g. '1..3: conv1, 4..16: layer4'."""
    runs: list[tuple[str, str, str]] = []
    for entry in born:
        label = _shift_label(entry["shift_x"], entry["shift_y"])
        if runs and runs[-1][2] == entry["layer"]:
            runs[-1] = (runs[-1][0], label, entry["layer"])
        else:
            runs.append((label, label, entry["layer"]))
    return ", ".join(f"{a}: {layer}" if a == b else f"{a}..{b}: {layer}" for a, b, layer in runs)


def print_result(result: Result, console: Console) -> None:
    console.print(render(result, console.width))
