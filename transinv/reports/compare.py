"""Differences between runs, row by row and summarised, with paired bootstrap intervals.

Rows are matched on ``KEYS``. A column of ``SIDE_BY_SIDE`` that holds one value in each run, a
different one in each (``resnet18`` against ``vgg11``, ``base`` against ``blurpool``), is left out
of the match, so the two are compared side by side; it then reads ``"resnet18 vs vgg11"``.

Both runs measured the same images, so a difference has a *paired* interval: each bootstrap
replicate counts every image equally often in both runs, and the replicate's difference of
means is the difference's bootstrap replicate (README: Paired differences).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..engine import metrics as M
from ..errors import UserError
from ..metric_registry import fixed_at_reference
from .results import Result, whole_or_float

KEYS = ["model", "variant", "mode", "layer", "shift_x", "shift_y", "metric"]
SIDE_BY_SIDE = ("model", "variant", "mode")
GROUP = ["model", "variant", "mode", "metric", "layer"]
SAME_IMAGES = ("data", "num_images", "sample_seed")  # settings that decide which image each index is
BOTH, ONLY_A, ONLY_B = "both", "only a", "only b"
_STATUS = {"both": BOTH, "left_only": ONLY_A, "right_only": ONLY_B}
Run = pd.DataFrame | Result


@dataclass
class Comparison:
    """Matched rows of two runs (``compare_results``' table) and, row by row, the bootstrap
    replicates of ``difference`` (``rows x R``, NaN where the row is not paired), or None with
    ``note`` saying why no interval could be paired."""

    rows: pd.DataFrame
    replicates: np.ndarray | None
    note: str | None = None


def _as_result(run: Run) -> Result:
    return run if isinstance(run, Result) else Result(rows=run, settings={})


def _prepare(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """The key, value and n columns with uniform dtypes: shifts as float (NaN where empty), variant
    filled, and ``_rep``, the row's position in the run (its bootstrap replicates' row)."""
    missing = [c for c in KEYS + ["value", "n"] if c not in frame.columns and c != "variant"]
    if missing:
        raise UserError(f"run {label!r} is not a transinv result: it has no column {', '.join(missing)}")
    out = frame.assign(variant=frame["variant"].fillna("base") if "variant" in frame.columns else "base")
    out = out[KEYS + ["value", "n"]].reset_index(drop=True)
    out["_rep"] = range(len(out))
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


def unpaired_reason(a: Result, b: Result, same_run: bool = False) -> str | None:
    """Why two runs' differences cannot get paired intervals, or None when they can: both must
    carry bootstrap replicates (JSON results do, CSV files do not) of the same images (given
    when both are parts of ``same_run``, whose series all finished the same batches)."""
    if a.replicates is None or b.replicates is None:
        return ("no paired intervals: they need both runs' bootstrap replicates, which JSON results of this "
                "transinv version carry and CSV files do not")
    if a.replicates.shape[1] != b.replicates.shape[1]:
        return "no paired intervals: the runs have different numbers of bootstrap replicates"
    if same_run:
        return None
    differing = [k for k in SAME_IMAGES if a.settings.get(k) != b.settings.get(k)]
    if a.summary.get("images") != b.summary.get("images") or a.summary.get("partial") or b.summary.get("partial"):
        differing.append("images measured")
    if differing:
        return f"no paired intervals: the runs measured different images ({', '.join(differing)} differ)"
    return None


def compare_runs(a: Run, b: Run, label_a: str = "a", label_b: str = "b", same_run: bool = False) -> Comparison:
    """Match two runs row by row: both values, ``difference`` (b − a; 0 below the float64 rounding
    of the two values) with its paired 95% interval ``diff_low``..``diff_high``, ``relative`` and
    ``status``.

    ``relative`` is ``difference / |a|`` (NaN where a is 0). ``status`` is ``"both"``, ``"only a"``
    or ``"only b"``, whatever the labels, which name the ``value_*`` and ``n_*`` columns. Rows whose
    shifts are empty (whole-set metrics) match each other. Rows keep run a's order, then run b's
    unmatched rows in b's order. The interval is the expanded percentile interval of the
    replicates' differences (``metrics.expanded_percentile_interval``); it is empty at the
    reference shift (a difference fixed at 0 by definition) and when ``unpaired_reason`` says so.
    """
    if not label_a or not label_b or label_a == label_b:
        raise UserError(f"the two runs need two different, non-empty labels (got {label_a!r} and {label_b!r})")
    run_a, run_b = _as_result(a), _as_result(b)
    left, right = _prepare(run_a.rows, label_a), _prepare(run_b.rows, label_b)
    joined = {c: text for c in SIDE_BY_SIDE if (text := _side_by_side(left, right, c)) is not None}
    left = left.drop(columns=list(joined)).rename(columns={"value": f"value_{label_a}", "n": f"n_{label_a}", "_rep": "_rep_a"})
    right = right.drop(columns=list(joined)).rename(columns={"value": f"value_{label_b}", "n": f"n_{label_b}", "_rep": "_rep_b"})
    left["_order_a"], right["_order_b"] = range(len(left)), range(len(left), len(left) + len(right))
    # pandas merge matches missing keys with each other, so NaN shifts pair up (unlike SQL)
    on = [k for k in KEYS if k not in joined]
    merged = pd.merge(left, right, on=on, how="outer", indicator="_merge")
    merged["_order"] = merged["_order_a"].fillna(merged["_order_b"])
    merged = merged.sort_values("_order", kind="stable").reset_index(drop=True).assign(**joined)
    value_a, value_b = merged[f"value_{label_a}"], merged[f"value_{label_b}"]
    raw = value_b - value_a
    rounding = 4 * np.finfo(np.float64).eps * np.fmax(value_a.abs(), value_b.abs())
    merged["difference"] = raw.where(raw.abs() > rounding, 0.0).where(raw.notna())
    merged["relative"] = merged["difference"] / value_a.abs().where(value_a != 0)
    merged["status"] = merged["_merge"].astype(str).map(_STATUS)
    note = unpaired_reason(run_a, run_b, same_run)
    replicates = None if note else _paired_replicates(merged, run_a.replicates, run_b.replicates)
    n = np.fmin(merged[f"n_{label_a}"].to_numpy(float), merged[f"n_{label_b}"].to_numpy(float))
    merged["diff_low"], merged["diff_high"] = _interval(replicates, n, len(merged))
    for column in ("shift_x", "shift_y"):
        merged[column] = whole_or_float(merged[column])
    for column in (f"n_{label_a}", f"n_{label_b}"):
        merged[column] = merged[column].astype("Int64")
    values = [f"value_{label_a}", f"value_{label_b}", "difference", "diff_low", "diff_high", "relative",
              f"n_{label_a}", f"n_{label_b}"]
    return Comparison(merged[KEYS + values + ["status"]], replicates, note)


def _paired_replicates(merged: pd.DataFrame, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``rows x R`` replicate differences b − a; NaN where a row is in one run only or is a
    reference row (shift 0, fixed by definition: no interval)."""
    out = np.full((len(merged), a.shape[1]), np.nan)
    reference = (merged["shift_x"] == 0) & (merged["shift_y"] == 0) & merged["metric"].map(fixed_at_reference).astype(bool)
    paired = (merged["status"] == BOTH) & ~reference
    rows = np.flatnonzero(paired.to_numpy())
    index_a = merged.loc[paired, "_rep_a"].to_numpy(int)
    index_b = merged.loc[paired, "_rep_b"].to_numpy(int)
    out[rows] = b[index_b] - a[index_a]
    return out


