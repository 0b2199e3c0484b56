"""Every preset runs, and gives the known answer on a constructed, exactly invariant model."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import transinv
from transinv import metrics as M
from transinv.errors import UserError
from transinv.presets import list_presets, load_preset

FAST = dict(weights="none", num_images=3, size=32)


def _run(preset: str, model: str, few_images: Path, resize: int, **extra) -> pd.DataFrame:
    settings = {**load_preset(preset), **FAST, "resize": resize, "data": str(few_images), **extra}
    return transinv.measure(model, **settings).rows


def _whole_set(rows: pd.DataFrame, metric: str) -> float:
    part = rows[(rows["metric"] == metric) & rows["shift_x"].isna()]
    assert len(part) == 1, metric
    return float(part["value"].iloc[0])


def test_every_preset_is_listed_and_names_its_paper() -> None:
    names = {p["name"] for p in list_presets()}
    assert names >= {"zhang2019-consistency", "chaman2021-circular", "azulay2019-jaggedness",
                     "michaeli2023-worstcase", "engstrom2019-worst-of-k", "layers-sweep"}
    assert all(p["description"] and p["paper"] for p in list_presets())


def test_zhang_consistency_is_one_for_an_invariant_model(few_images: Path) -> None:
    rows = _run("zhang2019-consistency", "example:constant", few_images, resize=64)
    assert _whole_set(rows, M.CONSISTENCY) == 1.0
    real = _run("zhang2019-consistency", "resnet18", few_images, resize=64)
    assert 0.0 <= _whole_set(real, M.CONSISTENCY) <= 1.0


def test_chaman_circular_consistency_is_one_for_a_circular_network(few_images: Path) -> None:
    rows = _run("chaman2021-circular", "example:circular_gap", few_images, resize=40, consistency="-16..15")
    assert _whole_set(rows, M.CONSISTENCY) == 1.0


def test_azulay_jaggedness_is_zero_for_an_invariant_model(few_images: Path) -> None:
    rows = _run("azulay2019-jaggedness", "example:constant", few_images, resize=96)
    assert _whole_set(rows, M.JAGGEDNESS) == 0.0


def test_michaeli_worst_case_agreement_is_one_under_circular_and_half_pixel_shifts(few_images: Path) -> None:
    rows = _run("michaeli2023-worstcase", "example:constant", few_images, resize=40, shift="-3..3,-0.5,0.5")
    assert _whole_set(rows, M.WORST_CASE_AGREEMENT) == 1.0
    assert {-0.5, 0.5} <= set(rows["shift_x"].dropna())
    exact = _run("michaeli2023-worstcase", "example:circular_gap", few_images, resize=40, shift="-3..3")
    assert _whole_set(exact, M.WORST_CASE_AGREEMENT) == 1.0


def test_engstrom_worst_of_k_equals_accuracy_for_an_invariant_model(few_images: Path) -> None:
    rows = _run("engstrom2019-worst-of-k", "example:constant", few_images, resize=80)
    accuracy = rows[(rows["metric"] == M.ACCURACY) & (rows["shift_x"] == 0) & (rows["shift_y"] == 0)]["value"].iloc[0]
    assert _whole_set(rows, M.WORST_CASE_ACCURACY) == accuracy
    assert len(rows[rows["metric"] == M.TOP1_AGREEMENT]) == 81


def test_layers_sweep_is_exact_on_a_circular_network(few_images: Path) -> None:
    rows = _run("layers-sweep", "example:circular_gap", few_images, resize=40, mode="circular", shift="0..4")
    layer_rows = rows[rows["metric"] == M.EQUIVARIANCE_ERROR]
    assert not layer_rows.empty and (layer_rows["value"] <= 1e-5).all()


def test_cli_flags_override_the_preset(few_images: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "transinv", "measure", "example:constant", "--weights", "none", "--config",
         "azulay2019-jaggedness", "--shift", "0..3", "--size", "32", "--resize", "40", "--data", str(few_images),
         "-f", "json"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = pd.read_json(io.StringIO(proc.stdout), typ="series")
    assert doc["settings"]["shift"] == "0..3" and doc["settings"]["mode"] == "crop"
    assert doc["settings"]["config"] == "azulay2019-jaggedness"


def test_bad_presets_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("shfit: 3\n")
    with pytest.raises(UserError, match="unknown settings shfit"):
        load_preset(str(bad))
    with pytest.raises(UserError, match="zhang2019-consistency"):
        load_preset("zhang2019")


def test_every_preset_names_a_headline_metric_and_it_sets_no_option(tmp_path: Path) -> None:
    from transinv.metric_registry import METRICS
    from transinv.presets import preset_headline

    for preset in list_presets():
        headline = preset_headline(preset["name"])
        assert headline in METRICS and METRICS[headline].scope != "layer", preset["name"]
        assert "headline" not in load_preset(preset["name"])
    assert preset_headline("zhang2019-consistency") == "consistency"
    bad = tmp_path / "bad.yaml"
    bad.write_text("headline: equivariance_error\nshift: 0..2\n")
    with pytest.raises(UserError, match="not an output or whole-set metric"):
        preset_headline(str(bad))
