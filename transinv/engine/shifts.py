"""Shift sets and shifted views: how a batch of canvases becomes the views the model sees.

Convention (PROTOCOLS.md): a shift ``(dx, dy)`` moves image content right by ``dx`` and down by
``dy`` pixels, the convention of ``torch.roll(x, (dy, dx), dims=(-2, -1))``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .data import Preprocess
from ..errors import UserError
from ..options import DIRECTIONS, MODES, SUBPIXEL_METHODS  # noqa: F401  (their one home; re-exported)
from .subpixel import bilinear_shift, bilinear_shift_derivative, fourier_shift, fourier_shift_derivative

Number = int | float
Shift = tuple[Number, Number]
Fill = float | tuple[float, ...]

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


def parse_shift_groups(spec: str) -> list[list[Number]]:
    """``A;B``: shift sets measured in one run, each expanded by ``--direction`` on its own, so a
    grid never pairs a value of ``A`` with one of ``B`` (``1..31;-30.5..-0.5``)."""
    groups = [part for part in spec.split(";") if part.strip()]
    if not groups:
        raise UserError("--shift is empty: give e.g. 0..16")
    return [parse_shift_values(group) for group in groups]


def make_shift_set(spec: str, direction: str) -> list[Shift]:
    """Every ``(dx, dy)`` of a ``--shift`` spec along ``direction``, ``(0, 0)`` first."""
    pairs = [p for group in parse_shift_groups(spec) for p in make_shifts(group, direction)]
    return list(dict.fromkeys(pairs))


def is_fractional(shift: Shift) -> bool:
    """True when a component of ``shift`` is not a whole number of pixels."""
    return any(isinstance(v, float) for v in shift)


def is_subpixel(shifts: Sequence[Shift]) -> bool:
    """True when some shift is not a whole number of pixels."""
    return any(is_fractional(shift) for shift in shifts)


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


def canvas_size(size: int, shifts: Sequence[Shift], mode: str, embed: int | None = None) -> int:
    """Side of the square canvas each image is decoded to: the view plus the crop margin (crop),
    the downscaled image (embed), or the view itself (circular, pad)."""
    if mode == "crop":
        return size + 2 * max_abs_shift(shifts)
    return embed if mode == "embed" and embed is not None else size


def check_mode(mode: str) -> None:
    """Reject an unknown ``--mode`` (before any model is built)."""
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")


def check_shifts(
    shifts: Sequence[Shift], size: int, mode: str, resize: int, subpixel: str | None = None, embed: int | None = None
) -> None:
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
            raise UserError("--subpixel bilinear resamples with borders: use it with --mode crop, pad or embed")
    if (embed is not None) != (mode == "embed"):
        raise UserError("--mode embed needs --embed-size N (the side of the downscaled image), and only it takes one")
    largest = max_abs_shift(shifts)
    if mode == "crop":
        need = canvas_size(size, shifts, mode)
        if need > resize:
            raise UserError(
                f"shift {largest} needs a {need}-px canvas in crop mode, but images are resized to {resize} px: "
                f"pass --resize {need} or smaller shifts"
            )
    elif mode == "embed":
        assert embed is not None
        room = (size - embed) // 2
        if embed < 1 or largest > room:
            raise UserError(
                f"--embed-size {embed} in a {size}-px view leaves room for shifts up to {max(room, 0)} px, not "
                f"{largest}: use a smaller --embed-size or smaller shifts"
            )
    elif largest >= size:
        raise UserError(f"shift {largest} is not smaller than the {size}-px view: use shifts below {size}")


def parse_fill(fill: float | str | Sequence[float], mean: Sequence[float], std: Sequence[float]) -> Fill:
    """``--fill`` in normalised units: a number (every channel), ``R,G,B``, or ``black``, which is
    ``-mean / std`` per channel (pixel value 0 after normalisation)."""
    if isinstance(fill, str):
        if fill.strip().lower() == "black":
            return tuple(-m / s for m, s in zip(mean, std))
        try:
            values = [float(v) for v in fill.split(",")]
        except ValueError:
            raise UserError(f"--fill {fill!r}: give a number, R,G,B in normalised units, or black") from None
    else:
        values = [float(fill)] if isinstance(fill, (int, float)) else [float(v) for v in fill]
    if len(values) == 1:
        return values[0]
    if len(values) != len(mean):
        raise UserError(f"--fill takes one number or {len(mean)} (one per channel), got {len(values)}")
    return tuple(values)


def _background(like: torch.Tensor, size: int, fill: Fill) -> torch.Tensor:
    """A ``size x size`` frame with ``like``'s leading dimensions, each channel set to its fill
    (filled in place: no host-to-device copy, which on a GPU would wait for its queued work)."""
    frame = like.new_empty(*like.shape[:-2], size, size)
    if isinstance(fill, tuple):
        if len(fill) != frame.shape[-3]:
            raise UserError(f"--fill gives {len(fill)} channel values for images of {frame.shape[-3]} channels")
        for channel, value in enumerate(fill):
            frame[..., channel, :, :] = value
    else:
        frame.fill_(fill)
    return frame


def _place(image: torch.Tensor, size: int, top: int, left: int, fill: Fill) -> torch.Tensor:
    """``image`` pasted with its top-left corner at ``(top, left)`` of a filled ``size x size``
    frame; what falls outside the frame is dropped."""
    frame = _background(image, size, fill)
    height, width = image.shape[-2:]
    y0, y1, x0, x1 = max(top, 0), min(top + height, size), max(left, 0), min(left + width, size)
    if y1 > y0 and x1 > x0:
        frame[..., y0:y1, x0:x1] = image[..., y0 - top : y1 - top, x0 - left : x1 - left]
    return frame


def embed_origin(size: int, embed: int) -> int:
    """Row (and column) of the embedded image's top-left corner at shift 0: centred, rounded down."""
    return (size - embed) // 2


