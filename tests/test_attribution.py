"""Known answers for the Lie-derivative attribution (``--attribution lie``).

Constructed networks whose layers are exactly equivariant, or alias in one known place, under the
infinitesimal Fourier or bilinear shift; the sum property on two architectures; the derivatives
of the shifts against difference quotients of the shifts themselves.
"""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn

import transinv
from transinv.engine.attribution import attribute, generator
from transinv.examples import circular_gap
from transinv.metric_registry import LIE_CONTRIBUTION, LIE_DERIVATIVE, LIE_UNATTRIBUTED, OUTPUT_LAYER
from transinv.options import MeasureOptions, OptionError
from transinv.reports.render import print_result
from transinv.engine.shifts import ShiftPlan
from transinv.engine.subpixel import bilinear_shift, bilinear_shift_derivative, fourier_shift, fourier_shift_derivative


class EnergyPool(nn.Module):
    """Per-channel mean of squares: exactly invariant to first order under the Fourier shift
    (its generator is skew-symmetric, so ``d/dt ‖T_t h‖² = 2⟨h, A h⟩ = 0``), yet it reads more of
    the map than its mean."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.pow(2).mean(dim=(-2, -1))


class FunctionalFlatten(nn.Module):
    """A circular convolution, a functional ``torch.flatten`` of its spatial map, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _circular(3, 4)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.conv(x), 1))


def _circular(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode="circular")


