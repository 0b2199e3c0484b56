"""Pass/fail bounds on measured rows, for CI: ``metric[@layer][:shift]=value`` as an upper bound
(``--max``) or a lower one (``--min``).

A bound covers every row it matches (every layer and shift it does not name) and the worst row
decides. A bound that matches no row of the run is an error, never a silent pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import pandas as pd

from .errors import UserError, did_you_mean
from .metric_registry import METRICS, OUTPUT_LAYER

Side = Literal["max", "min"]
SYNTAX = "METRIC[@LAYER][:SHIFT]=VALUE"


@dataclass(frozen=True)
class Bound:
    """One bound: ``side`` max (value <= limit) or min (value >= limit); ``layer`` None = every
    layer of a layer metric; ``shift`` None = every shift, a number = that shift along the run's
    direction, a pair = (dx, dy)."""

    side: Side
    metric: str
    layer: str | None
    shift: float | tuple[float, float] | None
    limit: float
    text: str

    @property
    def name(self) -> str:
        """The bound as written, without its value (``equivariance_error@layer3``)."""
        return self.text.rpartition("=")[0]


def _fail(side: Side, text: str, why: str) -> UserError:
    return UserError(f"--{side} {text}: {why}")


def parse_bound(text: str, side: Side) -> Bound:
    """``metric[@layer][:shift]=value`` -> Bound; every mistake is a one-line ``UserError``."""
    left, equals, value = text.rpartition("=")
    if not equals or not left:
        raise _fail(side, text, f"write {SYNTAX}, e.g. kl_divergence=1e-6")
    try:
        limit = float(value)
    except ValueError:
        raise _fail(side, text, f"the bound {value!r} is not a number") from None
    if not math.isfinite(limit):
        raise _fail(side, text, "the bound must be a finite number")
    head, colon, shift_text = left.partition(":")
    metric, at, layer = head.partition("@")
    spec = METRICS.get(metric)
    if spec is None:
        raise _fail(side, text, f"unknown metric {metric!r}{did_you_mean(metric, list(METRICS))}")
    if at and not layer:
        raise _fail(side, text, "@ needs a layer name (see `transinv layers MODEL`)")
    if spec.scope != "layer" and layer not in ("", OUTPUT_LAYER):
        raise _fail(side, text, f"{metric} is measured at the output: drop @{layer}")
    if spec.scope == "layer" and layer == OUTPUT_LAYER:
        raise _fail(side, text, f"{metric} is measured at layers, not the output")
    shift: float | tuple[float, float] | None = None
    if colon:
        if spec.scope == "set":
            raise _fail(side, text, f"{metric} covers the whole shift set: drop :{shift_text}")
        shift = _parse_shift(shift_text, side, text)
    low, high = spec.bounds or (-math.inf, math.inf)
    if not low <= limit <= high:
        raise _fail(side, text, f"{metric} lies in [{low:g}, {high:g}], so this bound can never decide")
    return Bound(side, metric, layer or (OUTPUT_LAYER if spec.scope != "layer" else None), shift, limit, text)


def _parse_shift(text: str, side: Side, whole: str) -> float | tuple[float, float]:
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise _fail(side, whole, f"the shift {text!r} is one number (along the run's direction) or DX,DY")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def parse_bounds(at_most: Sequence[str] | Mapping[str, float] | None = None,
                 at_least: Sequence[str] | Mapping[str, float] | None = None) -> list[Bound]:
    """Bounds from the CLI's ``NAME=VALUE`` texts or a notebook's ``{NAME: VALUE}`` mappings."""
    bounds = []
    for side, given in (("max", at_most), ("min", at_least)):
        texts = [f"{k}={v}" for k, v in given.items()] if isinstance(given, Mapping) else list(given or [])
        bounds.extend(parse_bound(text, side) for text in texts)  # type: ignore[arg-type]
    if not bounds:
        raise UserError("give at least one bound: --max METRIC=VALUE or --min METRIC=VALUE")
    return bounds


@dataclass(frozen=True)
class Verdict:
    """A bound checked against a run: the worst matching row, and how many rows it covered."""

    bound: Bound
    worst: dict[str, Any]
    rows: int
    series: bool  # several models or variants: name the worst row's in the line

    @property
    def passed(self) -> bool:
        value = self.worst["value"]
        if value is None or not math.isfinite(value):
            return False
        return value <= self.bound.limit if self.bound.side == "max" else value >= self.bound.limit

    def line(self) -> str:
        """'FAIL kl_divergence at output, shift 4,0: 3.2e-05 [95% CI 2.1e-05, 4.4e-05], n=9 > max 1e-06'."""
        b, w = self.bound, self.worst
        where = f"{b.metric} at {w['layer']}"
        if not pd.isna(w["shift_x"]):
            where += f", shift {w['shift_x']:g},{w['shift_y']:g}"
        else:
            where += ", over the shift set"
        if self.series:
            where += f" ({w['model']}" + ("" if w["variant"] == "base" else f" [{w['variant']}]") + ")"
        value, low, high = w["value"], w["ci_low"], w["ci_high"]
        relation = ("<=" if b.side == "max" else ">=") if self.passed else (">" if b.side == "max" else "<")
        text = f"{'ok  ' if self.passed else 'FAIL'} {where}: {value:.4g} [95% CI {low:.3g}, {high:.3g}], n={w['n']} " \
               f"{relation} {b.side} {b.limit:g}"
        if self.rows > 1:
            text += f" (worst of {self.rows} rows)"
        if low <= b.limit <= high:
            text += "; the bound lies inside the interval: more images would decide"
        return text


def _shift_matches(rows: pd.DataFrame, shift: float | tuple[float, float], text: str, side: Side) -> pd.Series:
    """Rows at ``shift``: a pair is (dx, dy); one number is that shift along the run's direction."""
    sx, sy = rows["shift_x"].astype(float), rows["shift_y"].astype(float)
    if isinstance(shift, tuple):
        return (sx == shift[0]) & (sy == shift[1])
    direction = rows["direction"]
    if (direction == "grid").any():
        raise _fail(side, text, "a grid run needs the shift as DX,DY")
    along = {"x": (shift, 0.0), "y": (0.0, shift), "diagonal": (shift, shift)}
    return pd.concat([(direction == d) & (sx == x) & (sy == y) for d, (x, y) in along.items()], axis=1).any(axis=1)


