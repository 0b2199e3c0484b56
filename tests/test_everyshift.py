"""Known answers for equivariance at every shift and where in the map: resampled rows at fractional
feature shifts, the interior error, the in-place change, padding margins and spatial error maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import transinv
from transinv.engine import metrics as M
from transinv.examples import circular_gap, strided_circular
from transinv.engine.layers import probe_layers, select_layers
from transinv.engine.margins import padding_margins

SIZE = 32


class LowPass(nn.Module):
    """Keeps only the spatial frequencies below ``cutoff`` cycles per image on each axis (an ideal,
    circular low-pass): every map after it is band-limited."""

    def __init__(self, cutoff: int) -> None:
        super().__init__()
        self.cutoff = cutoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        fy = torch.fft.fftfreq(h, 1.0 / h).abs()[:, None]
        fx = torch.fft.rfftfreq(w, 1.0 / w)[None, :]
        keep = ((fy < self.cutoff) & (fx < self.cutoff)).to(x.dtype)
        return torch.fft.irfft2(torch.fft.rfft2(x) * keep, s=(h, w))


def _band_limited_net() -> nn.Module:
    """Low-pass below quarter-Nyquist, a circular stride-1 convolution, then a circular stride-2 one:
    linear and alias-free, so the stride-2 map moves by exactly d/2 (a fractional feature shift)."""
    torch.manual_seed(0)
    return nn.Sequential(LowPass(SIZE // 8), nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular"), *_head(8))


def _head(channels: int) -> list[nn.Module]:
    """Global average pooling and a linear layer: the logits ``measure`` needs."""
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]


def _rows(result: transinv.Result, metric: str, layer: str):
    rows = result.rows
    return rows[(rows["metric"] == metric) & (rows["layer"] == layer)].set_index("shift_x")["value"]


def test_compare_shift_at_whole_shifts_equals_equivariance_error() -> None:
    torch.manual_seed(1)
    ref, cur = torch.randn(3, 4, 9, 7), torch.randn(3, 4, 9, 7)
    for circular in (True, False):
        for k in [(0, 0), (2, 1), (-3, 2)]:
            out = M.compare_shift(M.Reference.of(ref), cur, k, circular)
            expected = M.equivariance_error(ref, cur, k, circular)
            torch.testing.assert_close(out.error, expected, rtol=1e-6, atol=0)
            torch.testing.assert_close(out.interior, expected, rtol=1e-6, atol=0)  # margin 0: the same region


def test_interior_leaves_out_the_margin_in_both_maps() -> None:
    """1-D by hand: with k = 2 on 10 columns (not circular) the overlap is j = 2..9 (sources 0..7);
    margin 1 keeps j = 3..8 (sources 1..6). Errors put only outside that band leave the interior at 0."""
    ref = torch.ones(1, 1, 1, 10)
    cur = torch.ones(1, 1, 1, 10)
    cur[..., 2] = cur[..., 9] = 3.0
    out = M.compare_shift(M.Reference.of(ref), cur, (2, 0), circular=False, margin=(0, 1))
    assert out.interior.item() == 0
    assert out.error.item() == pytest.approx((8 / 8) ** 0.5)  # two errors of 2 over 8 ones
    assert torch.isnan(out.error_sum[0, :2]).all() and out.error_sum[0, 2].item() == 2.0


def test_resampled_error_of_band_limited_maps_is_near_zero_and_of_white_noise_is_not() -> None:
    torch.manual_seed(2)
    smooth = LowPass(4)(torch.randn(2, 3, 16, 16))
    half = M.compare_shift(M.Reference.of(smooth), M.fourier_shift(smooth, 0.5, 0.0), (0.5, 0.0), circular=True)
    assert half.error.max() < 1e-5
    noise = torch.randn(2, 3, 16, 16)
    rolled = torch.roll(noise, 1, dims=-1)  # the true map at k = 1 compared at k = 0.5: not a half shift
    assert M.compare_shift(M.Reference.of(noise), rolled, (0.5, 0.0), circular=True).error.min() > 0.3


def test_inplace_change_by_hand() -> None:
    ref = torch.ones(2, 3, 4, 4)
    assert M.inplace_change(ref, 2 * ref).tolist() == pytest.approx([1.0, 1.0], rel=1e-6)
    assert torch.isnan(M.inplace_change(ref, torch.ones(2, 3, 2, 2))).all()
    pooled = torch.randn(5, 6, 1, 1)
    other = torch.randn(5, 6, 1, 1)
    torch.testing.assert_close(M.inplace_change(pooled, other), M.pooled_invariance_error(pooled, other))


def test_padding_margins_of_zero_padded_convolutions() -> None:
    """Two zero-padded 3x3 convolutions: padding reaches 1 then 2 pixels in; circular ones too
    (wrapped content is not the image's surroundings); unpadded ones not at all."""
    torch.manual_seed(3)
    for padding_mode, expected in (("zeros", (1, 2)), ("circular", (1, 2))):
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode), nn.ReLU(),
                            nn.Conv2d(4, 4, 3, padding=1, padding_mode=padding_mode)).eval()
        layers = select_layers(probe_layers(net, SIZE), "0,2")
        margins = padding_margins(net, layers, SIZE)
        assert (margins["0"], margins["2"]) == ((expected[0],) * 2, (expected[1],) * 2)
    valid = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).eval()
    assert padding_margins(valid, select_layers(probe_layers(valid, SIZE), "0,1"), SIZE) == {"0": (0, 0), "1": (0, 0)}