def subpixel_view(canvas: torch.Tensor, shift: Shift, size: int, mode: str, method: str, fill: Fill = 0.0) -> torch.Tensor:
    """A view moved by a fractional shift: a Fourier phase shift of the view (circular), or a
    bilinear resampling (crop: of the canvas, so real content enters; pad, embed: of the frame
    at shift 0, so the fill enters)."""
    dx, dy = (float(v) for v in shift)
    if method == "fourier":
        return fourier_shift(canvas, dx, dy)
    if mode == "crop":  # the canvas moved, then the standard view cut from it
        return shifted_view(bilinear_shift(canvas, dx, dy, "border"), (0, 0), size, "crop")
    frame = shifted_view(canvas, (0, 0), size, mode, fill)
    background = _background(frame, size, fill)
    return bilinear_shift(frame - background, dx, dy, "zeros") + background


def subpixel_view_derivative(
    canvas: torch.Tensor, velocity: tuple[float, float], size: int, mode: str, method: str, fill: Fill = 0.0
) -> torch.Tensor:
    """``d/dt subpixel_view(canvas, t·velocity)`` at ``t = 0``: how the view moves under a continuous
    shift (the derivative of the Fourier shift, or the central difference of the bilinear one, with
    the same canvas, crop and fill as ``subpixel_view``)."""
    vx, vy = (float(v) for v in velocity)
    if method == "fourier":
        return fourier_shift_derivative(canvas, vx, vy)
    if mode == "crop":
        return shifted_view(bilinear_shift_derivative(canvas, vx, vy, "border"), (0, 0), size, "crop")
    frame = shifted_view(canvas, (0, 0), size, mode, fill)
    return bilinear_shift_derivative(frame - _background(frame, size, fill), vx, vy, "zeros")


def shifted_view(canvas: torch.Tensor, shift: Shift, size: int, mode: str, fill: Fill = 0.0) -> torch.Tensor:
    """The ``size x size`` view of a batch of canvases ``(N, C, S, S)`` moved by ``shift``.

    crop: a slice of the larger canvas, offset from the centre (nothing wraps or is filled);
    circular: ``torch.roll`` of the view; pad: the view moved, the exposed strip set to ``fill``;
    embed: the ``S``-px canvas (a downscaled image) placed at the centre of a frame of ``fill``
    (Azulay & Weiss's black canvas), moved by ``shift``. ``fill`` is one value or one per channel.
    """
    dx, dy = shift
    if mode == "crop":
        margin = (canvas.shape[-1] - size) // 2
        top, left = margin - dy, margin - dx
        return canvas[..., top : top + size, left : left + size]
    if mode == "circular":
        return torch.roll(canvas, shifts=(dy, dx), dims=(-2, -1)) if (dx or dy) else canvas
    if mode == "pad":
        return _place(canvas, size, dy, dx, fill) if (dx or dy) else canvas
    if mode == "embed":
        origin = embed_origin(size, canvas.shape[-1])
        return _place(canvas, size, origin + dy, origin + dx, fill)
    raise UserError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")


def parse_pair_offsets(spec: str) -> tuple[int, int]:
    """``LO..HI``: the inclusive range each axis's random consistency offset is drawn from."""
    values = parse_shift_values(spec)
    if len(values) < 2 or is_subpixel([(v, 0) for v in values]):
        raise UserError(f"--consistency {spec!r}: give a whole-pixel range LO..HI, e.g. -15..16")
    return int(values[0]), int(values[-1])


_RANDOM_STREAM = 0x5DEECE66D  # keeps the random-shift draws apart from the consistency offsets


def _image_generator(seed: int, image: int, stream: int = 0) -> torch.Generator:
    """A generator of one image's draws: batching and sharding do not change them."""
    return torch.Generator().manual_seed(seed * 1_000_003 + int(image) + stream)


