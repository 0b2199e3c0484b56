"""Shift specs and shifted views: the conventions every metric depends on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import transinv
from transinv.engine.data import builtin_images_dir
from hypothesis import given
from hypothesis import strategies as st

from transinv.errors import UserError
from transinv.options import MeasureOptions
from transinv.engine.runner import worst_case_sets
from transinv.engine.shifts import (
    ShiftPlan, check_shifts, embed_origin, make_shift_set, make_shifts, parse_fill, parse_shift_values,
    shifted_view,
)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0..16", list(range(17))),
        ("-8..8", list(range(-8, 9))),
        ("0..32:4", [0, 4, 8, 12, 16, 20, 24, 28, 32]),
        ("0,1,2,4,8", [0, 1, 2, 4, 8]),
        ("5", [5]),
        (" 3 .. 5 ", [3, 4, 5]),
    ],
)
def test_parse_shift_values(spec: str, expected: list[int]) -> None:
    assert parse_shift_values(spec) == expected


@pytest.mark.parametrize("spec", ["", "a..b", "0..", "5..1", "0..8:0", "0,x", "0..8:2:1"])
def test_bad_shift_specs_raise_user_errors(spec: str) -> None:
    with pytest.raises(UserError):
        parse_shift_values(spec)


@given(st.integers(-40, 40), st.integers(0, 40), st.integers(1, 9))
def test_range_spec_matches_python_range(start: int, length: int, step: int) -> None:
    stop = start + length
    assert parse_shift_values(f"{start}..{stop}:{step}") == list(range(start, stop + 1, step))


def test_directions_and_reference_first() -> None:
    assert make_shifts([2, 4], "x") == [(0, 0), (2, 0), (4, 0)]
    assert make_shifts([0, 3], "y") == [(0, 0), (0, 3)]
    assert make_shifts([-1, 1], "diagonal") == [(0, 0), (-1, -1), (1, 1)]
    grid = make_shifts([0, 1], "grid")
    assert grid[0] == (0, 0) and sorted(grid) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(UserError):
        make_shifts([1], "sideways")


def test_shift_limits() -> None:
    check_shifts([(0, 0), (16, 0)], 224, "crop", 256)
    with pytest.raises(UserError, match="--resize 288"):
        check_shifts([(0, 0), (32, 0)], 224, "crop", 256)
    with pytest.raises(UserError):
        check_shifts([(0, 0), (224, 0)], 224, "circular", 256)


@given(st.integers(-6, 6), st.integers(-6, 6))
def test_views_move_content_right_and_down(dx: int, dy: int) -> None:
    """Positive dx moves content right, positive dy down, in every mode (torch.roll's convention)."""
    size = 16
    canvas = torch.arange(1 * 1 * 28 * 28, dtype=torch.float32).reshape(1, 1, 28, 28)
    crop0 = shifted_view(canvas, (0, 0), size, "crop")
    crop = shifted_view(canvas, (dx, dy), size, "crop")
    # crop: the view moved over the canvas; the overlap holds the same content, moved by (dx, dy)
    ys, xs = slice(max(dy, 0), size + min(dy, 0)), slice(max(dx, 0), size + min(dx, 0))
    ys0, xs0 = slice(max(-dy, 0), size + min(-dy, 0)), slice(max(-dx, 0), size + min(-dx, 0))
    assert torch.equal(crop[..., ys, xs], crop0[..., ys0, xs0])
    view = canvas[..., :size, :size]
    assert torch.equal(shifted_view(view, (dx, dy), size, "circular"), torch.roll(view, (dy, dx), (-2, -1)))
    padded = shifted_view(view, (dx, dy), size, "pad", fill=-1.0)
    assert torch.equal(padded[..., ys, xs], view[..., ys0, xs0])
    assert (padded == -1).sum() == size * size - (size - abs(dx)) * (size - abs(dy))


def test_crop_canvas_has_margin_of_largest_shift() -> None:
    plan = ShiftPlan(((0, 0), (-5, 0), (3, 0)), 10, "crop")
    assert plan.canvas == 20
    assert ShiftPlan(((0, 0), (5, 0)), 10, "circular").canvas == 10


def test_fractional_specs_give_floats_and_whole_values_stay_ints() -> None:
    assert parse_shift_values("0..1:0.25") == [0, 0.25, 0.5, 0.75, 1]
    assert all(isinstance(v, int) for v in parse_shift_values("0..4"))
    assert parse_shift_values("1.5") == [1.5]


def test_groups_are_expanded_apart_so_no_pair_mixes_them() -> None:
    """Michaeli's two grids: ``1..31`` and ``-30.5..-0.5``, never (0.5, 7)."""
    shifts = make_shift_set("1..31;-30.5..-0.5", "grid")
    whole = {(x, y) for x in range(1, 32) for y in range(1, 32)}
    halves = {(x - 0.5, y - 0.5) for x in range(-30, 1) for y in range(-30, 1)}
    assert shifts[0] == (0, 0) and set(shifts) == {(0, 0)} | whole | halves and len(shifts) == len(set(shifts))
    assert make_shift_set("0..2", "x") == make_shifts([0, 1, 2], "x")
    with pytest.raises(UserError):
        make_shift_set(" ; ", "x")


def test_worst_case_sets_split_whole_and_fractional_shifts_only_when_both_are_there() -> None:
    shifts = make_shift_set("1,2;0.5", "x")
    sets = {agreement: covered for agreement, _, covered in worst_case_sets(shifts)}
    assert sets == {"worst_case_agreement": shifts, "worst_case_agreement_integer": [(0, 0), (1, 0), (2, 0)],
                    "worst_case_agreement_fractional": [(0, 0), (0.5, 0)]}
    assert [a for a, _, _ in worst_case_sets(make_shifts([0, 1], "x"))] == ["worst_case_agreement"]
    assert [a for a, _, _ in worst_case_sets(make_shifts([0.5], "x"))] == ["worst_case_agreement"]


def test_fill_black_is_minus_mean_over_std_per_channel() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert parse_fill("black", mean, std) == pytest.approx([-m / s for m, s in zip(mean, std)])
    assert parse_fill("0.5,-1,2", mean, std) == (0.5, -1.0, 2.0)
    assert parse_fill(0, mean, std) == 0.0 and parse_fill("-1", mean, std) == -1.0
    assert parse_fill([1, 2, 3], mean, std) == (1.0, 2.0, 3.0)
    for bad in ("grey", "1,2"):
        with pytest.raises(UserError, match="--fill"):
            parse_fill(bad, mean, std)


@given(st.integers(-5, 5), st.integers(-5, 5))
def test_embed_places_the_image_at_the_centre_moved_by_the_shift_on_a_per_channel_fill(dx: int, dy: int) -> None:
    image = torch.rand(2, 3, 6, 6) + 5  # never equal to the fill
    fill = (-1.0, -2.0, -3.0)
    view = ShiftPlan(((0, 0),), 16, "embed", fill, embed=6).view(image, (dx, dy))
    origin = embed_origin(16, 6)
    assert origin == 5 and view.shape == (2, 3, 16, 16)
    top, left = origin + dy, origin + dx
    inside = view[..., max(top, 0) : top + 6, max(left, 0) : left + 6]
    assert torch.equal(inside, image[..., max(-top, 0) : 16 - top, max(-left, 0) : 16 - left])
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[max(top, 0) : top + 6, max(left, 0) : left + 6] = False
    for channel, value in enumerate(fill):
        assert (view[:, channel][:, outside] == value).all()


def test_pad_fills_each_channel_and_fractional_pad_and_embed_shifts_keep_the_fill() -> None:
    view = torch.rand(1, 3, 8, 8) + 5
    fill = (-1.0, 0.0, 2.0)
    padded = shifted_view(view, (2, 0), 8, "pad", fill)
    assert torch.equal(padded[0, :, :, :2], torch.tensor(fill).view(3, 1, 1).expand(3, 8, 2))
    plan = ShiftPlan(((0, 0),), 8, "pad", fill, subpixel="bilinear")
    assert torch.allclose(plan.view(view, (2.0, 0.0)), padded, atol=1e-6)
    half = plan.view(view, (2.5, 0.0))
    assert torch.allclose(half[0, :, :, :2], torch.tensor(fill).view(3, 1, 1).expand(3, 8, 2), atol=1e-6)
    embed = ShiftPlan(((0, 0),), 16, "embed", fill, subpixel="bilinear", embed=8)
    assert torch.allclose(embed.view(view, (1.0, -2.0)), embed.view(view, (1, -2)), atol=1e-6)


def test_embed_limits() -> None:
    check_shifts([(0, 0), (4, 4)], 16, "embed", 16, embed=8)
    with pytest.raises(UserError, match="room for shifts up to 4"):
        check_shifts([(0, 0), (5, 0)], 16, "embed", 16, embed=8)
    with pytest.raises(UserError, match="--embed-size"):
        check_shifts([(0, 0)], 16, "embed", 16)
    with pytest.raises(UserError, match="--embed-size"):
        check_shifts([(0, 0)], 16, "crop", 16, embed=8)
    with pytest.raises(UserError, match="consistency_draws"):
        MeasureOptions(consistency_draws=0).validate()
    with pytest.raises(UserError, match="random_shifts"):
        MeasureOptions(random_shifts=-1).validate()
    with pytest.raises(UserError, match="span of --shift"):
        ShiftPlan(((0, 0),), 16, "crop", random_shifts=3).check(32)


def test_zhang_offsets_give_exactly_the_32x32_windows_of_the_256_canvas() -> None:
    """``--consistency -15..16`` at size 224: window corners 16 - d, i.e. every one of {0..31}^2."""
    plan = ShiftPlan(((0, 0),), 224, "crop", pair_offsets=(-15, 16))
    assert plan.canvas == 256
    rows, cols = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    canvas = (rows * 256 + cols)[None, None]  # each pixel holds its own position
    corners = set()
    for dy in range(-15, 17):
        for dx in range(-15, 17):
            value = int(plan.view(canvas, (dx, dy))[0, 0, 0, 0])
            assert value == (16 - dy) * 256 + (16 - dx)
            corners.add(divmod(value, 256))
    assert corners == {(y, x) for y in range(32) for x in range(32)}
    drawn = plan.pair_shifts(torch.arange(4000), seed=0)
    assert set(drawn.flatten().tolist()) == set(range(-15, 17))
    assert len({tuple(s) for s in drawn.reshape(-1, 2).tolist()}) == 32 * 32


def test_more_consistency_draws_keep_the_first_pair_and_depend_only_on_the_image() -> None:
    ids = torch.tensor([3, 7, 11])
    one = ShiftPlan(((0, 0),), 8, "crop", pair_offsets=(-4, 4)).pair_shifts(ids, seed=2)
    five = ShiftPlan(((0, 0),), 8, "crop", pair_offsets=(-4, 4), pair_draws=5).pair_shifts(ids, seed=2)
    assert one.shape == (3, 1, 2, 2) and five.shape == (3, 5, 2, 2)
    assert torch.equal(five[:, :1], one)
    assert torch.equal(five[1:2], ShiftPlan(((0, 0),), 8, "crop", pair_offsets=(-4, 4), pair_draws=5)
                       .pair_shifts(torch.tensor([7]), seed=2))
    generator = torch.Generator().manual_seed(2 * 1_000_003 + 3)  # the one-pair draw of earlier versions
    assert one[0].flatten().tolist() == torch.randint(-4, 5, (4,), generator=generator).tolist()


def test_random_shifts_stay_in_the_span_of_the_set_whole_or_real() -> None:
    shifts = tuple(make_shifts([-24, -12, 0, 12, 24], "grid"))
    ids = torch.arange(200)
    whole = ShiftPlan(shifts, 224, "pad", random_shifts=10).random_draws(ids, seed=0)
    values = [v for row in whole for shift in row for v in shift]
    assert len(whole) == 200 and all(len(row) == 10 for row in whole)
    assert all(isinstance(v, int) for v in values) and set(values) == set(range(-24, 25))
    real = ShiftPlan(shifts, 224, "pad", subpixel="bilinear", random_shifts=10).random_draws(ids, seed=0)
    values = [v for row in real for shift in row for v in shift]
    assert all(isinstance(v, float) and -24 <= v <= 24 for v in values) and min(values) < -23 and max(values) > 23
    assert real[5] == ShiftPlan(shifts, 224, "pad", subpixel="bilinear", random_shifts=10).random_draws(
        torch.tensor([5]), seed=0)[0]
    along_x = ShiftPlan(tuple(make_shifts([0, 8], "x")), 32, "crop", random_shifts=4).random_draws(ids, seed=1)
    assert {dy for row in along_x for _, dy in row} == {0} and {dx for row in along_x for dx, _ in row} == set(range(9))


def test_a_shift_gives_the_same_rows_whichever_shifts_share_the_run(tmp_path: Path) -> None:
    """Images with odd sides: the row at shift 1 of ``0,1,2`` equals that of ``0,1,3`` (issue 10)."""
    for name, size in (("chelsea", (57, 41)), ("coffee", (61, 45)), ("rocket", (45, 59))):
        Image.open(builtin_images_dir() / f"{name}.jpg").convert("RGB").resize(size).save(tmp_path / f"{name}.png")
    common = dict(weights="none", data=str(tmp_path), size=32, resize=41)
    columns = ["layer", "shift_x", "metric", "value", "n", "std", "ci_low", "ci_high"]

    def at_one(shift: str) -> list[dict]:
        rows = transinv.measure("resnet18", shift=shift, **common).rows
        return rows[rows["shift_x"] == 1][columns].to_dict("records")

    first = at_one("0,1,2")
    assert len(first) > 10 and first == at_one("0,1,3")


def test_a_set_of_shift_zero_alone_has_no_worst_case_or_path_rows() -> None:
    rows = transinv.measure("example:constant", weights="none", shift="0", size=32, resize=40, num_images=2).rows
    assert set(rows["metric"]) == {"top1_agreement", "kl_divergence", "prob_change"}
    assert rows["shift_x"].notna().all()


def test_circular_shifts_of_half_the_view_or_more_get_a_note() -> None:
    from transinv.engine.shifts import ShiftPlan

    assert ShiftPlan(((0, 0), (32, 0), (-32, 0)), 64, mode="circular").wrap_note().startswith(
        "--mode circular on 64 px views: shifts of 32 px or more wrap around (up to 32 here)")
    assert ShiftPlan(((0, 0), (31, -31)), 64, mode="circular").wrap_note() is None
    assert ShiftPlan(((0, 0), (32, 0)), 64, mode="crop").wrap_note() is None