def _image(size: int = 16, images: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(images, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _attribute(model: nn.Module, x: torch.Tensor, method: str, velocity=(1, 0)):
    torch.manual_seed(0)
    model = model.double().eval()
    return attribute(model, x, generator(x, velocity, x.shape[-2:], method), velocity, method)


def _assert_adds_up(found, rel: float = 1e-9) -> None:
    summed = torch.stack(list(found.contributions.values())).sum(0)
    assert (found.total > 0).all()
    torch.testing.assert_close(summed, found.total, rtol=rel, atol=0)
    assert (found.unattributed.abs() <= rel * found.total).all()


# --- the shifts' derivatives ---------------------------------------------------------------

@pytest.mark.parametrize("size", [(8, 10), (7, 9)])
@pytest.mark.parametrize("velocity", [(1.0, 0.0), (0.0, 1.0), (0.5, -2.0)])
def test_fourier_derivative_is_the_limit_of_the_fourier_shift(size: tuple[int, int], velocity: tuple) -> None:
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = 1e-5
    quotient = (fourier_shift(x, eps * velocity[0], eps * velocity[1])
                - fourier_shift(x, -eps * velocity[0], -eps * velocity[1])) / (2 * eps)
    torch.testing.assert_close(fourier_shift_derivative(x, *velocity), quotient, atol=1e-8, rtol=0)
    assert abs(float((x * fourier_shift_derivative(x, *velocity)).sum())) < 1e-10  # skew-symmetric


@pytest.mark.parametrize("padding", ["zeros", "border"])
@pytest.mark.parametrize("velocity", [(1.0, 0.0), (0.0, -2.0)])
def test_bilinear_derivative_is_the_symmetric_quotient_of_the_bilinear_shift(padding: str, velocity: tuple) -> None:
    x = _image(9)
    eps = 0.5 / max(abs(v) for v in velocity)  # the interpolant is linear between pixel centres: exact
    quotient = (bilinear_shift(x, eps * velocity[0], eps * velocity[1], padding)
                - bilinear_shift(x, -eps * velocity[0], -eps * velocity[1], padding)) / (2 * eps)
    torch.testing.assert_close(bilinear_shift_derivative(x, *velocity, padding), quotient, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode, method, canvas, embed, eps, tol", [
    ("crop", "bilinear", 20, None, 0.5, 1e-12),
    ("pad", "bilinear", 16, None, 0.5, 1e-12),
    ("embed", "bilinear", 8, 8, 0.5, 1e-12),
    ("circular", "fourier", 16, None, 1e-5, 1e-8),
])
def test_view_derivative_is_the_derivative_of_the_view(mode: str, method: str, canvas: int, embed: int | None,
                                                       eps: float, tol: float) -> None:
    """The input's tangent moves the view exactly as the tool's own sub-pixel views do (crop: real
    content enters from the canvas; pad and embed: the fill enters)."""
    plan = ShiftPlan(((0, 0),), 16, mode, 0.3, method, embed=embed)
    canvases = _image(canvas)
    quotient = (plan.view(canvases, (eps, 0.0)) - plan.view(canvases, (-eps, 0.0))) / (2 * eps)
    torch.testing.assert_close(plan.view_derivative(canvases, (1, 0)), quotient, atol=tol, rtol=0)
    assert plan.continuous == method


def test_generator_follows_the_stride() -> None:
    """A band-limited map subsampled by 2 moves half as many of its own pixels: the generator of
    the subsampled map (stride 2, read from its shape) is the subsampled generator."""
    x = _image(16)
    spectrum = torch.fft.fft2(x)
    k = torch.fft.fftfreq(16, d=1 / 16).abs()
    spectrum[..., (k[:, None] >= 4) | (k[None, :] >= 4)] = 0  # no energy at or above a quarter of the rate
    smooth = torch.fft.ifft2(spectrum).real
    for velocity in [(1, 0), (0, 1), (1, 1)]:
        sub = smooth[..., ::2, ::2]
        torch.testing.assert_close(generator(sub, velocity, (16, 16), "fourier"),
                                   generator(smooth, velocity, (16, 16), "fourier")[..., ::2, ::2], atol=1e-10, rtol=0)


# --- known answers of the attribution ------------------------------------------------------

def test_exactly_equivariant_layers_contribute_nothing() -> None:
    """circular_gap under the band-limited shift: convolutions, pooling, flatten and head add 0;
    the ReLUs carry everything. Integer circular shifts leave it exactly invariant, but a ReLU
    aliases, so its output still moves under a fractional (band-limited) shift."""
    found = _attribute(circular_gap(), _image(), "fourier")
    _assert_adds_up(found)
    for layer in ("0", "2", "4", "5", "6"):
        assert (found.contributions[layer].abs() <= 1e-12 * found.total).all(), layer
    relus = found.contributions["1"] + found.contributions["3"]
    torch.testing.assert_close(relus, found.total, rtol=1e-9, atol=0)
    assert (found.total > 1e-6).all()


def test_an_exactly_equivariant_network_has_no_lie_derivative() -> None:
    model = nn.Sequential(_circular(3, 8), _circular(8, 8), EnergyPool(), nn.Linear(8, 5))
    found = _attribute(model, _image(), "fourier", (1, 1))
    assert (found.total <= 1e-12).all()
    assert all((c.abs() <= 1e-12).all() for c in found.contributions.values())


@pytest.mark.parametrize("velocity", [(1, 0), (0, 1), (1, 1)])
def test_the_one_aliasing_layer_takes_the_whole_total(velocity: tuple[int, int]) -> None:
    """Circular stride-1 convolutions around one stride-2 convolution: only the subsampling
    aliases, so it holds all of ``‖L p‖`` and every other layer exactly 0."""
    model = nn.Sequential(_circular(3, 8), _circular(8, 8, stride=2), _circular(8, 8), EnergyPool(), nn.Linear(8, 5))
    found = _attribute(model, _image(), "fourier", velocity)
    _assert_adds_up(found)
    torch.testing.assert_close(found.contributions["1"], found.total, rtol=1e-9, atol=0)
    for layer in ("0", "2", "3", "4"):
        assert (found.contributions[layer].abs() <= 1e-12 * found.total).all(), layer


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    for module in model.modules():  # random running statistics, so batch norm is not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("make, method, velocity", [
    (_small_cnn, "bilinear", (1, 0)), (_small_cnn, "fourier", (1, 1)),
    (_resnet18, "bilinear", (1, 1)), (_resnet18, "fourier", (0, 1)),
], ids=["sequential-bilinear", "sequential-fourier", "resnet18-bilinear", "resnet18-fourier"])
def test_contributions_add_up_to_the_total_on_two_architectures(make, method: str, velocity) -> None:
    """Zero padding, strides, max pooling, in-place ReLUs, residual additions (outside any leaf,
    exactly equivariant) and shared ReLU modules: the leaf contributions still add up; batch
    norm, an affine map per channel, adds exactly 0."""
    found = _attribute(make(), _image(32), method, velocity)
    _assert_adds_up(found)
    norms = [k for k in found.contributions if k.endswith(("bn1", "bn2", "downsample.1")) or k == "1"]
    assert norms and all((found.contributions[k].abs() <= 1e-12 * found.total).all() for k in norms)


def test_operations_outside_leaf_modules_are_reported_unattributed() -> None:
    """A functional ``torch.flatten`` of a spatial map reads positions; no leaf holds it, so its
    part is ``lie_unattributed`` (here all of it: the convolution is exact, the head's input is a vector)."""
    found = _attribute(FunctionalFlatten(), _image(8), "fourier")
    torch.testing.assert_close(found.unattributed, found.total, rtol=1e-9, atol=0)
    assert (found.total > 1e-6).all()