def test_band_limited_circular_network_is_near_zero_at_fractional_feature_shifts(few_images: Path) -> None:
    result = transinv.measure(_band_limited_net(), data=[str(few_images)], num_images=2, size=SIZE, shift="0..3",
                              mode="circular", layers="1,2", weights="none")
    resampled = _rows(result, M.EQUIVARIANCE_ERROR_RESAMPLED, "2")
    assert list(resampled.index) == [1, 3]  # the odd shifts, stride 2: k = 0.5 and 1.5
    assert resampled.max() < 1e-4
    exact = _rows(result, M.EQUIVARIANCE_ERROR, "2")
    assert list(exact.index) == [0, 2] and exact.max() < 1e-5  # never mixed with the resampled rows
    assert _rows(result, M.EQUIVARIANCE_ERROR_RESAMPLED, "1").empty  # stride 1: every shift is exact


def test_resampled_error_of_an_aliasing_network_is_not_small(few_images: Path) -> None:
    """The same check fails without the low-pass: a strided circular net on photographs aliases."""
    torch.manual_seed(4)
    result = transinv.measure(strided_circular(), data=[str(few_images)], num_images=2, size=SIZE, shift="0..1",
                              mode="circular", layers="2", weights="none")
    assert _rows(result, M.EQUIVARIANCE_ERROR_RESAMPLED, "2").min() > 0.05


def test_interior_error_isolates_the_border_effect_of_zero_padding(few_images: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), *_head(4))
    maps = tmp_path / "maps.npz"
    result = transinv.measure(net, data=[str(few_images)], num_images=2, size=SIZE, shift="0..3", mode="circular",
                              layers="2", weights="none", error_maps=str(maps), label=["zp"])
    full, interior = _rows(result, M.EQUIVARIANCE_ERROR, "2"), _rows(result, M.EQUIVARIANCE_ERROR_INTERIOR, "2")
    assert full[1:].min() > 1e-3 and interior.max() < 1e-6
    with np.load(maps) as saved:
        error_map = saved["zp/base/2/2,0"]
        assert error_map.shape == (SIZE, SIZE) and saved["zp/base/2/0,0"].max() == 0
    # shift 2: wrong only within 2 pixels of the view's border and of the seam at columns 2..3
    inner = np.ones((SIZE, SIZE), bool)
    inner[:2] = inner[-2:] = inner[:, :4] = inner[:, -2:] = False
    assert np.abs(error_map[inner]).max() < 1e-6 and error_map[~inner].max() > 1e-3


def test_inplace_change_of_a_global_pool_is_zero_and_equals_the_pooled_error(few_images: Path) -> None:
    torch.manual_seed(6)
    invariant = transinv.measure(circular_gap(), data=[str(few_images)], num_images=2, size=SIZE, shift="0..2",
                                 mode="circular", layers="4", weights="none")
    assert _rows(invariant, M.INPLACE_CHANGE, "4").max() < 1e-6
    aliasing = transinv.measure(strided_circular(), data=[str(few_images)], num_images=2, size=SIZE, shift="0..3",
                                mode="circular", layers="4", weights="none")
    inplace, pooled = _rows(aliasing, M.INPLACE_CHANGE, "4"), _rows(aliasing, M.POOLED_INVARIANCE_ERROR, "4")
    assert inplace[[1, 3]].min() > 1e-4  # odd shifts alias; even ones are exact, so ~0
    np.testing.assert_allclose(inplace.to_numpy(), pooled.to_numpy(), rtol=1e-6)  # float32 maps


