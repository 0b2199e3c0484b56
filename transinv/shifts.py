"""Shift sets and shifted views: how a batch of canvases becomes the views the model sees.

Convention (PROTOCOLS.md): a shift ``(dx, dy)`` moves image content right by ``dx`` and down by
``dy`` pixels, the convention of ``torch.roll(x, (dy, dx), dims=(-2, -1))``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from .errors import UserError

Mode = Literal["crop", "circular", "pad"]
Direction = Literal["x", "y", "diagonal", "grid"]
MODES: tuple[str, ...] = ("crop", "circular", "pad")
DIRECTIONS: tuple[str, ...] = ("x", "y", "diagonal", "grid")

Shift = tuple[int, int]

_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?::\s*(\d+)\s*)?$")


def _parse_int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(
            f"bad shift {text.strip()!r} in --shift {spec!r}: use whole pixels, e.g. 0..16, -8..8, "
            "0..32:4 or 0,1,2,4,8"
        ) from None


def parse_shift_values(spec: str) -> list[int]:
    """Parse ``0..16`` (inclusive), ``-8..8``, ``0..32:4``, ``0,1,2,4,8`` or ``5`` into values."""
    match = _RANGE.match(spec)
    if match:
        start, stop = int(match.group(1)), int(match.group(2))
        step = int(match.group(3) or 1)
        if step == 0:
            raise UserError(f"bad --shift {spec!r}: the step after ':' must be at least 1")
        if stop < start:
            raise UserError(f"bad --shift {spec!r}: the range ends before it starts (write {stop}..{start})")
        return list(range(start, stop + 1, step))
    if ".." in spec or ":" in spec:
        raise UserError(f"bad --shift {spec!r}: a range is START..STOP or START..STOP:STEP, e.g. 0..32:4")
    values = [_parse_int(part, spec) for part in spec.split(",") if part.strip()]
    if not values:
        raise UserError("--shift is empty: give e.g. 0..16")
    return sorted(set(values))


def make_shifts(values: list[int], direction: str) -> list[Shift]:
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
    """Largest shift component in absolute value: the crop margin a canvas needs."""
    return max(max(abs(dx), abs(dy)) for dx, dy in shifts)


def canvas_size(size: int, shifts: Sequence[Shift], mode: str) -> int:
    """Side of the square canvas each image is decoded to: the view plus the crop margin."""
    return size + 2 * max_abs_shift(shifts) if mode == "crop" else size


def check_shifts(shifts: Sequence[Shift], size: int, mode: str, resize: int) -> None:
    """Reject shift sets the views cannot hold, with the fix in the message."""
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
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


@dataclass(frozen=True)
class ShiftPlan:
    """Everything that decides the views: the shifts, the view size, the mode and the fill value."""

    shifts: tuple[Shift, ...]
    size: int
    mode: str = "crop"
    fill: float = 0.0

    @property
    def canvas(self) -> int:
        return canvas_size(self.size, self.shifts, self.mode)

    def view(self, canvas: torch.Tensor, shift: Shift) -> torch.Tensor:
        return shifted_view(canvas, shift, self.size, self.mode, self.fill)