# --- through measure() ---------------------------------------------------------------------

SMALL = dict(weights="none", size=32, resize=40, shift="0,1", num_images=2, attribution="lie", warn=lambda _: None)


def _lie(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    return rows[rows["metric"] == metric]


def test_measure_adds_rows_that_add_up() -> None:
    """resnet18 in crop mode (bilinear): one lie_derivative and one lie_unattributed row, one
    lie_contribution row per leaf call (the shared ReLUs apart), with strides; the mean
    contributions add up to the mean total (means are linear); the usual metrics are unchanged."""
    result = transinv.measure(_resnet18(), direction="grid", **SMALL)
    rows = result.rows
    plain = transinv.measure(_resnet18(), **{**SMALL, "attribution": None, "direction": "grid"}).rows
    assert set(rows["metric"]) - set(plain["metric"]) == {LIE_DERIVATIVE, LIE_CONTRIBUTION, LIE_UNATTRIBUTED}
    for (sx, sy), part in _lie(rows, LIE_CONTRIBUTION).groupby(["shift_x", "shift_y"]):
        assert (sx, sy) in {(1, 0), (0, 1)}
        assert len(part) == 60 and {"layer1.0.relu", "layer1.0.relu#2"} <= set(part["layer"])
        assert (part["aligned"]).all() and part.set_index("layer").loc["layer2.0.conv1", "stride"] == 8
        at = (rows["shift_x"] == sx) & (rows["shift_y"] == sy) & (rows["layer"] == OUTPUT_LAYER)
        total = float(rows.loc[at & (rows["metric"] == LIE_DERIVATIVE), "value"].iloc[0])
        unattributed = float(rows.loc[at & (rows["metric"] == LIE_UNATTRIBUTED), "value"].iloc[0])
        assert total > 0 and abs(unattributed) <= 1e-4 * total
        assert abs(part["value"].sum() + unattributed - total) <= 1e-4 * total
    assert (_lie(rows, LIE_DERIVATIVE)["n"] == 2).all()
    shared = ["layer", "shift_x", "shift_y", "metric"]
    merged = plain.merge(rows, on=shared, suffixes=("", "_lie"))
    assert len(merged) == len(plain) and (merged["value"] == merged["value_lie"]).all()


def test_born_at_lie_names_the_aliasing_layer() -> None:
    model = nn.Sequential(_circular(3, 8), _circular(8, 8, stride=2), _circular(8, 8), EnergyPool(), nn.Linear(8, 5))
    result = transinv.measure(model, mode="circular", **SMALL)
    [born] = result.summary["born_at_lie"]
    assert born["layer"] == "1" and born["share"] == pytest.approx(1.0, abs=1e-4)
    values = _lie(result.rows, LIE_CONTRIBUTION).set_index("layer")["value"]
    assert values.drop("1").abs().max() <= 1e-4 * values["1"]
    console = Console(width=160, record=True, file=io.StringIO())
    print_result(result, console)
    text = console.export_text()
    assert "born at (Lie)" in text and "): 1 (100% of lie_derivative)" in text
    assert "lie_contribution" in text and "100.0%" in text
    output_table = text.split("output")[1].split("lie_contribution")[0]
    assert LIE_DERIVATIVE not in output_table  # the Lie rows hold a direction, not a shift: their own table


def test_the_lie_derivative_must_differentiate_the_modes_own_shift() -> None:
    with pytest.raises(OptionError, match="attribution"):
        MeasureOptions(attribution="lie", mode="crop", subpixel="fourier").validate()
    with pytest.raises(OptionError, match="attribution"):
        MeasureOptions(attribution="lie", mode="circular", subpixel="bilinear").validate()
    MeasureOptions(attribution="lie", mode="circular", subpixel="fourier").validate()


class _SquareNoForwardRule(torch.autograd.Function):
    """``x²`` with a backward rule but no forward-mode (``jvp``) rule."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _NoForwardRule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SquareNoForwardRule.apply(x)


def test_an_operation_without_a_forward_mode_rule_is_a_one_line_error() -> None:
    model = nn.Sequential(_circular(3, 4), _NoForwardRule(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(transinv.UserError, match=r"^--attribution lie: .* forward mode \(You must implement the jvp"):
        transinv.measure(model, mode="circular", **SMALL)
