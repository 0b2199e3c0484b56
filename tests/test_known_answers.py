"""Known answers: constructed models whose equivariance and invariance are exact by design."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import transinv
from transinv.engine import metrics as M
from transinv.examples import Constant

SMALL = dict(size=32, resize=48, weights="none", seed=0)


def _values(rows: pd.DataFrame, metric: str, layer: str | None = None) -> pd.DataFrame:
    part = rows[rows["metric"] == metric]
    return part if layer is None else part[part["layer"] == layer]


def test_circular_stride1_gap_network_is_exactly_equivariant_and_invariant(few_images: Path) -> None:
    result = transinv.measure(
        "example:circular_gap", data=str(few_images), shift="-3..3", direction="grid", mode="circular",
        layers="all", **SMALL,
    )
    rows = result.rows
    layer_rows = rows[rows["layer"] != M.OUTPUT_LAYER]
    assert set(layer_rows["layer"]) >= {"0", "1", "2", "3"}
    assert len(_values(rows, M.TOP1_AGREEMENT)) == 49
    assert (_values(layer_rows, M.EQUIVARIANCE_ERROR).query("layer != '4'")["value"] <= 1e-5).all()
    assert (_values(layer_rows, M.POOLED_INVARIANCE_ERROR)["value"] <= 1e-5).all()
    assert (_values(rows, M.TOP1_AGREEMENT)["value"] == 1.0).all()
    assert (_values(rows, M.KL_DIVERGENCE)["value"] <= 1e-6).all()
    assert (_values(rows, M.PROB_CHANGE)["value"] <= 1e-6).all()
    assert (rows["n"] == 6).all()


def test_after_stride_two_even_shifts_are_aligned_and_exact_odd_are_marked(few_images: Path) -> None:
    result = transinv.measure(
        "example:strided_circular", data=str(few_images), shift="0..6", mode="circular", layers="2,3", **SMALL
    )
    rows = result.rows[result.rows["layer"].isin(["2", "3"])]
    assert set(rows["stride"]) == {2}
    equi = _values(rows, M.EQUIVARIANCE_ERROR)
    assert sorted(set(equi["shift_x"])) == [0, 2, 4, 6]
    assert equi["aligned"].all() and (equi["value"] <= 1e-5).all()
    pooled = _values(rows, M.POOLED_INVARIANCE_ERROR)
    odd = pooled[pooled["shift_x"] % 2 == 1]
    assert len(odd) == 6 and not odd["aligned"].any()
    assert (odd["value"] > 1e-4).all()  # aliasing: odd shifts are not exact after subsampling


def test_valid_convolutions_are_exactly_equivariant_on_the_overlap_in_crop_mode(few_images: Path) -> None:
    result = transinv.measure(
        "example:valid_conv", data=str(few_images), shift="-3..3", direction="grid", mode="crop",
        layers="0,1,2,3", **SMALL,
    )
    equi = _values(result.rows, M.EQUIVARIANCE_ERROR)
    assert len(equi) == 4 * 49
    assert (equi["value"] <= 1e-5).all()
    # pooling over the whole map is not invariant in crop mode: new content enters at the border
    assert _values(result.rows, M.POOLED_INVARIANCE_ERROR).query("shift_x != 0")["value"].min() > 0


@pytest.mark.parametrize("mode", ["crop", "circular", "pad"])
def test_any_model_at_shift_zero_agrees_with_itself(few_images: Path, mode: str) -> None:
    result = transinv.measure("resnet18", data=str(few_images), shift="0..2", mode=mode, layers="default", **SMALL)
    zero = result.rows[(result.rows["shift_x"] == 0) & (result.rows["shift_y"] == 0)]
    assert (_values(zero, M.TOP1_AGREEMENT)["value"] == 1.0).all()
    assert (_values(zero, M.KL_DIVERGENCE)["value"] == 0.0).all()
    assert (_values(zero, M.EQUIVARIANCE_ERROR)["value"] == 0.0).all()
    assert (_values(zero, M.POOLED_INVARIANCE_ERROR)["value"] == 0.0).all()
    moved = result.rows[result.rows["shift_x"] == 2]
    assert _values(moved, M.KL_DIVERGENCE)["value"].iloc[0] > 0  # a real network is not invariant


def test_constant_model_never_changes_its_output(few_images: Path) -> None:
    result = transinv.measure("example:constant", data=str(few_images), shift="0..3", mode="pad", **SMALL)
    out = result.output()
    assert (_values(out, M.PROB_CHANGE)["value"] == 0.0).all()
    assert (_values(out, M.TOP1_AGREEMENT)["value"] == 1.0).all()


def test_accuracy_of_a_constant_prediction_is_the_share_of_its_class(few_images: Path) -> None:
    """A model that always predicts 'tabby' (281) is right on exactly the 2 tabby photos of 6, at
    every shift and in the worst case over the set."""
    model = Constant(1000)
    with torch.no_grad():
        model.logits.zero_()
        model.logits[281] = 1.0
    result = transinv.measure(model, data=str(few_images), shift="0..2", **SMALL)
    acc = _values(result.rows, M.ACCURACY)
    worst = _values(result.rows, M.WORST_CASE_ACCURACY)
    assert len(acc) == 3 and (acc["value"] == 2 / 6).all() and (acc["n"] == 6).all()
    assert len(worst) == 1 and worst["value"].iloc[0] == 2 / 6 and pd.isna(worst["shift_x"].iloc[0])


def test_exactly_invariant_model_has_zero_jaggedness(few_images: Path) -> None:
    result = transinv.measure("example:circular_gap", data=str(few_images), shift="0..6", mode="circular",
                              layers="none", **SMALL)
    jag = _values(result.rows, M.JAGGEDNESS)
    assert len(jag) == 1 and jag["value"].iloc[0] == 0.0


def test_fourier_subpixel_shifts_commute_with_a_circular_convolution(few_images: Path) -> None:
    """A circular convolution is linear and shift-equivariant, so a band-limited (Fourier) shift of
    the input moves its map without changing the map's mean: pooled error 0 at any fraction."""
    result = transinv.measure("example:circular_gap", data=str(few_images), shift="0..1:0.25", mode="circular",
                              subpixel="fourier", layers="0", **SMALL)
    pooled = _values(result.rows, M.POOLED_INVARIANCE_ERROR)
    assert sorted(pooled["shift_x"]) == [0, 0.25, 0.5, 0.75, 1.0]
    assert (pooled["value"] <= 1e-5).all() and not pooled.query("shift_x % 1 != 0")["aligned"].any()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(shift="0..1:0.5"), "--subpixel"),
    (dict(shift="0..1:0.5", subpixel="fourier", mode="crop"), "circular"),
    (dict(shift="0..1:0.5", subpixel="bilinear", mode="circular"), "crop, pad or embed"),
])
def test_fractional_shifts_need_a_method_that_fits_the_mode(few_images: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(transinv.UserError, match=needle):
        transinv.measure("example:circular_gap", data=str(few_images), **{**SMALL, **kwargs})


def test_consistency_split_by_correctness_partitions_the_images(few_images: Path) -> None:
    result = transinv.measure("example:constant", data=str(few_images), shift="0", consistency="-4..3",
                              layers="none", by_correctness=True, **SMALL)
    whole = result.rows[result.rows["shift_x"].isna()].set_index("metric")
    assert whole.loc[M.CONSISTENCY, "value"] == 1.0
    split = whole["n"].get(M.CONSISTENCY_IF_CORRECT, 0) + whole["n"].get(M.CONSISTENCY_IF_WRONG, 0)
    assert split == whole.loc[M.CONSISTENCY, "n"] == 6
