"""Shift sets and shifted views: how a batch of canvases becomes the views the model sees.

Convention (PROTOCOLS.md): a shift ``(dx, dy)`` moves image content right by ``dx`` and down by
``dy`` pixels, the convention of ``torch.roll(x, (dy, dx), dims=(-2, -1))``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import UserError
from .subpixel import bilinear_shift, fourier_shift

MODES: tuple[str, ...] = ("crop", "circular", "pad")
DIRECTIONS: tuple[str, ...] = ("x", "y", "diagonal", "grid")

Number = int | float
Shift = tuple[Number, Number]
SUBPIXEL_METHODS: tuple[str, ...] = ("fourier", "bilinear")

_NUMBER = r"-?\d+(?:\.\d+)?"
_RANGE = re.compile(rf"^\s*({_NUMBER})\s*\.\.\s*({_NUMBER})\s*(?::\s*(\d+(?:\.\d+)?)\s*)?$")


def _number(text: str, spec: str) -> Number:
    """A shift value: an int when whole, else a float (a sub-pixel shift)."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(
            f"bad shift {text.strip()!r} in --shift {spec!r}: use pixels, e.g. 0..16, -8..8, 0..32:4, 0,1,2,4,8 "
            "or 0..2:0.25"
        ) from None
    return int(value) if value.is_integer() else value


def _parse_part(part: str, spec: str) -> list[Number]:
    match = _RANGE.match(part)
    if match:
        start, stop = _number(match.group(1), spec), _number(match.group(2), spec)
        step = _number(match.group(3) or "1", spec)
        if step <= 0:
            raise UserError(f"bad --shift {spec!r}: the step after ':' must be positive")
        if stop < start:
            raise UserError(f"bad --shift {spec!r}: the range ends before it starts (write {stop}..{start})")
        count = int(round((stop - start) / step, 9)) + 1
        return [_number(repr(round(start + i * step, 9)), spec) for i in range(count)]
    if ".." in part or ":" in part:
        raise UserError(f"bad --shift {spec!r}: a range is START..STOP or START..STOP:STEP, e.g. 0..32:4")
    return [_number(part, spec)]


def parse_shift_values(spec: str) -> list[Number]:
    """Parse ``0..16`` (inclusive), ``-8..8``, ``0..32:4``, ``0..2:0.25``, ``0,1,2,4,8``, ``5``, or a
    comma list mixing them (``-15..15,-0.5,0.5``); the values come back sorted, each once."""
    values = [v for part in spec.split(",") if part.strip() for v in _parse_part(part, spec)]
    if not values:
        raise UserError("--shift is empty: give e.g. 0..16")
    return sorted(set(values))


def is_subpixel(shifts: Sequence[Shift]) -> bool:
    """True when some shift is not a whole number of pixels."""
    return any(isinstance(v, float) for shift in shifts for v in shift)


def make_shifts(values: list[Number], direction: str) -> list[Shift]:
    """Turn shift values into ``(dx, dy)`` pairs; ``(0, 0)`` always comes first as the reference."""
    if direction == "x":
        pairs = [(v, 0) for v in values]
    elif direction == "y":
        pairs = [(0, v) for v in values]
    elif direction == "diagonal":
        pairs = [(v, v) for v in values]
    elif direction == "grid":
        pairs = [(dx, dy) for dy in values for dx in values]
    else:
        raise UserError(f"unknown --direction {direction!r}: use one of {', '.join(DIRECTIONS)}")
    ordered = [(0, 0)] + [p for p in dict.fromkeys(pairs) if p != (0, 0)]
    return ordered


def max_abs_shift(shifts: Sequence[Shift]) -> int:
    """Largest shift component in absolute value, rounded up: the crop margin a canvas needs."""
    return math.ceil(max(max(abs(dx), abs(dy)) for dx, dy in shifts))


def canvas_size(size: int, shifts: Sequence[Shift], mode: str) -> int:
    """Side of the square canvas each image is decoded to: the view plus the crop margin."""
    return size + 2 * max_abs_shift(shifts) if mode == "crop" else size


def check_mode(mode: str) -> None:
    """Reject an unknown ``--mode`` (before any model is built)."""
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")


def check_shifts(shifts: Sequence[Shift], size: int, mode: str, resize: int, subpixel: str | None = None) -> None:
    """Reject shift sets the views cannot hold, and sub-pixel requests a mode cannot honour."""
    check_mode(mode)
    if subpixel is not None and subpixel not in SUBPIXEL_METHODS:
        raise UserError(f"unknown --subpixel {subpixel!r}: use fourier or bilinear")
    if is_subpixel(shifts):
        if subpixel is None:
            raise UserError("fractional shifts need a sub-pixel method: add --subpixel fourier or --subpixel bilinear")
        if subpixel == "fourier" and mode != "circular":
            raise UserError("--subpixel fourier is a circular (band-limited) shift: use it with --mode circular")
        if subpixel == "bilinear" and mode == "circular":
            raise UserError("--subpixel bilinear resamples with borders: use it with --mode crop or pad")
    largest = max_abs_shift(shifts)
    if mode == "crop":
        need = canvas_size(size, shifts, mode)
        if need > resize:
            raise UserError(
                f"shift {largest} needs a {need}-px canvas in crop mode, but images are resized to {resize} px: "
                f"pass --resize {need} or smaller shifts"
            )
    elif largest >= size:
        raise UserError(f"shift {largest} is not smaller than the {size}-px view: use shifts below {size}")


