"""``transinv show``: the figure's panels, and error maps whose true answer is known exactly."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from transinv.engine.data import builtin_images_dir
from transinv.errors import UserError
from transinv.reports.show import capture, draw, error_map, moved_reference, parse_shift, show

CAT = builtin_images_dir() / "chelsea.jpg"
SMALL = {"weights": "none", "size": 32, "resize": 48}
EXACT = 1e-6  # float32 rounding of exactly equal maps


def _titles(fig) -> list[str]:
    return [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]


def test_one_layer_draws_views_channels_moved_reference_and_error(tmp_path: Path) -> None:
    target = tmp_path / "fig" / "layer.png"
    shown = show("example:strided_circular", CAT, target, "2", "2", channels=3, mode="circular", **SMALL)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(target.parent.glob(".*"))  # written atomically: no temporary file left
    titles = _titles(draw(shown, channels=3))
    for first in ("x: ", "T_d x, d = (2, 0): ", "error |f(T_d x) - T_k f(x)|, E = "):
        assert sum(t.startswith(first) for t in titles) == 1, (first, titles)
    for row in ("f(x) ch", "f(T_d x) ch", "T_k f(x) ch"):
        assert sum(t.startswith(row) for t in titles) == 3, (row, titles)
    assert sum("k = (1, 0)" in t for t in titles) == 3  # stride 2: d = 2 px is one feature pixel


def test_circular_stride1_model_has_a_zero_error_map_at_every_layer() -> None:
    """Known answer: circular stride-1 convolutions are exactly equivariant under circular shifts."""
    shown = capture("example:circular_gap", CAT, "3,-2", "all", mode="circular", **SMALL)
    layers = shown.variants[0].layers
    assert [m.layer.name for m in layers] == ["0", "1", "2", "3"]
    for maps in layers:
        assert maps.moved is not None and maps.value is not None and maps.value <= EXACT
        assert torch.isfinite(maps.error).all() and maps.error.abs().max() <= EXACT  # circular: no NaN border
        assert torch.allclose(maps.moved, maps.shifted, atol=1e-5)


def test_strided_model_exact_when_aligned_and_not_aligned_in_place() -> None:
    """After a stride-2 circular conv, an even shift is aligned and exact; an odd one is not
    aligned: the map is the in-place difference, clearly non-zero, and the titles say so."""
    even = capture("example:strided_circular", CAT, "2", "2", mode="circular", **SMALL).variants[0].layers[0]
    assert even.layer.stride == (2, 2) and even.value is not None and even.value <= EXACT
    assert even.error.abs().max() <= EXACT
    odd = capture("example:strided_circular", CAT, "1", "2", mode="circular", **SMALL)
    maps = odd.variants[0].layers[0]
    assert maps.moved is None and maps.value is None and maps.error.mean() > 0.05
    titles = _titles(draw(odd, channels=2))
    assert "in place |f(T_d x) - f(x)| (not aligned)" in titles
    assert sum(t.endswith(": not aligned") for t in titles) == 2


def test_zero_padding_error_sits_in_the_border_columns_only() -> None:
    """Known answer: one zero-padded 3x3 conv under a circular shift of 3 px differs from the
    rolled map only where a border was: columns 0 and w-1 of the shifted view's map, and the
    reference's columns 0 and w-1 rolled to 3 and 2."""
    shown = capture("transinv.tour_models:conv1", CAT, "3", "conv", mode="circular", **SMALL)
    maps = shown.variants[0].layers[0]
    width = maps.error.shape[1]
    columns = (maps.error > EXACT).any(dim=0).nonzero().ravel().tolist()
    assert columns == [0, 2, 3, width - 1]


def test_crop_mode_compares_the_overlap_only() -> None:
    """Known answer: unpadded convolutions are exact on the overlap in crop mode; outside it the
    map is undefined (NaN, drawn grey): the first d columns for a shift d to the right."""
    maps = capture("example:valid_conv", CAT, "4", "2", **SMALL).variants[0].layers[0]
    assert maps.value is not None and maps.value <= EXACT
    undefined = torch.isnan(maps.error)
    assert undefined[:, :4].all() and not undefined[:, 4:].any()
    assert maps.error[:, 4:].abs().max() <= EXACT


def test_layer_all_is_the_default_selection_in_forward_order_for_each_variant() -> None:
    shown = capture("resnet18", CAT, "4", "all", variants="base,aps+padding:circular", mode="circular",
                    weights="none", size=64, resize=96)
    names = [[m.layer.name for m in v.layers] for v in shown.variants]
    assert all(n[0] == "conv1" and n[-1] == "layer4" for n in names)
    # the stage outputs in both; APS's own downsampling layers are the first at each new stride
    assert all({"conv1", "layer1", "layer2", "layer3", "layer4"} <= set(n) for n in names)
    base, aps = shown.variants
    aligned = [m for m in base.layers if m.value is not None]
    assert [m.layer.name for m in aligned] == ["conv1", "relu", "maxpool", "layer1"]  # strides 2, 2, 4, 4
    assert all(m.value > 0.05 for m in aligned)  # zero padding under circular shifts
    assert all(m.value <= 1e-5 for m in aps.layers if m.value is not None)  # APS + circular padding: exact
    titles = _titles(draw(shown))
    assert "resnet18" in titles[0] or any(t.startswith("conv1 (s=2): E = ") for t in titles)
    assert sum(t.startswith("layer4 (s=32): in place, not aligned") for t in titles) == 2


def test_moved_reference_and_error_map_helpers() -> None:
    ref = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(moved_reference(ref, (1, 0), True), torch.roll(ref, 1, dims=-1))
    moved = moved_reference(ref, (-1, 1), False)
    assert torch.isnan(moved[0, 0]).all() and torch.isnan(moved[0, :, 3]).all()
    assert torch.equal(moved[0, 1:, :3], ref[0, :2, 1:])
    error = error_map(ref, ref + 1.0, None)  # in place, off by 1 everywhere; mean |f(x)| = 5.5
    assert torch.allclose(error, torch.full((3, 4), 1 / 5.5))


@pytest.mark.parametrize("spec, expected", [("3", (3, 0)), ("-2,4", (-2, 4)), (" 1 , 0 ", (1, 0)), (5, (5, 0))])
def test_parse_shift(spec: object, expected: tuple[int, int]) -> None:
    assert parse_shift(spec) == expected


@pytest.mark.parametrize("spec", ["0..2", "1,2,3", "", "x"])
def test_parse_shift_rejects_anything_but_one_shift(spec: str) -> None:
    with pytest.raises(UserError, match="give one shift"):
        parse_shift(spec)


def test_cli_show_writes_the_figure_and_errors_are_one_line(tmp_path: Path) -> None:
    target = tmp_path / "show.svg"
    base = [sys.executable, "-m", "transinv", "show", "example:strided_circular", str(CAT), "--weights", "none",
            "--size", "32", "--resize", "48"]
    proc = subprocess.run([*base, "--shift", "-2,2", "--mode", "circular", "--layer", "all", "-o", str(target)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert target.read_text().lstrip().startswith("<?xml") and proc.stderr.startswith(f"wrote {target}")
    rows = pd.read_csv(io.StringIO(proc.stdout), dtype={"layer": str})  # a pipe gets each layer's numbers as CSV
    assert list(rows["layer"]) == ["0", "1", "2", "3"] and list(rows["stride"]) == [1, 1, 2, 2]
    assert list(rows["aligned"]) == [True, True, True, True] and (rows["equivariance_error"] <= EXACT).all()
    proc = subprocess.run([*base, "--shift", "2", "--layer", "nope", "-o", str(target)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --layer: no layer matches 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1
