"""The terminal tables (the default output on a terminal), read back cell by cell against the rows.

``transinv measure ... -f table -o run.json`` prints the tables and writes the same run's rows and
summary; every printed cell must be the row it stands for: per-layer values (3 decimals, '.' where
a shift is not aligned) with strides, output metrics with their intervals and ``n``, whole-set
metrics, and the born-at line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from transinv import cli

WIDTH = 200
LAYER_METRICS = ("equivariance_error", "pooled_invariance_error")


def _table(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture,
           monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], pd.DataFrame, dict]:
    """The printed lines, and the rows and summary the same run wrote to JSON."""
    target = tmp_path / "run.json"
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setattr(sys, "argv", ["transinv", "measure", *command, "-f", "table", "-o", str(target)])
    capsys.readouterr()
    cli.main()
    out = capsys.readouterr().out
    doc = json.loads(target.read_text())
    rows = pd.DataFrame.from_records(doc["rows"])
    for column in ("shift_x", "shift_y", "stride", "n"):  # whole numbers here; JSON's null makes them floats
        rows[column] = rows[column].astype("Int64")
    return out.splitlines(), rows, doc["summary"]


def _series(model: str, variant: str) -> str:
    return model if variant == "base" else f"{model} [{variant}]"


def _label(sx: int, sy: int) -> str:
    return str(sx) if sy == 0 else f"y{sy}" if sx == 0 else f"({sx},{sy})"


def _three(value: float) -> str:
    text = f"{value:.3f}"
    return text[1:] if text.startswith("0.") else text


def _interval(row: pd.Series) -> str:
    """Value and interval as the tables print them; the value alone where there is no interval."""
    if pd.isna(row["ci_low"]) or pd.isna(row["ci_high"]):
        return f"{row['value']:.3g}"
    return f"{row['value']:.3g} [{row['ci_low']:.2g}, {row['ci_high']:.2g}]"


def _layer_tables(lines: list[str], series: list[str]) -> dict[tuple[str, str], dict[str, list[str]]]:
    """(series, metric) -> layer -> its cells (stride, then one per shift), with the shift labels
    under the key '' ; tables split over the width are joined."""
    tables: dict[tuple[str, str], dict[str, list[str]]] = {}
    current, metric, i = series[0], None, 0
    while i < len(lines):
        line = lines[i].strip()
        if line in series:
            current = line
        elif line.split(" by layer")[0] in LAYER_METRICS:
            metric = line.split(" by layer")[0]
        elif metric and line.startswith("layer ") and line.split()[:2] == ["layer", "stride"]:
            table = tables.setdefault((current, metric), {"": []})
            table[""] += line.split()[2:]
            i += 2  # the rule under the header
            while i < len(lines) and lines[i].strip():
                name, stride, *cells = lines[i].split()
                table.setdefault(name, [stride]).extend(cells)
                i += 1
            continue
        elif line.startswith(("output", "over the whole")):
            metric = None
        i += 1
    return tables


def _boxed(lines: list[str], title: str) -> list[list[str]]:
    """Header and body cells of the rich table printed under ``title`` (box-drawing borders)."""
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    cells = []
    for line in lines[start + 1:]:
        if line.startswith(("┃", "│")):
            cells.append([cell.strip() for cell in line.strip()[1:-1].replace("┃", "│").split("│")])
        elif line.startswith("└"):
            break
    return cells


def _check_layer_tables(lines: list[str], rows: pd.DataFrame) -> int:
    checked = 0
    series_list = [_series(m, v) for m, v in dict.fromkeys(zip(rows["model"], rows["variant"]))]
    tables = _layer_tables(lines, series_list)
    for (model, variant), part in rows[rows["layer"] != "output"].groupby(["model", "variant"], sort=False):
        layers = list(dict.fromkeys(part["layer"]))
        for metric in LAYER_METRICS:
            table = tables[(_series(model, variant), metric)]
            values = part[part["metric"] == metric]
            shifts = list(dict.fromkeys(zip(part["shift_x"], part["shift_y"])))
            if metric == "equivariance_error":  # a column only where some layer is aligned
                shifts = [s for s in shifts if ((values["shift_x"] == s[0]) & (values["shift_y"] == s[1])).any()]
            assert table[""] == [_label(*s) for s in shifts]
            assert [name for name in table if name] == layers  # forward order
            for layer in layers:
                stride = part.loc[part["layer"] == layer, "stride"].iloc[0]
                expected = [str(int(stride))]
                for sx, sy in shifts:
                    cell = values[(values["layer"] == layer) & (values["shift_x"] == sx) & (values["shift_y"] == sy)]
                    expected.append(_three(cell["value"].iloc[0]) if len(cell) else ".")
                assert table[layer] == expected, (model, variant, metric, layer)
                checked += len(expected)
    return checked


def _check_output_tables(lines: list[str], rows: pd.DataFrame) -> int:
    out = rows[(rows["layer"] == "output") & rows["shift_x"].notna()]
    series = list(dict.fromkeys(zip(out["model"], out["variant"])))
    metrics = [m for m in ("top1_agreement", "kl_divergence", "prob_change", "accuracy") if m in set(out["metric"])]
    layouts = ([("output", [(series[0], m) for m in metrics], metrics)] if len(series) == 1 else
               [(f"output {m}", [(s, m) for s in series], [_series(*s) for s in series]) for m in metrics])
    checked = 0
    for title, columns, headers in layouts:
        header, *body = _boxed(lines, title)
        assert header == ["shift", *headers, "n"]
        shifts = list(dict.fromkeys(zip(out["shift_x"], out["shift_y"])))
        assert [cells[0] for cells in body] == [_label(int(sx), int(sy)) for sx, sy in shifts]
        for cells, (sx, sy) in zip(body, shifts):
            at = out[(out["shift_x"] == sx) & (out["shift_y"] == sy)]
            for cell, ((model, variant), metric) in zip(cells[1:-1], columns):
                row = at[(at["model"] == model) & (at["variant"] == variant) & (at["metric"] == metric)].iloc[0]
                assert cell == _interval(row), (title, sx, metric)
            assert cells[-1] == str(at["n"].max())
            checked += len(cells)
    return checked


def _check_whole_set_table(lines: list[str], rows: pd.DataFrame) -> int:
    whole = rows[(rows["layer"] == "output") & rows["shift_x"].isna()]
    header, *body = _boxed(lines, "over the whole shift set")
    metrics = list(dict.fromkeys(whole["metric"]))
    assert header == ["model", *metrics]
    groups = list(whole.groupby(["model", "variant"], sort=False))
    assert [cells[0] for cells in body] == [_series(*key) for key, _ in groups]
    for cells, (_, part) in zip(body, groups):
        by_metric = part.set_index("metric")
        expected = [f"{_interval(by_metric.loc[m])} ({by_metric.loc[m, 'n']})" if m in by_metric.index else ""
                    for m in metrics]
        assert cells[1:] == expected
    return sum(len(cells) for cells in body)


def _check_born_at(lines: list[str], summary: dict) -> int:
    born = pd.DataFrame(summary["born_at"])
    printed = [line for line in lines if line.startswith("born at, ")]
    assert len(printed) == born.groupby(["model", "variant"]).ngroups > 0
    for line, ((model, variant), entries) in zip(printed, born.groupby(["model", "variant"], sort=False)):
        runs: list[list] = []  # [first label, last label, layer]
        for e in entries.itertuples():
            label = _label(e.shift_x, e.shift_y)
            if runs and runs[-1][2] == e.layer:
                runs[-1][1] = label
            else:
                runs.append([label, label, e.layer])
        text = ", ".join(f"{a}: {layer}" if a == b else f"{a}..{b}: {layer}" for a, b, layer in runs)
        assert line == f"born at, {_series(model, variant)} (layer where pooled_invariance_error grows most): {text}"
    return len(printed)


COMMON = ["--weights", "none", "--size", "32", "--resize", "48", "--shift", "0..3", "--no-progress"]


def test_single_model_tables_show_every_row(tmp_path: Path, few_images: Path, capsys, monkeypatch) -> None:
    lines, rows, summary = _table(["resnet18", *COMMON, "--data", str(few_images), "--consistency", "-2..2"],
                                  tmp_path, capsys, monkeypatch)
    assert lines[0].split() == ["resnet18", "weights=none", "mode=crop", "direction=x", "images=6"]
    assert _check_layer_tables(lines, rows) == 10 * (1 + 2) + 10 * (1 + 4)  # stride + one cell per shift
    assert _check_output_tables(lines, rows) == 4 * 6
    assert _check_whole_set_table(lines, rows) == 6  # model, worst cases, jaggedness, path_prob_change
    assert _check_born_at(lines, summary) == 1
    assert set(rows["metric"]) >= {"accuracy", "consistency", "jaggedness", "worst_case_accuracy"}


def test_side_by_side_tables_show_every_row(tmp_path: Path, few_images: Path, capsys, monkeypatch) -> None:
    lines, rows, summary = _table(["resnet18", "example:strided_circular", *COMMON, "--data", str(few_images),
                                   "--variants", "base,blurpool"], tmp_path, capsys, monkeypatch)
    assert len(rows.groupby(["model", "variant"])) == 4
    assert _check_layer_tables(lines, rows) > 100
    assert _check_output_tables(lines, rows) == 4 * 4 * 6  # one table per metric, a column per series
    assert _check_whole_set_table(lines, rows) == 4 * 5
    assert _check_born_at(lines, summary) >= 2