def subpixel_view(canvas: torch.Tensor, shift: Shift, size: int, mode: str, method: str, fill: float = 0.0) -> torch.Tensor:
    """A view moved by a fractional shift: a Fourier phase shift of the view (circular), or a
    bilinear resampling of the canvas (crop: real content enters; pad: the mean colour enters)."""
    dx, dy = (float(v) for v in shift)
    if method == "fourier":
        return fourier_shift(canvas, dx, dy)
    moved = bilinear_shift(canvas, dx, dy, "border" if mode == "crop" else "zeros")
    if mode == "pad" and fill:
        inside = bilinear_shift(torch.ones_like(canvas[:1, :1]), dx, dy, "zeros")
        moved = moved + (1 - inside) * fill
    margin = (canvas.shape[-1] - size) // 2
    return moved[..., margin : margin + size, margin : margin + size]


def shifted_view(canvas: torch.Tensor, shift: Shift, size: int, mode: str, fill: float = 0.0) -> torch.Tensor:
    """The ``size x size`` view of a batch of canvases ``(N, C, S, S)`` moved by ``shift``.

    crop: a slice of the larger canvas, offset from the centre (nothing wraps or is filled);
    circular: ``torch.roll`` of the view; pad: the view moved, the exposed strip set to ``fill``.
    """
    dx, dy = shift
    if mode == "crop":
        margin = (canvas.shape[-1] - size) // 2
        top, left = margin - dy, margin - dx
        return canvas[..., top : top + size, left : left + size]
    if mode == "circular":
        return torch.roll(canvas, shifts=(dy, dx), dims=(-2, -1)) if (dx or dy) else canvas
    if mode == "pad":
        if not (dx or dy):
            return canvas
        padded = F.pad(canvas, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), value=fill)
        top, left = max(-dy, 0), max(-dx, 0)
        return padded[..., top : top + size, left : left + size]
    raise UserError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")


def parse_pair_offsets(spec: str) -> tuple[int, int]:
    """``LO..HI``: the inclusive range each axis's random consistency offset is drawn from."""
    values = parse_shift_values(spec)
    if len(values) < 2 or is_subpixel([(v, 0) for v in values]):
        raise UserError(f"--consistency {spec!r}: give a whole-pixel range LO..HI, e.g. -16..15")
    return int(values[0]), int(values[-1])


@dataclass(frozen=True)
class ShiftPlan:
    """Everything that decides the views: shifts, view size, mode, fill, sub-pixel method and the
    range of the random offset pairs of the consistency protocol (None: no pairs)."""

    shifts: tuple[Shift, ...]
    size: int
    mode: str = "crop"
    fill: float = 0.0
    subpixel: str | None = None
    pair_offsets: tuple[int, int] | None = None

    @property
    def extent(self) -> tuple[Shift, ...]:
        """Every shift a view can take, the consistency offsets' extremes included."""
        if self.pair_offsets is None:
            return self.shifts
        lo, hi = self.pair_offsets
        return (*self.shifts, (lo, lo), (hi, hi))

    @property
    def canvas(self) -> int:
        return canvas_size(self.size, self.extent, self.mode)

    def view(self, canvas: torch.Tensor, shift: Shift) -> torch.Tensor:
        """The view at ``shift``: integer shifts exactly, fractional ones by the sub-pixel method."""
        if self.subpixel is not None and is_subpixel([shift]):
            return subpixel_view(canvas, shift, self.size, self.mode, self.subpixel, self.fill)
        return shifted_view(canvas, shift, self.size, self.mode, self.fill)

    def pair_views(self, canvases: torch.Tensor, image_ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of each image at random offsets, uniform in ``pair_offsets`` per axis, drawn
        from a generator seeded by the image id (so batching and sharding do not change them)."""
        assert self.pair_offsets is not None
        lo, hi = self.pair_offsets
        first, second = [], []
        for canvas, image in zip(canvases, image_ids.tolist()):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + int(image))
            dx1, dy1, dx2, dy2 = torch.randint(lo, hi + 1, (4,), generator=generator).tolist()
            first.append(self.view(canvas[None], (dx1, dy1))[0])
            second.append(self.view(canvas[None], (dx2, dy2))[0])
        return torch.stack(first), torch.stack(second)
