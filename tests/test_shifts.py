"""Shift specs and shifted views: the conventions every metric depends on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from transinv.errors import UserError
from transinv.shifts import ShiftPlan, check_shifts, make_shifts, parse_shift_values, shifted_view


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
