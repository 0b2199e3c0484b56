"""Rows and files: the tidy result table, its CSV and JSON forms, and atomic writes."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
import torch
import torchvision

from . import metrics as M
from .metric_registry import LIE_CONTRIBUTION, LIE_DERIVATIVE, spec

COLUMNS = [
    "model",
    "variant",
    "weights",
    "mode",
    "direction",
    "layer",
    "stride",
    "aligned",
    "shift_x",
    "shift_y",
    "metric",
    "value",
    "n",
    "std",
    "ci_low",
    "ci_high",
    "partial",
    "seed",
    "size",
    "resize",
    "interpolation",
    "norm_mean",
    "norm_std",
]
REQUIRED = ["model", "variant", "weights", "mode", "layer", "stride", "aligned", "shift_x", "shift_y", "metric",
            "value", "n", "std", "ci_low", "ci_high", "partial"]  # files from older versions lack the rest


TEXT_COLUMNS = ["model", "weights", "mode", "direction", "layer", "metric", "variant", "interpolation", "norm_mean", "norm_std"]


def versions() -> dict[str, str]:
    """Versions that decide the numbers, recorded with every JSON result."""
    from . import __version__

    return {
        "transinv": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


BORN_AT_FLOOR = 1e-6  # growth below this is float rounding, not a layer breaking invariance


def born_at(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """For each non-zero shift, the layer where ``pooled_invariance_error`` grows most.

    Growth is a layer's error minus the previous measured layer's (forward order). The first
    measured layer is not a candidate: its error mostly reflects what the shift did to the image
    content itself (in crop mode, new content entering the view), not what the network added.
    Shifts where no layer's error grows by more than ``BORN_AT_FLOOR`` name none.
    """
    pooled = rows[rows["metric"] == M.POOLED_INVARIANCE_ERROR]
    found = []
    for (model, variant, sx, sy), group in pooled.groupby(["model", "variant", "shift_x", "shift_y"], sort=False):
        if (sx == 0 and sy == 0) or len(group) < 2:
            continue
        values = group["value"].to_numpy()
        growth = values[1:] - values[:-1]
        if growth.max() <= BORN_AT_FLOOR:  # nothing grows beyond float noise: no layer to name
            continue
        best = int(growth.argmax()) + 1
        found.append(
            {
                "model": model,
                "variant": variant,
                "shift_x": sx,
                "shift_y": sy,
                "layer": group["layer"].iloc[best],
                "growth": float(growth[best - 1]),
                "value": float(values[best]),
            }
        )
    return found


def born_at_lie(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """For each direction of ``--attribution lie``, the layer with the largest mean ``lie_contribution``
    and its share of the mean ``lie_derivative`` (contributions add up, so shares do too)."""
    found = []
    parts = rows[rows["metric"] == LIE_CONTRIBUTION]
    totals = rows[rows["metric"] == LIE_DERIVATIVE].set_index(["model", "variant", "shift_x", "shift_y"])["value"]
    for (model, variant, sx, sy), group in parts.groupby(["model", "variant", "shift_x", "shift_y"], sort=False):
        total = float(totals.get((model, variant, sx, sy), float("nan")))
        if not total > BORN_AT_FLOOR:  # an (almost) invariant output: nothing is born
            continue
        best = group.loc[group["value"].idxmax()]
        found.append({"model": model, "variant": variant, "shift_x": sx, "shift_y": sy, "layer": best["layer"],
                      "contribution": float(best["value"]), "share": float(best["value"]) / total})
    return found


@dataclass
class Result:
    """A finished (or interrupted) measurement: tidy rows plus the settings that produced them."""

    rows: pd.DataFrame
    settings: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return bool(self.summary.get("partial", False))

    def output(self) -> pd.DataFrame:
        """Only the output rows (``layer == 'output'``)."""
        return self.rows[self.rows["layer"] == M.OUTPUT_LAYER]

    def to_csv(self, path: str | Path | None = None) -> str:
        """The rows as CSV text (written atomically to ``path`` when given)."""
        text = self.rows.to_csv(index=False)
        if path is not None:
            write_atomic(path, text)
        return text

    def to_dict(self) -> dict[str, Any]:
        records = self.rows.astype(object).where(self.rows.notna(), None).to_dict(orient="records")
        return {"settings": self.settings, "summary": self.summary, "versions": versions(), "rows": records}

    def to_json(self, path: str | Path | None = None) -> str:
        """Rows, settings, summary and versions as JSON (written atomically to ``path`` when given)."""
        text = json.dumps(_finite(self.to_dict()), indent=2) + "\n"
        if path is not None:
            write_atomic(path, text)
        return text


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def whole_or_float(column: pd.Series) -> pd.Series:
    """Numbers as nullable ints when all are whole (empty cells stay empty), else floats
    (sub-pixel shifts)."""
    values = pd.to_numeric(column)
    present = values.dropna()
    return values.astype("Int64") if (present == present.round()).all() else values


def job_rows(measured: Sequence[tuple[Any, Sequence[Any], M.MetricState]], options: Any, partial: bool) -> pd.DataFrame:
    """The one row builder: each (job, layers, state)'s statistics with the job's identity (model
    label, variant, resolved weights, preprocessing), the run's mode, direction and seed, and each
    layer's stride and alignment (output rows are always aligned: they have no map to shift)."""
    records = []
    for job, layers, state in measured:
        by_name = {layer.name: layer for layer in layers}
        pre = job.model.preprocess
        identity = {
            "model": job.label, "variant": job.variant, "weights": job.model.weights, "mode": options.mode,
            "direction": options.direction, "partial": partial, "seed": options.seed, "size": pre.size,
            "resize": pre.resize, "interpolation": str(pre.interpolation.value),
            "norm_mean": ",".join(f"{v:g}" for v in pre.mean), "norm_std": ",".join(f"{v:g}" for v in pre.std),
        }
        for row in state.rows():
            layer = by_name.get(row["layer"])
            shift = (row["shift_x"], row["shift_y"])
            found = spec(row["metric"])  # an infinitesimal shift (Lie rows) is defined at every stride
            aligned = True if layer is None or (found is not None and found.attribution) else layer.aligned(shift)
            records.append({**identity, "stride": None if layer is None else layer.stride[1], "aligned": aligned, **row})
    return make_rows(records)


def make_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    """A tidy frame with the documented columns and dtypes (nullable ints for empty cells)."""
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    for column in ("stride", "shift_x", "shift_y", "n", "seed", "size", "resize"):
        frame[column] = whole_or_float(frame[column])
    frame["aligned"] = frame["aligned"].astype(bool)
    frame["partial"] = frame["partial"].astype(bool)
    return frame


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed into place only if the block succeeds,
    so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_target(path) as tmp:
        tmp.write_text(text)


def load_results(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Read transinv CSV or JSON (``{"rows": [...]}``) result files into one frame, in the given order."""
    if not paths:
        raise ValueError("no result files given")
    return pd.concat([_read_result(Path(p)) for p in paths], ignore_index=True)


def _read_result(path: Path) -> pd.DataFrame:
    """One result file; every failure becomes a one-line ``ValueError`` naming the file."""
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
                raise ValueError(f"{path}: not a transinv result (a JSON result holds a 'rows' list)")
            frame = pd.DataFrame.from_records(doc["rows"])
        else:
            frame = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"{path}: not a transinv result ({reason})") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a transinv result (missing columns: {', '.join(missing)})")
    return frame
