"""Rich tables for the terminal: the result's rows arranged for reading, rounded only here."""

from __future__ import annotations

import pandas as pd
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from . import metrics as M
from .results import Result

_OUTPUT_ORDER = [M.TOP1_AGREEMENT, M.KL_DIVERGENCE, M.PROB_CHANGE, M.ACCURACY]


def _shift_label(sx: object, sy: object) -> str:
    return f"{sx}" if sy == 0 else f"({sx},{sy})" if sx != 0 else f"y{sy}"


def _header(result: Result) -> Text:
    s, summary = result.settings, result.summary
    text = Text()
    text.append(f"{s['model']}", style="bold")
    text.append(f"  weights={s['weights']}  mode={s['mode']}  direction={s['direction']}  ")
    text.append(f"images={summary['images']}")
    if summary.get("skipped"):
        text.append(f"  skipped={summary['skipped']}", style="yellow")
    if result.partial:
        text.append("  PARTIAL (interrupted)", style="bold red")
    return text


def output_table(rows: pd.DataFrame) -> Table:
    """Output metrics: one row per shift, one column per metric."""
    out = rows[(rows["layer"] == M.OUTPUT_LAYER) & rows["shift_x"].notna()]
    metrics = [m for m in _OUTPUT_ORDER if m in set(out["metric"])]
    table = Table(title="output", title_justify="left")
    table.add_column("shift", justify="right")
    for metric in metrics:
        table.add_column(metric, justify="right")
    table.add_column("n", justify="right")
    wide = out.pivot_table(index=["shift_x", "shift_y"], columns="metric", values="value", sort=False)
    counts = out.groupby(["shift_x", "shift_y"], sort=False)["n"].max()
    for (sx, sy), values in wide.iterrows():
        table.add_row(_shift_label(sx, sy), *[f"{values[m]:.4f}" for m in metrics], str(counts[(sx, sy)]))
    return table


def layer_table(rows: pd.DataFrame, metric: str) -> Table | None:
    """One per-layer metric: layers as rows in forward order, shifts as columns ('.' = not aligned)."""
    part = rows[rows["metric"] == metric]
    if part.empty:
        return None
    layers = list(dict.fromkeys(rows.loc[rows["metric"] == M.POOLED_INVARIANCE_ERROR, "layer"]))
    shifts = list(dict.fromkeys(zip(rows.loc[rows["metric"] == M.POOLED_INVARIANCE_ERROR, "shift_x"],
                                    rows.loc[rows["metric"] == M.POOLED_INVARIANCE_ERROR, "shift_y"])))
    strides = rows.drop_duplicates("layer").set_index("layer")["stride"]
    cells = {(r.layer, r.shift_x, r.shift_y): r.value for r in part.itertuples()}
    table = Table(title=f"{metric} by layer (rows) and shift (columns)", title_justify="left")
    table.add_column("layer")
    table.add_column("stride", justify="right")
    for sx, sy in shifts:
        table.add_column(_shift_label(sx, sy), justify="right")
    for layer in layers:
        values = [cells.get((layer, sx, sy)) for sx, sy in shifts]
        table.add_row(layer, str(strides[layer]), *["." if v is None else f"{v:.3f}" for v in values])
    return table


def render(result: Result) -> Group:
    """Everything a terminal shows for one result: header, worst case, layer tables, born-at."""
    parts: list = [_header(result)]
    for metric in (M.EQUIVARIANCE_ERROR, M.POOLED_INVARIANCE_ERROR):
        table = layer_table(result.rows, metric)
        if table is not None:
            parts.append(table)
    parts.append(output_table(result.rows))
    worst = result.rows[result.rows["metric"] == M.WORST_CASE_ACCURACY]
    for row in worst.itertuples():
        parts.append(Text(f"worst_case_accuracy (correct under every shift of the set): {row.value:.4f} (n={row.n})"))
    born = result.summary.get("born_at") or []
    if born:
        line = ", ".join(f"{_shift_label(b['shift_x'], b['shift_y'])}: {b['layer']}" for b in born)
        parts.append(Text(f"born at (layer where pooled_invariance_error grows most, per shift): {line}"))
    return Group(*parts)


def print_result(result: Result, console: Console) -> None:
    console.print(render(result))
