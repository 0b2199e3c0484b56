"""Rich tables for the terminal: the result's rows arranged for reading, rounded only here."""

from __future__ import annotations

import pandas as pd
from rich.console import Console, Group
from rich.markup import escape
from rich import box
from rich.table import Table
from rich.text import Text

from ..engine import metrics as M
from .compare import Comparison, compare_within, reference_pairs
from ..metric_registry import LIE_CONTRIBUTION, LIE_DERIVATIVE, LIE_UNATTRIBUTED, order, spec
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
    used = {_preprocess_text(entry["preprocess"]) for entry in (s.get("per_model") or {}).values()}
    if len(used) == 1:
        text.append(f"\npreprocessing: {used.pop()}")
    if "none" in set(rows["weights"].astype(str)):
        text.append("\nrandom weights (--weights none): a random network predicts nearly one class for every image, "
                    "so agreement reads near 1 and accuracy near 0; use pretrained weights for meaningful outputs",
                    style="yellow")
    return text


def _preprocess_text(pre: dict) -> str:
    """'resize 256 -> crop 224, bilinear, mean 0.485,0.456,0.406, std 0.229,0.224,0.225'."""
    numbers = lambda values: ",".join(f"{v:g}" for v in values)  # noqa: E731
    return (f"resize {pre['resize']} -> crop {pre['size']}, {pre['interpolation']}, mean {numbers(pre['mean'])}, "
            f"std {numbers(pre['std'])}")


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


def _interval_text(value: float, low: float, high: float, sign: str = "") -> str:
    """'0.969 [0.84, 0.99]': the mean and its 95% interval (README: Intervals); the value alone
    where there is no interval (the reference shift). ``sign="+"`` for differences."""
    if pd.isna(low) or pd.isna(high):
        return f"{value:{sign}.3g}"
    return f"{value:{sign}.3g} [{low:{sign}.2g}, {high:{sign}.2g}]"


def comparison_tables(summary: pd.DataFrame, label_a: str, label_b: str, files: bool = True) -> list[Table | Text]:
    """``compare``'s summary for a terminal: per compared pair, one table of output metrics and one
    per layer metric. Headers are A and B, named in the title (run labels when ``files``, and the
    model, variant or mode that differs), so columns stay apart in 80 columns."""
    value_a, value_b = f"mean_{label_a}", f"mean_{label_b}"
    caption = escape("means over the shifted views (shift 0 left out); B − A [paired 95% interval]")
    tables = []
    for key, pair in summary.groupby(["model", "variant", "mode"], sort=False):
        sides = [str(v).split(" vs ", 1) for v in key]
        common = ", ".join(v[0] for v in sides if len(v) == 1)
        names = [" ".join(v[i] for v in sides if len(v) == 2) for i in (0, 1)]
        if files:
            names = [f"{label} ({name})" if name else label for label, name in zip((label_a, label_b), names)]
        title = f"{common}: A = {names[0]}, B = {names[1]}"
        output = pair[pair["layer"] == M.OUTPUT_LAYER]
        parts = [("output metrics", "metric", output)] if not output.empty else []
        parts += [(f"{metric} by layer", "layer", part)
                  for metric, part in pair[pair["layer"] != M.OUTPUT_LAYER].groupby("metric", sort=False)]
        if parts:
            tables.append(Text(title, style="bold"))
        for index, (name, first, part) in enumerate(parts):
            table = Table(title=escape(name), title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1),
                          pad_edge=False, collapse_padding=True,
                          caption=caption if index == len(parts) - 1 else None, caption_justify="left")
            table.add_column(first, no_wrap=True)
            for header in ("A", "B", "B − A", "max |B − A|"):
                table.add_column(header, justify="right")
            for row in part.to_dict("records"):
                at = "" if pd.isna(row["shift_x"]) else f" at {_shift_label(row['shift_x'], row['shift_y'])}"
                largest = "" if pd.isna(row["max_abs_difference"]) else f"{row['max_abs_difference']:.3g}{at}"
                difference = "" if pd.isna(row["mean_difference"]) else _interval_text(
                    row["mean_difference"], row["diff_low"], row["diff_high"], "+")
                table.add_row(escape(str(row[first])), _plain(row[value_a]), _plain(row[value_b]), difference, largest)
            tables.append(table)
    return tables


def _plain(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.3g}"


def _pair_label(ref: tuple[str, str], other: tuple[str, str], models: bool) -> str:
    """'blurpool − base' (the model named only when a run holds several), or 'vgg11 − resnet18'."""
    if ref[0] == other[0]:
        return f"{other[0]}: {other[1]} − base" if models else f"{other[1]} − base"
    return f"{_series_label(*other)} − {ref[0]}"


def difference_tables(rows: pd.DataFrame, comparison: Comparison) -> list[Table]:
    """Output metrics of several series: each series minus its reference (``reference_pairs``),
    with the paired 95% interval; one table per per-shift metric, one for the whole-set metrics."""
    diff = comparison.rows[comparison.rows["layer"] == M.OUTPUT_LAYER]
    series = list(dict.fromkeys(zip(rows["model"], rows["variant"])))
    pairs = [_pair_label(ref, other, rows["model"].nunique() > 1) for ref, other in reference_pairs(series)]
    labels = diff["model"].str.cat(diff["variant"], sep="|")
    series_order = list(dict.fromkeys(labels))
    caption = escape("difference [paired 95% interval]; none at shift 0, where both are fixed by definition")
    tables = []
    per_shift = diff[diff["shift_x"].notna()]
    for metric in order(list(per_shift["metric"])):
        part = per_shift[per_shift["metric"] == metric]
        table = Table(title=f"difference in {metric}", title_justify="left", caption=caption, caption_justify="left")
        table.add_column("shift", justify="right")
        for header in pairs:
            table.add_column(escape(header), justify="right")
        cells = {(label, r.shift_x, r.shift_y): _interval_text(r.difference, r.diff_low, r.diff_high, "+")
                 for label, r in zip(labels[part.index], part.itertuples())}
        for sx, sy in dict.fromkeys(zip(part["shift_x"], part["shift_y"])):
            table.add_row(_shift_label(sx, sy), *[cells.get((label, sx, sy), "") for label in series_order])
        tables.append(table)
    whole = diff[diff["shift_x"].isna()]
    if not whole.empty:
        table = Table(title="difference over the whole shift set", title_justify="left",
                      caption=escape("difference [paired 95% interval]"), caption_justify="left")
        table.add_column("series")
        metrics = list(dict.fromkeys(whole["metric"]))
        for metric in metrics:
            table.add_column(metric, justify="right")
        for header, label in zip(pairs, series_order):
            cells = whole[labels[whole.index] == label].set_index("metric")
            table.add_row(escape(header), *[_interval_text(*cells.loc[m, ["difference", "diff_low", "diff_high"]], "+")
                                            if m in cells.index else "" for m in metrics])
        tables.append(table)
    return tables


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
    if len(groups) > 1 and reference_pairs([series for series, _ in groups]):
        parts.extend(difference_tables(result.rows, compare_within(result)))
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
