"""Rows and files: the tidy result table, its CSV and JSON forms, and atomic writes."""

from __future__ import annotations

import base64
import json
import math
import os
import platform
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torchvision

from ..engine import metrics as M
from ..metric_registry import LIE_CONTRIBUTION, LIE_DERIVATIVE, spec

COLUMNS = [
    "model",
    "variant",
    "weights",
    "mode",
    "direction",
    "layer",
    "stride",
    "aligned",
    "resampled",
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
    from .. import __version__

    return {
        "transinv": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


BORN_AT_FLOOR = 1e-6  # errors and rises below this are float rounding, not a layer breaking invariance

MainPath = Mapping[tuple[str, str], Collection[str]]  # (model, variant) -> layers on the main path


def born_at(rows: pd.DataFrame, main: MainPath | None = None) -> list[dict[str, Any]]:
    """For each non-zero shift, the layer where ``pooled_invariance_error`` grows most.

    Only layers on the main path are compared (``main``; without it, every measured layer), each
    with the main-path layer measured before it (``previous``), so a shortcut branch is never
    compared with the layer it runs beside. Growth is relative, ``e / max(e_previous, FLOOR)``, so a
    layer is not favoured for working at a larger scale of error. A layer is a candidate only where
    its error rises by more than ``BORN_AT_FLOOR``; the first compared layer is none (its error
    mostly reflects what the shift did to the image content itself), and a shift where no layer
    rises that much (an exactly invariant network) names none.
    """
    pooled = rows[(rows["metric"] == M.POOLED_INVARIANCE_ERROR) & (rows["layer"] != M.OUTPUT_LAYER)]
    found = []
    for (model, variant, sx, sy), group in pooled.groupby(["model", "variant", "shift_x", "shift_y"], sort=False):
        if main is not None:
            group = group[group["layer"].isin(main.get((model, variant), ()))]
        if (sx == 0 and sy == 0) or len(group) < 2:
            continue
        values = group["value"].to_numpy(dtype=float)
        growth = values[1:] / np.maximum(values[:-1], BORN_AT_FLOOR)
        growth[values[1:] - values[:-1] <= BORN_AT_FLOOR] = 0.0
        if not growth.any():  # nothing rises beyond float noise: no layer to name
            continue
        best = int(growth.argmax())
        found.append(
            {
                "model": model,
                "variant": variant,
                "shift_x": sx,
                "shift_y": sy,
                "layer": group["layer"].iloc[best + 1],
                "previous": group["layer"].iloc[best],
                "growth": float(growth[best]),
                "value": float(values[best + 1]),
            }
        )
    return found


def interval_warnings(records: list[dict[str, Any]], warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The rows whose 95% interval means little (``ci_warning``, README: Intervals), for the
    summary; ``warn`` gets one line that counts them by reason."""
    keys = ("model", "variant", "layer", "shift_x", "shift_y", "metric", "n", "ci_warning")
    flagged = [{k: record[k] for k in keys} for record in records if record.get("ci_warning")]
    if flagged and warn is not None:
        reasons = {"n<10": "fewer than 10 images", "skewed": "values too skewed for n (n < 25 skewness^2)"}
        counts = pd.Series([r["ci_warning"] for r in flagged]).value_counts()
        detail = "; ".join(f"{reasons.get(str(k), k)}: {v}" for k, v in counts.items())
        warn(f"{len(flagged)} of {len(records)} rows have a 95% interval that means little ({detail}); "
             "the JSON summary lists them under interval_warnings")
    return flagged


REPLICATES_ENCODING = "base64 of little-endian float64, one string per row"


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
    """A finished (or interrupted) measurement: tidy rows plus the settings that produced them.

    ``replicates`` (``rows x R``, or None) holds each row's Poisson-bootstrap replicate means,
    the raw material of paired differences (``transinv.reports.compare``).
    """

    rows: pd.DataFrame
    settings: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    replicates: np.ndarray | None = field(default=None, repr=False)

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
        doc = {"settings": self.settings, "summary": self.summary, "versions": versions(), "rows": records}
        if self.replicates is not None:
            means = np.ascontiguousarray(self.replicates, dtype="<f8")
            doc["replicates"] = {"count": means.shape[1], "scheme": M.BOOTSTRAP_SCHEME, "encoding": REPLICATES_ENCODING,
                                 "means": [base64.b64encode(row.tobytes()).decode("ascii") for row in means]}
        return doc

    def to_json(self, path: str | Path | None = None) -> str:
        """Rows, settings, summary and versions as JSON (written atomically to ``path`` when given)."""
        text = json_text(self.to_dict())
        if path is not None:
            write_atomic(path, text)
        return text


def json_text(obj: Any) -> str:
    """Plain data as indented JSON text; NaN and infinities become null (JSON has no NaN)."""
    return json.dumps(_finite(obj), indent=2) + "\n"


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


def job_records(measured: Sequence[tuple[Any, Sequence[Any], M.MetricState]], options: Any, partial: bool) -> list[dict[str, Any]]:
    """The one row builder (``make_rows`` frames it): each (job, layers, state)'s statistics with the job's identity (model
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
    return records


def make_rows(records: list[dict[str, Any]]) -> pd.DataFrame:
    """A tidy frame with the documented columns and dtypes (nullable ints for empty cells)."""
    frame = pd.DataFrame.from_records(records, columns=COLUMNS)
    for column in ("stride", "shift_x", "shift_y", "n", "seed", "size", "resize"):
        frame[column] = whole_or_float(frame[column])
    frame["aligned"] = frame["aligned"].astype(bool)
    frame["resampled"] = frame["metric"] == M.EQUIVARIANCE_ERROR_RESAMPLED  # from the metric: never mixed up
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


def read_result(path: str | Path) -> Result:
    """One result file as a ``Result``: a JSON file gives back its settings, summary and bootstrap
    replicates (when drawn by this version's scheme); a CSV file only its rows. Failures are
    one-line ``ValueError``s naming the file."""
    path = Path(path)
    rows, doc = _read_result(path)
    saved = doc.get("replicates")
    replicates = None
    if (isinstance(saved, dict) and saved.get("encoding") == REPLICATES_ENCODING
            and saved.get("scheme") == M.BOOTSTRAP_SCHEME and saved.get("means")):
        if len(saved["means"]) != len(rows):
            raise ValueError(f"{path}: {len(saved['means'])} rows of bootstrap replicates for {len(rows)} rows")
        replicates = np.stack([np.frombuffer(base64.b64decode(m), dtype="<f8") for m in saved["means"]])
    return Result(rows=rows, settings=doc.get("settings") or {}, summary=doc.get("summary") or {},
                  replicates=replicates)


def load_results(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Read transinv CSV or JSON (``{"rows": [...]}``) result files into one frame, in the given order."""
    if not paths:
        raise ValueError("no result files given")
    return pd.concat([_read_result(Path(p))[0] for p in paths], ignore_index=True)


def _read_result(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One result file's rows, and its JSON document (empty for CSV); every failure becomes a
    one-line ``ValueError`` naming the file."""
    doc: dict[str, Any] = {}
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
    return frame, doc
