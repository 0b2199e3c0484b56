"""Every preset runs at its own sizes, and gives the known answer on constructed models."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import transinv
from transinv.engine import metrics as M
from transinv.engine.data import builtin_images_dir
from transinv.errors import UserError
from transinv.models import IMAGENET_MEAN, IMAGENET_STD
from transinv.presets import list_presets, load_preset
from transinv.engine.shifts import ShiftPlan, make_shift_set, parse_fill, parse_pair_offsets

BLACK = torch.tensor(parse_fill("black", IMAGENET_MEAN, IMAGENET_STD))
PHOTOS = {"chelsea": "n02123045", "coffee": "n07920052", "rocket": "n04266014"}  # tabby, espresso, space shuttle


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three of the built-in photographs, named by an ImageNet class so they carry labels."""
    folder = tmp_path_factory.mktemp("labelled")
    for name, wnid in PHOTOS.items():
        Image.open(builtin_images_dir() / f"{name}.jpg").convert("RGB").save(folder / f"{wnid}_{name}.png")
    return folder


def _run(preset: str, model: str | nn.Module, images: Path, **extra) -> pd.DataFrame:
    """The preset as written (its own resize, size, mode and shifts) on the images, weights none."""
    settings = {**load_preset(preset), "weights": "none", "data": str(images), **extra}
    return transinv.measure(model, **settings).rows


def _whole_set(rows: pd.DataFrame, metric: str) -> float:
    part = rows[(rows["metric"] == metric) & rows["shift_x"].isna()]
    assert len(part) == 1, metric
    return float(part["value"].iloc[0])