def evaluate(bound: Bound, rows: pd.DataFrame) -> Verdict:
    """Check one bound against a run's rows; a bound that matches nothing is a ``UserError``
    naming what the run has (so a typo never passes)."""
    side, text = bound.side, bound.text
    spec = METRICS[bound.metric]
    found = rows[rows["metric"] == bound.metric]
    if found.empty:
        present = ", ".join(dict.fromkeys(rows["metric"]))
        hint = " (it needs labelled images)" if spec.needs_labels else ""
        raise _fail(side, text, f"this run has no {bound.metric} rows{hint}; it has: {present}")
    if bound.layer is not None:
        layers = list(dict.fromkeys(found["layer"]))
        found = found[found["layer"] == bound.layer]
        if found.empty:
            raise _fail(side, text, f"no layer {bound.layer!r} in this run{did_you_mean(bound.layer, layers)}; "
                                    f"it measured: {', '.join(layers)}")
    if spec.scope != "set":
        if bound.shift is not None:
            shifts = sorted(dict.fromkeys(zip(found["shift_x"], found["shift_y"])))
            found = found[_shift_matches(found, bound.shift, text, side)]
            if found.empty:
                listed = ", ".join(f"{x:g},{y:g}" for x, y in shifts)
                raise _fail(side, text, f"no {bound.metric} rows at this shift; the run has shifts {listed}")
        else:  # shift 0 is the reference: always exact, it would make a vacuous bound look checked
            shifted = found[(found["shift_x"].astype(float) != 0) | (found["shift_y"].astype(float) != 0)]
            if shifted.empty:
                raise _fail(side, text, f"the run has {bound.metric} rows only at shift 0 (the reference); "
                                        "measure shifts that are multiples of the layer's stride")
            found = shifted
    values = found["value"].astype(float).to_numpy()
    bad = ~pd.notna(values)
    pick = int(bad.argmax()) if bad.any() else int(values.argmax() if side == "max" else values.argmin())
    worst = found.iloc[pick].to_dict()
    series = rows[["model", "variant"]].drop_duplicates().shape[0] > 1
    return Verdict(bound, worst, len(found), series)


def check(bounds: Sequence[Bound], rows: pd.DataFrame) -> list[Verdict]:
    """Every bound's verdict, in the order given (all are evaluated before any is reported, so a
    bad bound is found whatever its place)."""
    return [evaluate(bound, rows) for bound in bounds]


def failure_message(verdicts: Sequence[Verdict]) -> str:
    """The lines of the failed bounds, under a count (the text of the pytest helpers' assertion)."""
    failed = [v for v in verdicts if not v.passed]
    return f"{len(failed)} of {len(verdicts)} bounds failed:\n" + "\n".join(v.line() for v in failed)
