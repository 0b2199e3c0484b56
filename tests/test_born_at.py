"""'Born at': the main-path layer where the pooled invariance error grows most, relative to the one before."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import transinv
from transinv.engine import metrics as M
from transinv.reports.results import BORN_AT_FLOOR, born_at


def _rows(errors: dict[str, list[float]], shifts: list[int]) -> pd.DataFrame:
    """Pooled-error rows of one model, layers in the given (forward) order, one value per shift."""
    return pd.DataFrame([
        {"model": "m", "variant": "base", "layer": layer, "shift_x": dx, "shift_y": 0,
         "metric": M.POOLED_INVARIANCE_ERROR, "value": value}
        for layer, values in errors.items() for dx, value in zip(shifts, values)
    ])


def _named(found: list[dict]) -> dict[int, str]:
    return {entry["shift_x"]: entry["layer"] for entry in found}


def test_growth_is_relative_so_a_larger_scale_of_error_is_not_favoured() -> None:
    """stage2 triples the error (+0.02), stage3 doubles it (+0.03): the absolute jump would name stage3."""
    rows = _rows({"stem": [0, 0.01], "stage2": [0, 0.03], "stage3": [0, 0.06]}, [0, 1])
    (entry,) = born_at(rows)
    assert (entry["layer"], entry["previous"]) == ("stage2", "stem")
    assert entry["growth"] == pytest.approx(3.0) and entry["value"] == 0.03


def test_a_shortcut_branch_is_not_compared_with_the_layer_it_runs_beside() -> None:
    """``downsample`` runs after bn2 in forward order but beside it: compared with bn2 it would
    look like a 10x jump, and block's own growth would be measured against the branch."""
    errors = {"conv1": [0, 0.010, 0.010], "bn2": [0, 0.004, 0.004], "downsample": [0, 0.040, 0.040],
              "block": [0, 0.012, 0.006]}
    rows = _rows(errors, [0, 1, 2])
    assert _named(born_at(rows)) == {1: "downsample", 2: "downsample"}  # every layer compared: wrong
    main = {("m", "base"): ["conv1", "bn2", "block"]}
    found = born_at(rows, main)
    assert _named(found) == {1: "block", 2: "block"}
    assert {entry["previous"] for entry in found} == {"bn2"}
    assert [entry["growth"] for entry in found] == pytest.approx([3.0, 1.5])


def test_float_noise_names_no_layer_but_growth_from_zero_does() -> None:
    noise = _rows({"a": [0, 1e-9], "b": [0, 5e-7], "c": [0, 1e-7]}, [0, 1])
    assert born_at(noise) == []  # rises of at most 5e-7: rounding, not a layer breaking invariance
    born = _rows({"a": [0, 0.0], "b": [0, 0.0], "c": [0, 2e-3]}, [0, 1])
    (entry,) = born_at(born)
    assert entry["layer"] == "c" and entry["growth"] == pytest.approx(2e-3 / BORN_AT_FLOOR)


def test_the_first_layer_and_shift_zero_are_never_named() -> None:
    rows = _rows({"first": [0.5, 0.9], "second": [0.7, 0.2]}, [0, 1])
    assert born_at(rows) == []


def test_measured_born_at_names_only_main_path_layers(few_images: Path) -> None:
    """resnet18 with every layer measured: the downsample branches are never named or compared."""
    result = transinv.measure("resnet18", weights="none", data=str(few_images), num_images=2, size=32, resize=40,
                              shift="0..3", layers="all")
    found = result.summary["born_at"]
    assert [entry["shift_x"] for entry in found] == [1, 2, 3]
    main = [layer for layer in dict.fromkeys(result.rows["layer"]) if "downsample" not in layer and layer != "output"
            and layer not in ("avgpool",)]
    for entry in found:
        assert "downsample" not in entry["layer"] and "downsample" not in entry["previous"]
        assert main.index(entry["layer"]) > main.index(entry["previous"])
    recomputed = born_at(result.rows, {("resnet18", "base"): main})
    assert recomputed == found