class CornerIsBlack(nn.Module):
    """Class 1 when the view's top-left pixel is black (the pad fill), else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = (x[:, :, 0, 0] - BLACK.to(x)).abs().amax(dim=1) < 1e-5
        return torch.stack([(~hit).float(), hit.float()], dim=1)


class EdgeParity(nn.Module):
    """Logit 10 for the parity of the first column that is not black (the embedded image's left
    edge), 0 for the other class: a 1-px move flips the class and moves p by tanh(5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        content = (x - BLACK.to(x).view(1, 3, 1, 1)).abs().amax(dim=(1, 2)) > 1e-5
        odd = content.float().argmax(dim=1) % 2
        return torch.stack([1 - odd, odd], dim=1).float() * 10


class NyquistGone(nn.Module):
    """Class 1 when the view has no energy in the Nyquist row and column of its spectrum: what a
    half-pixel Fourier shift does to an even-sized image, and an integer roll never does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = torch.fft.fft2(x.double()).abs().pow(2)
        h, w = x.shape[-2:]
        nyquist = energy[..., h // 2, :].sum(dim=(-1, -2)) + energy[..., :, w // 2].sum(dim=(-1, -2))
        gone = nyquist < 1e-10 * energy.sum(dim=(-1, -2, -3))
        return torch.stack([(~gone).float(), gone.float()], dim=1)


def test_every_preset_is_listed_and_names_its_paper() -> None:
    names = {p["name"] for p in list_presets()}
    assert names >= {"zhang2019-consistency", "chaman2021-circular", "azulay2019-jaggedness", "azulay2019-black-canvas",
                     "michaeli2023-worstcase", "engstrom2019-worst-of-k", "layers-sweep",
                     "rojasgomez2022-massc-circular", "rojasgomez2022-massc-linear"}
    assert all(p["description"] and p["paper"] for p in list_presets())


# (preset, headline metrics, fewer views than the preset's where its set is too slow for a test)
HEADLINES = [
    ("zhang2019-consistency", [M.CONSISTENCY], {"consistency_draws": 2}),
    ("chaman2021-circular", [M.CONSISTENCY], {}),
    ("azulay2019-jaggedness", [M.JAGGEDNESS, M.PATH_PROB_CHANGE], {}),
    ("azulay2019-black-canvas", [M.JAGGEDNESS, M.PATH_PROB_CHANGE], {}),
    ("michaeli2023-worstcase", [M.WORST_CASE_ACCURACY_INTEGER, M.WORST_CASE_ACCURACY_FRACTIONAL], {"shift": "1;-0.5"}),
    ("engstrom2019-worst-of-k", [M.WORST_CASE_ACCURACY, M.RANDOM_WORST_CASE_ACCURACY],
     {"shift": "-24,24", "random_shifts": 2}),
]


@pytest.mark.parametrize("preset, metrics, faster", HEADLINES, ids=[h[0] for h in HEADLINES])
def test_each_preset_runs_at_its_own_sizes_on_a_real_network(labelled: Path, preset: str, metrics: list[str],
                                                             faster: dict) -> None:
    rows = _run(preset, "mobilenet_v3_small", labelled, num_images=2, **faster)
    settings = load_preset(preset)
    assert settings.get("size") == 224  # the preset fixes the view the paper used
    for metric in metrics:
        part = rows[(rows["metric"] == metric) & rows["shift_x"].isna()]
        assert len(part) == 1 and part["n"].iloc[0] == 2, metric
        assert 0.0 <= part["value"].iloc[0] <= 1.0


def test_zhang_draws_five_pairs_in_the_papers_windows_and_pins_v1_weights(labelled: Path) -> None:
    settings = load_preset("zhang2019-consistency")
    assert parse_pair_offsets(settings["consistency"]) == (-15, 16)  # windows {0..31} of the 256 canvas
    assert settings["consistency_draws"] == 5 and settings["resize"] == 256
    assert settings["weights"]["resnet50"] == settings["weights"]["mobilenet_v2"] == "IMAGENET1K_V1"
    assert ShiftPlan(((0, 0),), 224, "crop", pair_offsets=(-15, 16)).canvas == 256
    rows = _run("zhang2019-consistency", "example:constant", labelled)
    assert _whole_set(rows, M.CONSISTENCY) == 1.0
    assert not rows["metric"].str.startswith("worst_case").any()  # a worst case over {0} alone says nothing


def test_chaman_circular_consistency_is_one_for_a_circular_network(labelled: Path) -> None:
    rows = _run("chaman2021-circular", "example:circular_gap", labelled, num_images=2)
    assert _whole_set(rows, M.CONSISTENCY) == 1.0


def test_azulay_crop_protocol_is_flat_for_an_invariant_model(labelled: Path) -> None:
    shifts = make_shift_set(load_preset("azulay2019-jaggedness")["shift"], "diagonal")
    assert sorted(s[0] for s in shifts) == list(range(-3, 6))  # windows (c, c), c = 0..8, of the 234 image
    rows = _run("azulay2019-jaggedness", "example:constant", labelled)
    assert _whole_set(rows, M.JAGGEDNESS) == 0.0 and _whole_set(rows, M.PATH_PROB_CHANGE) == 0.0


def test_azulay_black_canvas_moves_the_edge_one_pixel_per_step(labelled: Path) -> None:
    """The embedded image's left edge moves 1 px per diagonal step on black: the parity model
    changes class at every step (jaggedness 1) and its top probability by tanh(5) each time."""
    rows = _run("azulay2019-black-canvas", EdgeParity(), labelled)
    assert _whole_set(rows, M.JAGGEDNESS) == 1.0
    assert _whole_set(rows, M.PATH_PROB_CHANGE) == pytest.approx(math.tanh(5), abs=1e-12)
    agreement = rows[rows["metric"] == M.TOP1_AGREEMENT].set_index("shift_x")["value"]
    assert len(agreement) == 9 and all(agreement[d] == (1.0 if d % 2 == 0 else 0.0) for d in range(-5, 4))


def test_michaeli_reports_integer_and_half_pixel_worst_cases_apart(labelled: Path) -> None:
    """Half-pixel Fourier shifts remove the Nyquist energy that integer rolls keep: a model that
    sees it is right under every integer shift and wrong under every half-pixel one."""
    shifts = make_shift_set(load_preset("michaeli2023-worstcase")["shift"], "grid")
    assert len(shifts) == 1 + 2 * 31 * 31
    rows = _run("michaeli2023-worstcase", NyquistGone(), labelled, shift="1..2;-1.5..-0.5")
    assert _whole_set(rows, M.WORST_CASE_AGREEMENT_INTEGER) == 1.0
    assert _whole_set(rows, M.WORST_CASE_AGREEMENT_FRACTIONAL) == 0.0
    assert _whole_set(rows, M.WORST_CASE_AGREEMENT) == 0.0
    assert not ((rows["shift_x"] % 1 == 0) & (rows["shift_y"] % 1 != 0)).any()  # no mixed pairs
    constant = _run("michaeli2023-worstcase", "example:constant", labelled, shift="1..2;-1.5..-0.5")
    accuracy = constant[(constant["metric"] == M.ACCURACY) & (constant["shift_x"] == 0)]["value"].iloc[0]
    for metric in (M.WORST_CASE_ACCURACY_INTEGER, M.WORST_CASE_ACCURACY_FRACTIONAL):
        assert _whole_set(constant, metric) == accuracy


def test_engstrom_grid_and_worst_of_ten_on_black_padding(labelled: Path) -> None:
    """The 5x5 grid in pad mode with black fill: the top-left pixel turns black exactly when the
    content moves right or down by a pixel or more, in the grid and in the random tries."""
    rows = _run("engstrom2019-worst-of-k", CornerIsBlack(), labelled)
    agreement = rows[rows["metric"] == M.TOP1_AGREEMENT]
    assert sorted(set(agreement["shift_x"])) == [-24, -12, 0, 12, 24] and len(agreement) == 25
    expected = ((agreement["shift_x"] <= 0) & (agreement["shift_y"] <= 0)).astype(float)
    assert (agreement["value"] == expected).all()
    assert _whole_set(rows, M.WORST_CASE_AGREEMENT) == 0.0
    settings = load_preset("engstrom2019-worst-of-k")
    plan = ShiftPlan(tuple(make_shift_set(settings["shift"], "grid")), 224, "pad", subpixel="bilinear", random_shifts=10)
    draws = plan.random_draws(torch.arange(3), seed=0)
    kept = [all(dx < 1 and dy < 1 for dx, dy in tries) for tries in draws]
    assert _whole_set(rows, M.RANDOM_WORST_CASE_AGREEMENT) == pytest.approx(sum(kept) / 3)
    constant = _run("engstrom2019-worst-of-k", "example:constant", labelled)
    accuracy = constant[(constant["metric"] == M.ACCURACY) & (constant["shift_x"] == 0) & (constant["shift_y"] == 0)]
    for metric in (M.WORST_CASE_ACCURACY, M.RANDOM_WORST_CASE_ACCURACY):
        assert _whole_set(constant, metric) == accuracy["value"].iloc[0]


@pytest.mark.parametrize("preset, mode", [("rojasgomez2022-massc-circular", "circular"),
                                          ("rojasgomez2022-massc-linear", "pad")])
def test_rojasgomez_massc_draws_five_shifts_within_32_px_at_513(labelled: Path, preset: str, mode: str) -> None:
    """Their defaults (num_shifts 5, max_shift 32, VOC's 513 crop), and the known answer at the
    preset's own sizes: maps that move exactly with the input agree at every draw (circular
    convolutions under rolls; a per-pixel map on the overlap of pad shifts)."""
    settings = load_preset(preset)
    assert (settings["size"], settings["resize"], settings["random_shifts"], settings["mode"]) == (513, 513, 5, mode)
    plan = ShiftPlan(tuple(make_shift_set(settings["shift"], settings["direction"])), 513, mode, random_shifts=5)
    draws = [d for image in plan.random_draws(torch.arange(200), seed=settings["seed"]) for d in image]
    assert {min(c) for c in zip(*draws)} == {-32} and {max(c) for c in zip(*draws)} == {32}  # both axes, both ends
    torch.manual_seed(0)
    model = "example:circular_segmenter" if mode == "circular" else nn.Conv2d(3, 4, 1)
    rows = _run(preset, model, labelled, num_images=2)
    assert _whole_set(rows, M.RANDOM_SEGMENTATION_CONSISTENCY) == 1.0
    assert rows[rows["metric"] == M.RANDOM_SEGMENTATION_CONSISTENCY]["n"].item() == 2


def test_layers_sweep_is_exact_on_a_circular_network(labelled: Path) -> None:
    rows = _run("layers-sweep", "example:circular_gap", labelled, mode="circular", shift="0..4", size=32, resize=40)
    layer_rows = rows[rows["metric"] == M.EQUIVARIANCE_ERROR]
    assert not layer_rows.empty and (layer_rows["value"] <= 1e-5).all()


def test_cli_flags_override_the_preset(labelled: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "transinv", "measure", "example:constant", "--weights", "none", "--config",
         "azulay2019-jaggedness", "--shift", "0..3", "--size", "32", "--resize", "40", "--data", str(labelled),
         "-f", "json"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = pd.read_json(io.StringIO(proc.stdout), typ="series")
    assert doc["settings"]["shift"] == "0..3" and doc["settings"]["mode"] == "crop"
    assert doc["settings"]["direction"] == "diagonal" and doc["settings"]["config"] == "azulay2019-jaggedness"


def test_pinned_weights_apply_per_model(labelled: Path) -> None:
    """A model -> weights mapping loads the named weights for a named model, DEFAULT for others."""
    assert "example:constant" not in load_preset("zhang2019-consistency")["weights"]
    common = dict(data=str(labelled), shift="0..1", size=32, resize=40)
    with pytest.raises(UserError, match="--weights IMAGENET1K_V1"):  # a factory takes no weights name
        transinv.measure("example:constant", weights={"example:constant": "IMAGENET1K_V1"}, **common)
    result = transinv.measure("example:constant", weights={"resnet18": "IMAGENET1K_V1"}, **common)
    assert result.settings["weights"] == {"resnet18": "IMAGENET1K_V1"} and set(result.rows["weights"]) == {"as-built"}


def test_bad_presets_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("shfit: 3\n")
    with pytest.raises(UserError, match=r"unknown setting .shfit. \(did you mean shift\?\)"):
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