def test_error_maps_are_nan_outside_the_overlap_in_crop_mode(few_images: Path, tmp_path: Path) -> None:
    torch.manual_seed(7)
    maps = tmp_path / "crop.npz"
    transinv.measure(strided_circular(), data=[str(few_images)], num_images=2, size=SIZE, shift="0..3", mode="crop",
                     layers="0,2", weights="none", error_maps=str(maps), label=["sc"])
    with np.load(maps) as saved:
        assert set(saved.files) == {f"sc/base/{layer}/{d},0" for layer in ("0", "2") for d in range(4)}
        exact = saved["sc/base/0/2,0"]
        assert np.isnan(exact[:, :2]).all() and not np.isnan(exact[:, 2:]).any()
        half = saved["sc/base/2/1,0"]  # k = 0.5: overlap from column 1, shrunk by one pixel each side
        assert np.isnan(half[:, :2]).all() and np.isnan(half[:, -1]).all() and not np.isnan(half[1:-1, 2:-1]).any()

    # without the resampled error, the shifts it would compare get no map (not a map of zeros)
    aligned_only = tmp_path / "aligned.npz"
    transinv.measure(strided_circular(), data=[str(few_images)], num_images=2, size=SIZE, shift="0..3", mode="crop",
                     layers="0,2", weights="none", error_maps=str(aligned_only), label=["sc"],
                     layer_metrics="equivariance_error")
    with np.load(aligned_only) as saved:  # layer 2 has stride 2: shifts 1 and 3 are fractional there
        assert set(saved.files) == {f"sc/base/0/{d},0" for d in range(4)} | {"sc/base/2/0,0", "sc/base/2/2,0"}


def test_new_layer_metrics_are_drawn_only_when_named(few_images: Path) -> None:
    from transinv.reports.plots import draw_results as draw

    torch.manual_seed(8)
    result = transinv.measure(strided_circular(), data=[str(few_images)], num_images=2, size=SIZE, shift="0..3",
                              mode="circular", layers="0,2", weights="none")
    default, _ = draw(result.rows)
    named, _ = draw(result.rows, metric=M.INPLACE_CHANGE)
    assert M.INPLACE_CHANGE not in " ".join(ax.get_title() for ax in default.axes)
    assert M.INPLACE_CHANGE in " ".join(ax.get_title() for ax in named.axes)


def test_resampled_column_marks_only_the_resampled_rows(few_images: Path, tmp_path: Path) -> None:
    torch.manual_seed(9)
    result = transinv.measure(strided_circular(), data=[str(few_images)], num_images=2, size=SIZE, shift="0..1",
                              mode="circular", layers="2", weights="none")
    rows = result.rows
    assert rows["resampled"].dtype == bool
    assert (rows["resampled"] == (rows["metric"] == M.EQUIVARIANCE_ERROR_RESAMPLED)).all() and rows["resampled"].any()
    assert not rows.loc[rows["resampled"], "aligned"].any()


@pytest.mark.parametrize("chosen", [("equivariance_error",), ("equivariance_error_resampled", "inplace_change"),
                                    ("equivariance_error_interior", "pooled_invariance_error")])
def test_layer_metrics_give_the_chosen_rows_of_the_full_run_and_no_others(few_images: Path, chosen: tuple) -> None:
    """--layer-metrics computes fewer metrics, never other numbers: each chosen metric's rows equal
    the full run's, bit for bit, and no other per-layer metric appears (outputs are untouched)."""
    common = dict(data=[str(few_images)], num_images=3, size=SIZE, shift="0..3", layers="all", weights="none",
                  warn=lambda _: None)
    keys = ["layer", "shift_x", "shift_y", "metric"]
    torch.manual_seed(6)
    net = strided_circular()
    full = transinv.measure(net, **common).rows.set_index(keys)
    part = transinv.measure(net, layer_metrics=",".join(chosen), **common).rows.set_index(keys)
    layer_rows = part[part.index.get_level_values("layer") != "output"]
    assert set(layer_rows.index.get_level_values("metric")) == set(chosen)
    expected = full[full.index.get_level_values("metric").isin(chosen) | (full.index.get_level_values("layer") == "output")]
    assert set(part.index) == set(expected.index)
    pd.testing.assert_series_equal(part["value"].sort_index(), expected["value"].sort_index())
