"""Differences between two saved runs (e.g. before and after a model change), row by row and summarised.

Rows are matched on ``KEYS``. A column of ``SIDE_BY_SIDE`` that holds one value in each run, a
different one in each (``resnet18`` against ``vgg11``, ``base`` against ``blurpool``), is left out
of the match, so the two are compared side by side; it then reads ``"resnet18 vs vgg11"``.
"""

from __future__ import annotations

import pandas as pd

from .errors import UserError
from .results import whole_or_float

KEYS = ["model", "variant", "mode", "layer", "shift_x", "shift_y", "metric"]
SIDE_BY_SIDE = ("model", "variant", "mode")
GROUP = ["model", "variant", "mode", "metric", "layer"]
BOTH, ONLY_A, ONLY_B = "both", "only a", "only b"
_STATUS = {"both": BOTH, "left_only": ONLY_A, "right_only": ONLY_B}


def _prepare(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """The key, value and n columns with uniform dtypes: shifts as float (NaN where empty), variant filled."""
    missing = [c for c in KEYS + ["value", "n"] if c not in frame.columns and c != "variant"]
    if missing:
        raise UserError(f"run {label!r} is not a transinv result: it has no column {', '.join(missing)}")
    out = frame.assign(variant=frame["variant"].fillna("base") if "variant" in frame.columns else "base")
    out = out[KEYS + ["value", "n"]].reset_index(drop=True)
    for column in ("shift_x", "shift_y", "value", "n"):
        out[column] = pd.to_numeric(out[column]).astype("float64")
    repeated = out.duplicated(KEYS)
    if repeated.any():
        row = out.loc[repeated.idxmax(), KEYS].to_dict()
        raise UserError(f"run {label!r} has more than one row for {row}: compare files that each hold one run")
    return out


def _side_by_side(a: pd.DataFrame, b: pd.DataFrame, column: str) -> str | None:
    """``"A vs B"`` when each run holds one value of ``column`` and the two differ, else ``None``."""
    left, right = a[column].unique(), b[column].unique()
    if len(left) == 1 and len(right) == 1 and left[0] != right[0]:
        return f"{left[0]} vs {right[0]}"
    return None


def compare_results(a: pd.DataFrame, b: pd.DataFrame, label_a: str = "a", label_b: str = "b") -> pd.DataFrame:
    """Match two result tables row by row: both values, ``difference`` (b − a), ``relative`` and ``status``.

    ``relative`` is ``difference / |a|`` (NaN where a is 0). ``status`` is ``"both"``, ``"only a"``
    or ``"only b"``, whatever the labels, which name the ``value_*`` and ``n_*`` columns. Rows whose
    shifts are empty (``worst_case_accuracy``) match each other. Rows keep run a's order, then
    run b's unmatched rows in b's order.
    """
    if not label_a or not label_b or label_a == label_b:
        raise UserError(f"the two runs need two different, non-empty labels (got {label_a!r} and {label_b!r})")
    left, right = _prepare(a, label_a), _prepare(b, label_b)
    joined = {c: text for c in SIDE_BY_SIDE if (text := _side_by_side(left, right, c)) is not None}
    left = left.drop(columns=list(joined)).rename(columns={"value": f"value_{label_a}", "n": f"n_{label_a}"})
    right = right.drop(columns=list(joined)).rename(columns={"value": f"value_{label_b}", "n": f"n_{label_b}"})
    left["_order_a"], right["_order_b"] = range(len(left)), range(len(left), len(left) + len(right))
    # pandas merge matches missing keys with each other, so NaN shifts pair up (unlike SQL)
    on = [k for k in KEYS if k not in joined]
    merged = pd.merge(left, right, on=on, how="outer", indicator="_merge")
    merged["_order"] = merged["_order_a"].fillna(merged["_order_b"])
    merged = merged.sort_values("_order", kind="stable").reset_index(drop=True).assign(**joined)
    value_a, value_b = merged[f"value_{label_a}"], merged[f"value_{label_b}"]
    merged["difference"] = value_b - value_a
    merged["relative"] = merged["difference"] / value_a.abs().where(value_a != 0)
    merged["status"] = merged["_merge"].astype(str).map(_STATUS)
    for column in ("shift_x", "shift_y"):
        merged[column] = whole_or_float(merged[column])
    for column in (f"n_{label_a}", f"n_{label_b}"):
        merged[column] = merged[column].astype("Int64")
    values = [f"value_{label_a}", f"value_{label_b}", "difference", "relative", f"n_{label_a}", f"n_{label_b}"]
    return merged[KEYS + values + ["status"]]


def _labels(diff: pd.DataFrame) -> tuple[str, str]:
    """The two run labels, read back from the ``value_<label>`` columns ``compare_results`` wrote."""
    labels = [c.removeprefix("value_") for c in diff.columns if c.startswith("value_")]
    if len(labels) != 2:
        raise UserError("summarize takes the table compare_results returns (two value_<label> columns)")
    return labels[0], labels[1]


def summarize(diff: pd.DataFrame) -> pd.DataFrame:
    """Per (model, variant, mode, metric, layer): both means, the mean difference and the largest one.

    Means use the rows found in both runs (``matched``; ``unmatched`` counts the rest), the
    reference shift (0, 0) included, so ``mean_difference`` is ``mean_<b> − mean_<a>`` (NaN values
    aside); a group found in one run only has NaN means. ``max_abs_difference`` is the largest
    ``|difference|``, at shift ``(shift_x, shift_y)``. Metrics and layers keep the table's order
    (layers in forward order), metric by metric.
    """
    label_a, label_b = _labels(diff)
    value_a, value_b = f"value_{label_a}", f"value_{label_b}"
    records = []
    for key, group in diff.groupby(GROUP, sort=False, dropna=False):
        both = group[group["status"] == BOTH]
        gaps = both["difference"].abs()
        largest = both.loc[gaps.idxmax()] if gaps.notna().any() else None
        records.append(
            {
                **dict(zip(GROUP, key)),
                f"mean_{label_a}": both[value_a].mean(),
                f"mean_{label_b}": both[value_b].mean(),
                "mean_difference": both["difference"].mean(),
                "max_abs_difference": gaps.max(),
                "shift_x": pd.NA if largest is None else largest["shift_x"],
                "shift_y": pd.NA if largest is None else largest["shift_y"],
                "matched": len(both),
                "unmatched": len(group) - len(both),
            }
        )
    columns = GROUP + [f"mean_{label_a}", f"mean_{label_b}", "mean_difference", "max_abs_difference"]
    summary = pd.DataFrame.from_records(records, columns=columns + ["shift_x", "shift_y", "matched", "unmatched"])
    for column in ("shift_x", "shift_y"):
        summary[column] = summary[column].astype(diff[column].dtype)
    rank = {c: {v: i for i, v in enumerate(pd.unique(diff[c]))} for c in GROUP}
    return summary.sort_values(by=GROUP, key=lambda col: col.map(rank[col.name]), kind="stable").reset_index(drop=True)