@dataclass(frozen=True)
class ShiftPlan:
    """Everything that decides the views: shifts, view size, mode, fill, sub-pixel method, the
    consistency offsets' range and draws per image (None: no pairs), the number of random shifts
    per image (0: none) and, in embed mode, the side of the embedded image."""

    shifts: tuple[Shift, ...]
    size: int
    mode: str = "crop"
    fill: Fill = 0.0
    subpixel: str | None = None
    pair_offsets: tuple[int, int] | None = None
    pair_draws: int = 1
    random_shifts: int = 0
    embed: int | None = None

    @property
    def extent(self) -> tuple[Shift, ...]:
        """Every shift a view can take, the consistency offsets' extremes included (random shifts
        stay inside the box of ``shifts``)."""
        if self.pair_offsets is None:
            return self.shifts
        lo, hi = self.pair_offsets
        return (*self.shifts, (lo, lo), (hi, hi))

    @property
    def canvas(self) -> int:
        return canvas_size(self.size, self.extent, self.mode, self.embed)

    def wrap_note(self) -> str | None:
        """In circular mode, a note when shifts reach half the view or more: a roll by ``d`` and by
        ``d - size`` are the same view, so such shifts repeat smaller ones (e.g. -32 and 32 at 64 px)."""
        reach = max((max(abs(dx), abs(dy)) for dx, dy in self.extent), default=0)
        if self.mode != "circular" or 2 * reach < self.size:
            return None
        return (f"--mode circular on {self.size} px views: shifts of {self.size / 2:g} px or more wrap around "
                f"(up to {reach:g} here), so they repeat smaller shifts the other way")

    def check(self, resize: int) -> None:
        """Reject a plan the canvas cannot hold (``resize``: the images' shorter side)."""
        check_shifts(self.extent, self.size, self.mode, resize, self.subpixel, self.embed)
        if self.random_shifts and len(self.shifts) < 2:
            raise UserError("--random-shifts draws inside the span of --shift: give a range, e.g. --shift -24..24")

    def decoding(self, pre: Preprocess) -> Preprocess:
        """How images are decoded for this plan: as ``pre`` says, or, in embed mode, resized so
        the shorter side is the embed size and centre-cropped to a square of that side."""
        if self.mode == "embed" and self.embed is not None:
            return replace(pre, resize=self.embed, size=self.embed)
        return pre

    def view(self, canvas: torch.Tensor, shift: Shift) -> torch.Tensor:
        """The view at ``shift``: integer shifts exactly, fractional ones by the sub-pixel method."""
        if self.subpixel is not None and is_fractional(shift):
            return subpixel_view(canvas, shift, self.size, self.mode, self.subpixel, self.fill)
        return shifted_view(canvas, shift, self.size, self.mode, self.fill)

    @property
    def continuous(self) -> str:
        """The sub-pixel method of infinitesimal shifts (the Lie derivative): ``subpixel`` when set,
        else the one the mode allows (fourier for circular views, bilinear for the others)."""
        return self.subpixel or ("fourier" if self.mode == "circular" else "bilinear")

    def view_derivative(self, canvas: torch.Tensor, velocity: tuple[float, float]) -> torch.Tensor:
        """``d/dt view(canvas, t·velocity)`` at ``t = 0`` (see ``subpixel_view_derivative``)."""
        return subpixel_view_derivative(canvas, velocity, self.size, self.mode, self.continuous, self.fill)

    def views_at(self, canvases: torch.Tensor, jobs: Sequence[tuple[int, Shift]]) -> torch.Tensor:
        """The views ``(image index, shift)``, each of its own image, stacked in order."""
        return torch.stack([self.view(canvases[i : i + 1], shift)[0] for i, shift in jobs])

    def pair_shifts(self, image_ids: torch.Tensor, seed: int) -> torch.Tensor:
        """Each image's consistency pairs ``(N, draws, 2, 2)``: ``[image, draw, view, (dx, dy)]``,
        every component uniform in ``pair_offsets``, from a generator seeded by the image id."""
        assert self.pair_offsets is not None
        lo, hi = self.pair_offsets
        rows = [torch.randint(lo, hi + 1, (self.pair_draws, 4), generator=_image_generator(seed, image))
                for image in image_ids.tolist()]
        return torch.stack(rows).reshape(-1, self.pair_draws, 2, 2) if rows else torch.zeros(0, self.pair_draws, 2, 2)

    def random_draws(self, image_ids: torch.Tensor, seed: int) -> list[list[Shift]]:
        """``random_shifts`` shifts per image, each axis uniform between the smallest and largest
        shift of that axis in ``shifts``: whole pixels, or any real value when a sub-pixel method
        is set; from a generator seeded by the image id."""
        lo = torch.tensor([min(s[0] for s in self.shifts), min(s[1] for s in self.shifts)], dtype=torch.float64)
        hi = torch.tensor([max(s[0] for s in self.shifts), max(s[1] for s in self.shifts)], dtype=torch.float64)
        draws = []
        for image in image_ids.tolist():
            u = torch.rand(self.random_shifts, 2, dtype=torch.float64, generator=_image_generator(seed, image, _RANDOM_STREAM))
            if self.subpixel is None:
                whole = torch.minimum(lo + (u * (hi - lo + 1)).floor(), hi).long()
                draws.append([(int(dx), int(dy)) for dx, dy in whole.tolist()])
            else:
                draws.append([(float(dx), float(dy)) for dx, dy in (lo + u * (hi - lo)).tolist()])
        return draws
