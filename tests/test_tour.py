"""The guided tour (docs/tour.md) checked against the tool: every command runs, every claim holds.

Each command of the tour follows a marker ``<!-- check: NAME -->`` and sits alone in a ```bash
block; ``CHECKS[NAME]`` asserts the claim that command illustrates. The command runs verbatim as
a subprocess (``python -m transinv measure ...``, ``show`` or ``flips``) from the repository root,
with ``-f json`` (and ``--no-progress`` for ``measure``) added, and the files it writes (``--plot``,
``--per-image``, ``-o``) and reads (``flips``'s per-image file) sent to a temporary folder. The ```text block pasted under a
command must also agree with the measurement: every number of its layer tables, output tables,
``images=`` and ``born at`` lines is compared with the run's JSON, so the tour cannot drift from
what the tool measures.

To print a command's table as the tour shows it (100 columns)::

    .venv/bin/python tests/test_tour.py show NAME     # NAME of a check marker, or 'all'
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour.md"
EXACT = 1e-5  # "exactly" equivariant / invariant: float32 rounding only
COLUMNS = "100"


# -- the tour, parsed -------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One checked command of the tour and the output pasted under it (None for a figure)."""

    name: str
    command: str
    shown: str | None
    line: int


MARKER = re.compile(r"<!--\s*check:\s*([\w-]+)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def _blocks(lines: list[str]) -> list[tuple[int, str, list[str]]]:
    """Fenced blocks as (first line number, info string, body lines)."""
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match:
            start, info, body = i, match.group(1), []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((start, info, body))
        i += 1
    return blocks


COMMANDS = ("transinv measure", "transinv show", "transinv flips")


def _commands(body: list[str]) -> list[str]:
    """``transinv measure``, ``show`` and ``flips`` commands of a bash block, continuation lines joined."""
    joined, current = [], ""
    for line in body:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip().startswith(COMMANDS):
            joined.append(" ".join(current.split()))
        current = ""
    return joined


def parse_tour(text: str) -> list[Step]:
    """Every check marker with the one command of the bash block after it and the text block
    right after that (only blank lines between them)."""
    lines = text.splitlines()
    blocks = _blocks(lines)
    steps = []
    for number, line in enumerate(lines):
        match = MARKER.search(line)
        if not match:
            continue
        after = [b for b in blocks if b[0] > number]
        assert after and after[0][1] == "bash", f"tour.md:{number + 1}: a check marker must precede a ```bash block"
        start, _, body = after[0]
        assert not any(MARKER.search(x) for x in lines[number + 1 : start]), f"tour.md:{number + 1}: marker without a command"
        commands = _commands(body)
        assert len(commands) == 1, f"tour.md:{start + 1}: a checked bash block holds exactly one transinv command"
        end = start + len(body) + 1
        shown = None
        if len(after) > 1 and after[1][1] == "text" and all(not x.strip() for x in lines[end + 1 : after[1][0]]):
            shown = "\n".join(after[1][2])
        steps.append(Step(match.group(1), commands[0], shown, number + 1))
    return steps


def tour_steps() -> list[Step]:
    return parse_tour(TOUR.read_text())


# -- running a command ------------------------------------------------------------------------


@dataclass
class Run:
    """A finished tour command: its JSON rows and summary (empty for show and flips) and the
    figures it wrote."""

    rows: pd.DataFrame
    summary: dict
    plots: list[Path]

    def layer(self, metric: str, series: str | None = None, layer: str | None = None) -> pd.DataFrame:
        part = self.rows[self.rows["metric"] == metric]
        if series is not None:
            part = part[part["series"] == series]
        if layer is not None:
            part = part[part["layer"] == layer]
        return part

    def value(self, metric: str, series: str, shift: int, layer: str = "output") -> float:
        part = self.layer(metric, series, layer)
        part = part[(part["shift_x"] == shift) & (part["shift_y"] == 0)]
        assert len(part) == 1, f"expected one {metric} row for {series} {layer} at shift {shift}, got {len(part)}"
        return float(part["value"].iloc[0])

    def series_names(self) -> list[str]:
        return list(dict.fromkeys(self.rows["series"]))


def series_label(model: str, variant: str) -> str:
    """How the table names a model and variant (``render._series_label``)."""
    return model if variant == "base" else f"{model} [{variant}]"


WRITTEN = ("--plot", "--per-image", "-o", "--output")  # files a command writes: sent to the scratch folder


def _argv(command: str, plot_dir: Path, fmt: str) -> tuple[list[str], list[Path]]:
    argv = shlex.split(command)
    assert argv[0] == "transinv" and argv[1] in ("measure", "show", "flips"), command
    subcommand, args = argv[1], argv[2:]
    assert not {"-f", "--format"} & set(args), "tour commands leave the format to the reader"
    assert subcommand != "measure" or not {"-o", "--output"} & set(args), "tour measure commands print their tables"
    plots = []
    for flag in WRITTEN:
        if flag in args:
            i = args.index(flag)
            args[i + 1] = str(plot_dir / Path(args[i + 1]).name)
            if flag != "--per-image":
                plots.append(Path(args[i + 1]))
    if subcommand == "flips":  # reads the per-image file an earlier command wrote
        args[0] = str(plot_dir / Path(args[0]).name)
    tail = ["-f", fmt] + (["--no-progress"] if subcommand == "measure" else [])
    return [sys.executable, "-m", "transinv", subcommand, *args, *tail], plots


def _env(scratch: Path) -> dict[str, str]:
    home = scratch / "torch-home"
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TRANSINV_OFFLINE": "1", "TORCH_HOME": str(home), "COLUMNS": COLUMNS}


def run_step(step: Step, scratch: Path) -> Run:
    argv, plots = _argv(step.command, scratch, "json")
    proc = subprocess.run(argv, cwd=ROOT, env=_env(scratch), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"tour.md:{step.line}: {step.command}\nexit {proc.returncode}: {proc.stderr[-2000:]}"
    doc = json.loads(proc.stdout)
    rows = pd.DataFrame(doc["rows"] if isinstance(doc, dict) else doc)  # show and flips print records
    rows["series"] = [series_label(m, v) for m, v in zip(rows["model"], rows["variant"])]
    return Run(rows, doc["summary"] if isinstance(doc, dict) else {}, plots)


# -- the claims -------------------------------------------------------------------------------

M = ""  # tour models are labelled by their factory names
EQ, POOLED = "equivariance_error", "pooled_invariance_error"
EXACT_METRICS = [EQ, POOLED, "equivariance_error_interior"]  # exact when a layer is (the in-place change is not)


def _nonzero_shifts(run: Run) -> list[int]:
    return sorted(int(s) for s in set(run.rows["shift_x"].dropna()) if s != 0)


def check_conv1_circular(run: Run, runs: "Runs") -> None:
    """Circular padding: exactly equivariant (and its channel means invariant) under circular
    shifts. Zero padding: clearly not (the border and the wrap seam)."""
    circ, zero = run.layer(EQ, M + "conv1_circular", "conv"), run.layer(EQ, M + "conv1", "conv")
    assert len(circ) == len(zero) == 5
    assert (circ["value"] <= EXACT).all()
    assert (run.layer(POOLED, M + "conv1_circular")["value"] <= EXACT).all()
    assert (zero[zero["shift_x"] != 0]["value"] > 0.05).all()


def check_conv1_crop(run: Run, runs: "Runs") -> None:
    """Crop mode: the unpadded conv is exact on the overlap, the zero-padded one is off by a
    roughly constant amount (two border columns, whatever the shift), about 1/sqrt(2) of its
    circular-mode error (four columns there)."""
    valid, zero = run.layer(EQ, M + "conv1_valid", "conv"), run.layer(EQ, M + "conv1", "conv")
    assert len(valid) == len(zero) == 9
    assert (valid["value"] <= EXACT).all()
    moved = zero[zero["shift_x"] != 0]["value"]
    assert (moved > 0.05).all() and moved.max() / moved.min() < 1.3
    circular = runs["conv1_circular"]
    for shift in (1, 2, 3, 4):
        ratio = run.value(EQ, M + "conv1", shift, "conv") / circular.value(EQ, M + "conv1", shift, "conv")
        assert 0.6 < ratio < 0.85, (shift, ratio)


def check_conv1_size(run: Run, runs: "Runs") -> None:
    """A border strip of fixed width: halving the view from 64 to 32 px raises the relative
    error by about sqrt((64 - d) / (32 - d)) (energy of 2 columns out of w - d)."""
    wide = runs["conv1_crop"]
    for shift in _nonzero_shifts(run):
        ratio = run.value(EQ, M + "conv1", shift, "conv") / wide.value(EQ, M + "conv1", shift, "conv")
        expected = math.sqrt((64 - shift) / (32 - shift))
        assert abs(ratio / expected - 1) < 0.2, (shift, ratio, expected)


def _strided_layers_exact_only_when_aligned(run: Run, series: str, layers: dict[str, int]) -> None:
    for layer, stride in layers.items():
        eq = run.layer(EQ, series, layer)
        pooled = run.layer(POOLED, series, layer)
        assert set(eq["stride"]) == {stride} and set(pooled["stride"]) == {stride}
        assert sorted(eq["shift_x"]) == [s for s in range(0, 9) if s % stride == 0 and s <= pooled["shift_x"].max()]
        assert eq["aligned"].all() and (eq["value"] <= EXACT).all()
        assert (pooled["aligned"] == (pooled["shift_x"] % stride == 0)).all()


def check_pool_stride2(run: Run, runs: "Runs") -> None:
    """Stride-1 circular layers exact everywhere; after a stride-2 pool, equivariance exists and is
    exact only at even shifts ('.' at odd). Max-pool: channel means change at odd shifts
    (aliasing). Average pool: keeps the channel means, the ReLU after the next conv does not."""
    for name in ("maxpool2", "avgpool2"):
        series = M + name
        _strided_layers_exact_only_when_aligned(run, series, {"conv": 1, "relu": 1, "pool": 2, "conv2": 2, "relu2": 2})
        for layer in ("conv", "relu"):
            assert (run.layer(POOLED, series, layer)["value"] <= EXACT).all()
    pooled = run.layer(POOLED)
    odd, even = pooled[pooled["shift_x"] % 2 == 1], pooled[pooled["shift_x"] % 2 == 0]
    assert (even["value"] <= EXACT).all()
    odd_max = odd[odd["series"] == M + "maxpool2"].set_index("layer")["value"]
    odd_avg = odd[odd["series"] == M + "avgpool2"].groupby("layer")["value"].max()
    assert (odd_max[["pool", "conv2", "relu2"]] > 1e-3).all()
    assert odd_avg["pool"] <= EXACT and odd_avg["conv2"] <= EXACT and odd_avg["relu2"] > 1e-3


def check_pool_size_vs_stride(run: Run, runs: "Runs") -> None:
    """A 4x4 max-pool: which shifts leave its channel means unchanged is decided by the stride
    (multiples of it), not by the window size 4: stride 2 is exact at shift 2 < 4 and not at 1
    or 3; stride 4 at none of 1, 2, 3; stride 1 at every shift."""
    for name, stride in (("maxpool4_stride1", 1), ("maxpool4_stride2", 2), ("maxpool4_stride4", 4)):
        series = M + name
        pooled = run.layer(POOLED, series, "pool")
        assert set(pooled["stride"]) == {stride} and len(pooled) == 9
        multiple = pooled["shift_x"] % stride == 0
        assert (pooled[multiple]["value"] <= EXACT).all()
        assert (pooled[~multiple]["value"] > 1e-3).all()
        eq = run.layer(EQ, series, "pool")
        assert sorted(eq["shift_x"]) == sorted(pooled[multiple]["shift_x"]) and (eq["value"] <= EXACT).all()


def check_heads(run: Run, runs: "Runs") -> None:
    """Same trunk, two heads: the flattened fully connected head moves its output much more than
    the global-average-pooled head, from a 1-pixel shift on."""
    fc, gap = M + "fc_head", M + "gap_head"
    assert not run.layer(EQ).size  # --layers none
    for shift in _nonzero_shifts(run):
        assert run.value("kl_divergence", fc, shift) > 5 * run.value("kl_divergence", gap, shift)
        assert run.value("prob_change", fc, shift) > 2 * run.value("prob_change", gap, shift)
        assert run.value("top1_agreement", fc, shift) <= run.value("top1_agreement", gap, shift)
    assert run.value("kl_divergence", fc, 1) > 10 * run.value("kl_divergence", gap, 1)
    assert run.value("top1_agreement", fc, 1) < 1 and run.value("top1_agreement", gap, 1) == 1


def check_resnet18(run: Run, runs: "Runs") -> None:
    """resnet18 (random weights) under circular shifts: the pooled error is born at the strided
    convolution of the stride-32 stage (of the stride-16 one at 8 px); BlurPool at least halves the KL divergence at the output and the pooled error of the
    last stage; APS with circular padding is exact at every layer and at the output."""
    base, blur, aps = "resnet18", "resnet18 [blurpool]", "resnet18 [aps+padding:circular]"
    assert run.series_names() == [base, blur, aps]
    born = [b for b in run.summary["born_at"] if series_label(b["model"], b["variant"]) == base]
    assert [(b["shift_x"], b["layer"]) for b in born] == [(1, "layer4.0.conv1"), (2, "layer4.0.conv1"),
                                                         (4, "layer4.0.conv1"), (8, "layer3.0.conv1")]
    for shift in _nonzero_shifts(run):
        assert run.value("kl_divergence", blur, shift) < 0.5 * run.value("kl_divergence", base, shift)
        assert run.value(POOLED, blur, shift, "layer4") < 0.5 * run.value(POOLED, base, shift, "layer4")
        assert run.value("kl_divergence", aps, shift) <= 1e-6
        assert run.value("prob_change", aps, shift) <= 1e-5
        assert run.value("top1_agreement", aps, shift) == 1
    assert run.value(EQ, base, 2, "conv1") > 0.1  # zero padding at the first layer already
    layers = run.rows[(run.rows["series"] == aps) & (run.rows["layer"] != "output") & run.rows["metric"].isin(EXACT_METRICS)]
    assert len(layers) and (layers["value"] <= EXACT).all()
    assert all(p.stat().st_size > 0 for p in run.plots)


def check_position(run: Run, runs: "Runs") -> None:
    """Zero padding: moving the same content relative to the frame changes every layer's maps
    and channel means, more in deeper layers; circular padding (no frame): exactly nothing."""
    base, circ = M + "position", M + "position [padding:circular]"
    layers = [f"relu{i}" for i in range(1, 7)]
    circular = run.rows[run.rows["series"] == circ]
    assert (circular[(circular["layer"] != "output") & circular["metric"].isin(EXACT_METRICS)]["value"] <= EXACT).all()
    assert (circular[circular["metric"] == "kl_divergence"]["value"] <= 1e-6).all()
    for shift in _nonzero_shifts(run):
        for layer in layers:
            assert run.value(EQ, base, shift, layer) > 0.1
            assert run.value(POOLED, base, shift, layer) > 1e-3
        if shift >= 2:
            assert run.value(EQ, base, shift, "relu6") > 1.3 * run.value(EQ, base, shift, "relu1")
        assert run.value("kl_divergence", base, shift) > 1e-6


CAT = ROOT / "transinv" / "data" / "images" / "chelsea.jpg"
ALIGNED_AT_4 = ["conv1", "relu", "maxpool", "layer1"]  # resnet18's layers of stride 2 and 4


def check_show_layer1(run: Run, runs: "Runs") -> None:
    """One aligned layer of resnet18 under a circular shift: the error comes from the edges only;
    the middle columns of the error map (7 to 10 of 16) are exactly 0."""
    from transinv.reports.show import capture

    rows = run.rows
    assert list(rows["layer"]) == ["layer1"] and rows["aligned"].all() and list(rows["stride"]) == [4]
    assert 0.2 < rows["equivariance_error"].iloc[0] < 0.35
    shown = capture("resnet18", CAT, "4", "layer1", weights="none", mode="circular", size=64, resize=96)
    columns = (shown.variants[0].layers[0].error > EXACT).any(dim=0)
    assert len(columns) == 16 and not columns[7:11].any() and columns[:6].all() and columns[11:].all()
    assert all(p.stat().st_size > 0 for p in run.plots)


def check_show_variants(run: Run, runs: "Runs") -> None:
    """Base: edge error up to stride 4, in-place change everywhere from stride 8; BlurPool keeps the
    edge error and shrinks the deep change; APS with circular padding: every map exactly 0."""
    base, blur, aps = (run.rows[run.rows["variant"] == v].set_index("layer")
                       for v in ("base", "blurpool", "aps+padding:circular"))
    assert list(base.index[base["aligned"]]) == ALIGNED_AT_4 and set(ALIGNED_AT_4) <= set(aps.index)
    assert base.loc[ALIGNED_AT_4, "equivariance_error"].between(0.15, 0.35).all()
    moved = base.index[~base["aligned"]]
    assert moved[0] == "layer2.0.conv1" and base.loc[moved, "error_map_mean"].between(0.2, 0.5).all()
    assert (blur.loc[ALIGNED_AT_4, "equivariance_error"] > 0.15).all()
    assert blur.loc["layer4", "error_map_mean"] < 0.3 * base.loc["layer4", "error_map_mean"]
    assert (aps["error_map_mean"] <= EXACT).all() and (aps.loc[ALIGNED_AT_4, "equivariance_error"] <= EXACT).all()
    assert all(p.stat().st_size > 0 for p in run.plots)


def check_heads_per_image(run: Run, runs: "Runs") -> None:
    """The per-image rows: 2 heads x 9 photos x 9 shifts; the pooled head never flips; the
    flattened head flips 6 photos, and its rows give its top1_agreement at every shift."""
    rows = pd.read_csv(runs.scratch / "heads.csv")
    assert len(rows) == 162
    fc_rows, gap_rows = (rows[rows["model"].str.endswith(name)] for name in ("fc_head", "gap_head"))
    assert not gap_rows["flipped"].any() and fc_rows[fc_rows["flipped"]]["image"].nunique() == 6
    fc = next(s for s in run.series_names() if s.endswith("fc_head"))
    for shift, group in fc_rows.groupby("shift_x"):
        assert abs((~group["flipped"]).mean() - run.value("top1_agreement", fc, int(shift))) < 1e-12


def check_heads_flips(run: Run, runs: "Runs") -> None:
    """The sheet: six photos of the flattened head, the deep field and the rocket first (1 px, at
    5 or more of their 8 shifts), every one within 4 px."""
    ranking = run.rows
    assert len(ranking) == 6 and ranking["model"].str.endswith("fc_head").all()
    assert [Path(p).name for p in ranking["image"][:2]] == ["hubble_deep_field.jpg", "rocket.jpg"]
    assert list(ranking["distance"][:2]) == [1.0, 1.0] and (ranking["flips"][:2] >= 5).all()
    assert (ranking["distance"] <= 4).all() and (ranking["shifts"] == 8).all()
    assert all(p.stat().st_size > 0 for p in run.plots)


CHECKS: dict[str, Callable[[Run, "Runs"], None]] = {
    "conv1_circular": check_conv1_circular,
    "conv1_crop": check_conv1_crop,
    "conv1_size": check_conv1_size,
    "pool_stride2": check_pool_stride2,
    "pool_size_vs_stride": check_pool_size_vs_stride,
    "heads": check_heads,
    "resnet18": check_resnet18,
    "position": check_position,
    "show_layer1": check_show_layer1,
    "show_variants": check_show_variants,
    "heads_per_image": check_heads_per_image,
    "heads_flips": check_heads_flips,
}


# -- the pasted output, compared with the measurement -----------------------------------------

LAYER_ROW = re.compile(r"^\s*(\S+)\s+(\d+)\s+((?:(?:\d*\.\d+|\.)\s*)+)$")
LAYER_HEADER = re.compile(r"^\s*layer\s+stride\s+(.*)$")


def _number(cell: str) -> float | None:
    token = cell.strip().split(" ")[0] if cell.strip() else ""
    try:
        return float(token)
    except ValueError:
        return None


def _half_unit(cell: str) -> float:
    """Half a unit in the last printed digit of a cell's value ('0.135' -> 0.0005)."""
    return 0.51 * 10.0 ** Decimal(cell.strip().split(" ")[0]).as_tuple().exponent


def compare_shown(shown: str, run: Run) -> int:
    """Assert every number of the pasted output equals the run's (to its printed precision).

    Returns how many numbers were compared. Understands the header's ``images=``, series labels,
    per-layer tables ('.' = no equivariance row), rich output tables (one per metric, or one per
    series) and ``born at`` lines.
    """
    labels = run.series_names()
    series = labels[0] if len(labels) == 1 else None
    table: str | None = None
    shifts: list[int] = []
    header_cells: list[str] = []
    compared = 0
    lines = shown.splitlines()
    images = re.search(r"\bimages=(\d+)", shown)
    if images:
        assert int(images.group(1)) == run.summary["images"]
        compared += 1
    for line in lines:
        text = line.strip()
        if text in labels:
            series = text
            continue
        if text.startswith((EQ + " by layer", POOLED + " by layer")):
            table = text.split(" ")[0]
            continue
        if text == "output" or text.startswith("output ") or text == "over the whole shift set":
            table, header_cells = ("output whole" if text.startswith("over") else text), []
            continue
        header = LAYER_HEADER.match(line)
        if header and table in (EQ, POOLED):
            shifts = [int(s) for s in header.group(1).split()]
            continue
        row = LAYER_ROW.match(line)
        if row and table in (EQ, POOLED) and shifts:
            layer, cells = row.group(1), row.group(3).split()
            assert series is not None, f"a {table} row for {layer} before any series label"
            assert len(cells) == len(shifts), line
            for shift, cell in zip(shifts, cells):
                measured = run.layer(table, series, layer)
                measured = measured[(measured["shift_x"] == shift) & (measured["shift_y"] == 0)]
                if cell == ".":
                    assert table == EQ and measured.empty, f"{series} {layer} {shift}: '.' shown, but measured"
                    continue
                assert len(measured) == 1, f"{series} {table} {layer} shift {shift}: shown {cell}, not measured"
                value = float(measured["value"].iloc[0])
                assert abs(float(cell) - value) <= 5.01e-4, f"{series} {table} {layer} shift {shift}: shown {cell}, measured {value:.5f}"
                compared += 1
            continue
        if text.startswith("┃") and table and table.startswith("output"):
            cells = [c.strip() for c in text.strip("┃").split("┃")]
            header_cells = cells if not header_cells else [f"{a} {b}".strip() for a, b in zip(header_cells, cells)]
            continue
        if text.startswith("│") and table and table.startswith("output") and header_cells:
            cells = [c.strip() for c in text.strip("│").split("│")]
            if not cells[0]:
                continue  # a wrapped cell's second line
            if table == "output whole":  # one row per series, one column per whole-set metric
                who = cells[0]
                for metric, cell in zip(header_cells[1:], cells[1:]):
                    part = run.layer(metric, who, "output")
                    assert len(part) == 1, f"{who} {metric}: shown {cell}, measured {len(part)} rows"
                    shown_value, value = _number(cell), float(part["value"].iloc[0])
                    assert shown_value is not None, f"cannot read {cell!r}"
                    assert abs(shown_value - value) <= max(5.01e-5, _half_unit(cell)), f"{who} {metric}: shown {cell}, measured {value}"
                    compared += 1
                continue
            shift = int(cells[0])
            for head, cell in zip(header_cells[1:-1], cells[1:-1]):
                metric, who = (head, series) if table == "output" else (table.split(" ", 1)[1], head)
                shown_value, value = _number(cell), run.value(metric, who, shift)
                assert shown_value is not None, f"cannot read {cell!r}"
                assert abs(shown_value - value) <= max(5.01e-5, _half_unit(cell)), f"{who} {metric} shift {shift}: shown {cell}, measured {value}"
                compared += 1
    compared += _compare_born_at(shown, run)
    return compared


def _compare_born_at(shown: str, run: Run) -> int:
    text = " ".join(shown.split())
    compared = 0
    for part in text.split("born at, ")[1:]:
        label, _, runs_text = part.partition(" (layer where pooled_invariance_error grows most): ")
        entries = [b for b in run.summary["born_at"] if series_label(b["model"], b["variant"]) == label]
        assert entries, f"born at line for {label!r}, which has no born-at entries"
        assert all(b["growth"] > 1e-6 for b in entries), f"{label}: born at of an exact network is float noise"
        order = [(b["shift_x"], b["layer"]) for b in entries]
        expected = []
        for shift, layer in order:
            if expected and expected[-1][2] == layer:
                expected[-1][1] = shift
            else:
                expected.append([shift, shift, layer])
        expected_text = ", ".join(f"{a}: {layer}" if a == b else f"{a}..{b}: {layer}" for a, b, layer in expected)
        assert runs_text.strip().startswith(expected_text), f"{label}: shown {runs_text!r}, measured {expected_text!r}"
        compared += 1
    return compared


# -- pytest -----------------------------------------------------------------------------------


class Runs:
    """Tour commands run lazily, once per session, by check name."""

    def __init__(self, steps: list[Step], scratch: Path) -> None:
        self.steps = {s.name: s for s in steps}
        self.scratch = scratch
        self.done: dict[str, Run] = {}

    def __getitem__(self, name: str) -> Run:
        if name not in self.done:
            for before in self._writers_of(self.steps[name]):
                self[before]
            self.done[name] = run_step(self.steps[name], self.scratch)
        return self.done[name]

    def _writers_of(self, step: Step) -> list[str]:
        """The steps that write the per-image file a ``flips`` step reads."""
        argv = shlex.split(step.command)
        if argv[1] != "flips":
            return []
        return [s.name for s in self.steps.values() if f"--per-image {Path(argv[2]).name}" in s.command]


STEPS = tour_steps() if TOUR.exists() else []


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(STEPS, tmp_path_factory.mktemp("tour"))


def test_every_tour_command_has_a_check_and_every_check_a_command() -> None:
    text = TOUR.read_text()
    names = [s.name for s in STEPS]
    assert len(names) == len(set(names)), "check names must be unique"
    assert names == list(CHECKS), f"markers {names} vs checks {list(CHECKS)}"
    commands = [c for start, info, body in _blocks(text.splitlines()) if info == "bash" for c in _commands(body)]
    assert commands == [s.command for s in STEPS], "every transinv command of the tour needs a check marker"


@pytest.mark.parametrize("name", list(CHECKS))
def test_tour_claim(name: str, runs: Runs) -> None:
    CHECKS[name](runs[name], runs)


@pytest.mark.parametrize("name", [s.name for s in STEPS if s.shown is not None])  # not the figures
def test_tour_output_matches_the_measurement(name: str, runs: Runs) -> None:
    step = runs.steps[name]
    assert compare_shown(step.shown, runs[name]) > 0, f"tour.md:{step.line}: nothing recognisable in the pasted output"


def test_tour_networks_compared_side_by_side_share_their_weights() -> None:
    """The tour says 'the same kernel', 'the same trunk', 'the same weights': check it, and that
    every network maps images to (N, 10) logits without touching the caller's RNG."""
    import torch

    from transinv import tour_models as T

    def params(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}

    state = torch.random.get_rng_state()
    models = {name: factory() for name, factory in T.TOUR_MODELS.items()}
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in (("conv1", "conv1_circular"), ("conv1", "conv1_valid"), ("position", "position_circular")):
        pa, pb = params(models[a]), params(models[b])
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa), (a, b)
    trunk_fc, trunk_gap = params(models["fc_head"], "conv"), params(models["gap_head"], "conv")
    assert trunk_fc.keys() == trunk_gap.keys() and all(torch.equal(trunk_fc[k], trunk_gap[k]) for k in trunk_fc)
    assert [m.padding_mode for m in models["position"].modules() if isinstance(m, torch.nn.Conv2d)] == ["zeros"] * 6
    assert {m.padding_mode for m in models["position_circular"].modules() if isinstance(m, torch.nn.Conv2d)} == {"circular"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, model in models.items():
            assert model(x).shape == (2, T.CLASSES), name


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_tour_links_to_the_readme_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)}
    links = re.findall(r"\]\(\.\./README\.md#([\w\-]+)\)", TOUR.read_text())
    assert links and not set(links) - anchors, f"broken README anchors: {sorted(set(links) - anchors)}"


def test_tour_figures_are_small() -> None:
    figures = sorted((ROOT / "docs" / "tour").glob("*.png"))
    text = TOUR.read_text()
    for figure in figures:
        assert figure.stat().st_size < 150_000, figure
        assert f"tour/{figure.name}" in text, f"{figure} is not used by the tour"


# -- printing the tables for the tour ----------------------------------------------------------


def _show(names: list[str]) -> None:
    steps = {s.name: s for s in tour_steps()}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names or list(steps):
            argv, _ = _argv(steps[name].command, Path(scratch), "table")
            proc = subprocess.run(argv, cwd=ROOT, env=_env(Path(scratch)), capture_output=True, text=True)
            print(f"=== {name}: {steps[name].command}\n{proc.stdout}{proc.stderr}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "show":
        _show([n for n in sys.argv[2:] if n != "all"])
    else:
        print(__doc__)
