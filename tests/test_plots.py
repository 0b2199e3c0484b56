"""Figures from real (small) measurements: every kind of panel is written as a valid, non-blank image."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import transinv
from transinv.plots import plot_results
from transinv.results import load_results


def _measure(model: str, data: Path, shift: str = "0..3", direction: str = "x") -> pd.DataFrame:
    result = transinv.measure(model, weights="none", data=str(data), num_images=2, size=32, resize=40,
                              shift=shift, direction=direction, layers="default")
    return result.rows


@pytest.fixture(scope="session")
def x_rows(imagenet_sample: Path) -> pd.DataFrame:
    return _measure("resnet18", imagenet_sample)


@pytest.fixture(scope="session")
def small_rows(imagenet_sample: Path) -> pd.DataFrame:
    return _measure("example:circular_gap", imagenet_sample)


@pytest.fixture(scope="session")
def grid_rows(imagenet_sample: Path) -> pd.DataFrame:
    return _measure("example:strided_circular", imagenet_sample, shift="-1..1", direction="grid")


def assert_image(path: Path) -> None:
    """A readable raster with colour channels that is not one flat colour."""
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert not np.all(pixels == pixels[0, 0])


def test_x_direction_draws_output_lines_and_layer_heatmaps(x_rows: pd.DataFrame, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.png"
    panels = plot_results(x_rows, target)
    assert_image(target)
    assert len(panels) == 2
    assert "top1_agreement" in panels[0] and "accuracy" in panels[0] and "worst_case" not in panels[0]
    assert "heatmap" in panels[1] and "equivariance_error" in panels[1] and "pooled_invariance_error" in panels[1]
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["x.png"]  # no temporary file left behind


def test_grid_draws_dx_dy_maps(grid_rows: pd.DataFrame, tmp_path: Path) -> None:
    panels = plot_results(grid_rows, tmp_path / "grid.png")
    assert_image(tmp_path / "grid.png")
    assert "top1_agreement at output over (dx, dy)" in panels[0] and "heatmap" in panels[1]
    panels = plot_results(grid_rows, tmp_path / "grid-layer.png", layer="1")
    assert panels == [panels[0]] and "pooled_invariance_error at 1 over (dx, dy)" in panels[0]
    assert_image(tmp_path / "grid-layer.png")


def test_two_models_share_panels(x_rows: pd.DataFrame, small_rows: pd.DataFrame, tmp_path: Path) -> None:
    both = pd.concat([x_rows, small_rows], ignore_index=True)
    panels = plot_results(both, tmp_path / "two.png")
    assert_image(tmp_path / "two.png")
    assert all("resnet18" in p and "example:circular_gap" in p for p in panels)


def test_variants_and_confidence_bands(small_rows: pd.DataFrame, tmp_path: Path) -> None:
    a, b = small_rows.assign(variant="a"), small_rows.assign(variant="b", value=small_rows["value"] * 0.5)
    rows = pd.concat([a, b], ignore_index=True)
    rows = rows.assign(ci_low=rows["value"] - 0.05, ci_high=rows["value"] + 0.05)
    panels = plot_results(rows, tmp_path / "variants.png")
    assert_image(tmp_path / "variants.png")
    assert "example:circular_gap/a" in panels[0] and "example:circular_gap/b" in panels[0]


def test_layer_selection_draws_that_layer_against_shift(x_rows: pd.DataFrame, tmp_path: Path) -> None:
    panels = plot_results(x_rows, tmp_path / "layer.png", layer="layer1")
    assert_image(tmp_path / "layer.png")
    (panel,) = panels
    assert panel == "equivariance_error, pooled_invariance_error at layer1 against shift, one line per model: resnet18"


def test_metric_selection(x_rows: pd.DataFrame, tmp_path: Path) -> None:
    assert plot_results(x_rows, tmp_path / "kl.png", metric="kl_divergence") == [
        "kl_divergence at output against shift, one line per model: resnet18"
    ]
    assert_image(tmp_path / "kl.png")
    (panel,) = plot_results(x_rows, tmp_path / "pooled.svg", metric="pooled_invariance_error")
    assert panel.startswith("pooled_invariance_error heatmap")
    assert "<svg" in (tmp_path / "pooled.svg").read_text()
    (panel,) = plot_results(x_rows, tmp_path / "worst.png", metric="worst_case_accuracy")
    assert panel == "worst_case_accuracy per model: resnet18"


@pytest.mark.parametrize(
    ("metric", "layer", "hint"),
    [
        ("top5", None, "available metrics: .*kl_divergence"),
        (None, "layer9", "available layers: conv1, .*output"),
        ("equivariance_error", "output", "layer 'output' has no 'equivariance_error' rows.*top1_agreement"),
    ],
)
def test_unknown_metric_or_layer_lists_what_is_there(
    x_rows: pd.DataFrame, tmp_path: Path, metric: str | None, layer: str | None, hint: str
) -> None:
    with pytest.raises(ValueError, match=hint):
        plot_results(x_rows, tmp_path / "none.png", metric=metric, layer=layer)
    assert not (tmp_path / "none.png").exists()


def test_load_results_round_trips_csv_and_json(x_rows: pd.DataFrame, tmp_path: Path) -> None:
    csv, doc = tmp_path / "r.csv", tmp_path / "r.json"
    x_rows.to_csv(csv, index=False)
    records = x_rows.astype(object).where(x_rows.notna(), None).to_dict(orient="records")
    doc.write_text(json.dumps({"rows": records}))
    for loaded in (load_results([csv]), load_results([doc])):
        assert list(loaded.columns) == list(x_rows.columns) and len(loaded) == len(x_rows)
        assert list(loaded["layer"]) == list(x_rows["layer"])
        np.testing.assert_allclose(loaded["value"].astype(float), x_rows["value"].astype(float))
        assert loaded["shift_x"].isna().sum() == x_rows["shift_x"].isna().sum()
    both = load_results([csv, doc])
    assert len(both) == 2 * len(x_rows)
    plot_results(both, tmp_path / "loaded.png")
    assert_image(tmp_path / "loaded.png")


def test_load_results_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"other.csv: not a transinv result \(missing columns: model, "):
        load_results([other])
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: not a transinv result"):
        load_results([listing])
    with pytest.raises(ValueError, match="missing.csv"):
        load_results([tmp_path / "missing.csv"])