def _interval(replicates: np.ndarray | None, n: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Expanded percentile intervals of replicate rows (NaN rows stay NaN), or NaN without any."""
    if replicates is None:
        return np.full(rows, np.nan), np.full(rows, np.nan)
    low, high = M.expanded_percentile_interval(torch.from_numpy(replicates), torch.from_numpy(np.nan_to_num(n)))
    return low.numpy(), high.numpy()


def compare_results(a: Run, b: Run, label_a: str = "a", label_b: str = "b") -> pd.DataFrame:
    """The matched rows of ``compare_runs`` (a table; intervals only when both are ``Result``\\s)."""
    return compare_runs(a, b, label_a, label_b).rows


def reference_pairs(series: list[tuple[str, str]]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """(reference, other) pairs of a run's (model, variant) series: each variant against its own
    model's ``base``, and each other model against the first model in the same variant."""
    pairs = []
    first_model = series[0][0] if series else None
    for model, variant in series:
        if variant != "base" and (model, "base") in series:
            pairs.append(((model, "base"), (model, variant)))
        elif model != first_model and (first_model, variant) in series:
            pairs.append(((first_model, variant), (model, variant)))
    return pairs


def _part(result: Result, model: str, variant: str) -> Result:
    """One series of a run, with its rows' replicates."""
    chosen = ((result.rows["model"] == model) & (result.rows["variant"] == variant)).to_numpy()
    replicates = None if result.replicates is None else result.replicates[chosen]
    return Result(result.rows[chosen].reset_index(drop=True), result.settings, result.summary, replicates)


def compare_within(result: Result) -> Comparison:
    """Every series of one run against its reference (``reference_pairs``): variant minus base on
    every shared row, model minus model on the output rows (layers of two architectures are not
    the same thing). Columns as ``compare_runs`` with labels ``a`` (the reference) and ``b``."""
    rows, replicates = [], []
    for ref, other in reference_pairs(list(dict.fromkeys(zip(result.rows["model"], result.rows["variant"])))):
        found = compare_runs(_part(result, *ref), _part(result, *other), same_run=True)
        keep = (found.rows["layer"] == M.OUTPUT_LAYER).to_numpy() | (ref[0] == other[0])
        rows.append(found.rows[keep])
        if found.replicates is not None:
            replicates.append(found.replicates[keep])
    if not rows:
        raise UserError("this run holds one model and one variant: nothing to compare it with")
    table = pd.concat(rows, ignore_index=True)
    for column in ("shift_x", "shift_y"):
        table[column] = whole_or_float(table[column])
    paired = len(replicates) == len(rows)
    note = None if paired else unpaired_reason(result, result, same_run=True)
    return Comparison(table, np.concatenate(replicates) if paired else None, note)


def _labels(diff: pd.DataFrame) -> tuple[str, str]:
    """The two run labels, read back from the ``value_<label>`` columns ``compare_results`` wrote."""
    labels = [c.removeprefix("value_") for c in diff.columns if c.startswith("value_")]
    if len(labels) != 2:
        raise UserError("summarize takes the table compare_results returns (two value_<label> columns)")
    return labels[0], labels[1]


def summarize(diff: pd.DataFrame | Comparison) -> pd.DataFrame:
    """Per (model, variant, mode, metric, layer): both means over the shifted views, the mean
    difference with its paired 95% interval, and the largest difference.

    Means use the rows found in both runs other than the reference shift (0, 0), which every
    metric but accuracy fixes by definition (``matched`` counts them; ``unmatched`` the rows in
    one run only; a group with no other row is left out), so ``mean_difference`` is ``mean_<b> − mean_<a>`` (NaN values aside); a
    whole-set metric's one row is its mean. ``diff_low``..``diff_high`` is the expanded percentile
    interval of the replicates' mean difference (only for a ``Comparison`` with replicates).
    ``max_abs_difference`` is the largest ``|difference|``, at shift ``(shift_x, shift_y)``. Metrics
    and layers keep the table's order (layers in forward order), metric by metric.
    """
    comparison = diff if isinstance(diff, Comparison) else Comparison(diff, None)
    table = comparison.rows.reset_index(drop=True)  # positions = the replicates' rows
    label_a, label_b = _labels(table)
    value_a, value_b = f"value_{label_a}", f"value_{label_b}"
    shifted = ~((table["shift_x"] == 0) & (table["shift_y"] == 0)).fillna(False).astype(bool)
    records, replicates, counts = [], [], []
    for key, group in table.groupby(GROUP, sort=False, dropna=False):
        both = group[(group["status"] == BOTH) & shifted[group.index]]
        gaps = both["difference"].abs()
        largest = both.loc[gaps.idxmax()] if gaps.notna().any() else None
        if comparison.replicates is not None:
            replicates.append(comparison.replicates[both.index].mean(axis=0) if len(both) else
                              np.full(comparison.replicates.shape[1], np.nan))
            counts.append(both[[f"n_{label_a}", f"n_{label_b}"]].astype(float).min(axis=None) if len(both) else np.nan)
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
                "unmatched": int((group["status"] != BOTH).sum()),
            }
        )
    columns = GROUP + [f"mean_{label_a}", f"mean_{label_b}", "mean_difference", "diff_low", "diff_high",
                       "max_abs_difference", "shift_x", "shift_y", "matched", "unmatched"]
    summary = pd.DataFrame.from_records(records, columns=columns)
    kept = (summary["matched"] + summary["unmatched"] > 0).to_numpy()  # groups with more than a reference row
    summary = summary[kept].reset_index(drop=True)
    stacked = np.stack(replicates)[kept] if replicates else None
    counts = np.asarray(counts, float)[kept] if counts else np.zeros(0)
    summary["diff_low"], summary["diff_high"] = _interval(stacked, counts, len(summary))
    for column in ("shift_x", "shift_y"):
        summary[column] = summary[column].astype(table[column].dtype)
    rank = {c: {v: i for i, v in enumerate(pd.unique(table[c]))} for c in GROUP}
    return summary.sort_values(by=GROUP, key=lambda col: col.map(rank[col.name]), kind="stable").reset_index(drop=True)
