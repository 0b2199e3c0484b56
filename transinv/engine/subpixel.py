"""Fractional (sub-pixel) shifts of image batches: an ideal Fourier shift and a bilinear one.

Same convention as ``transinv.engine.shifts``: a positive ``dx`` moves content right and a positive ``dy``
moves it down, so an integer shift matches ``torch.roll(x, (dy, dx), dims=(-2, -1))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PADDING_MODES: tuple[str, ...] = ("zeros", "border", "reflection")


def _floating(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{what} shifts real floating-point images, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{what} needs images of shape (..., H, W), got shape {tuple(x.shape)}")


def _wavenumbers(n: int, full: bool, device: torch.device) -> torch.Tensor:
    """The integer frequencies ``k`` of one axis: all ``n`` bins (``full``, the ``fft`` axis), otherwise
    the ``n // 2 + 1`` bins of the ``rfft`` axis."""
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64, device=device)
    return k if full else k[: n // 2 + 1].abs()  # fftfreq lists n//2 as -n//2 for even n


def _at_nyquist(n: int, values: torch.Tensor, value: float) -> torch.Tensor:
    """``values`` of one axis with the Nyquist bin (``n // 2``, even ``n`` only) set to ``value``,
    written on the device (an item assignment would copy a host scalar: a stream sync, and refused
    inside a CUDA graph capture)."""
    if n % 2:
        return values
    nyquist = torch.arange(len(values), device=values.device) == n // 2
    return torch.where(nyquist, values.new_full((), value), values)


def _phase(n: int, d: float, full: bool, device: torch.device) -> torch.Tensor:
    """The phase factors ``exp(-2πi k d / n)`` of one axis, the Nyquist bin made real (see ``fourier_shift``)."""
    angle = -2.0 * math.pi * d * _wavenumbers(n, full, device) / n
    return _at_nyquist(n, torch.polar(torch.ones_like(angle), angle), math.cos(math.pi * d))


def fourier_shift(x: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Shift images ``(..., H, W)`` by ``(dx, dy)`` pixels with the ideal band-limited (circular) shift.

    The 2-D spectrum is multiplied by ``exp(-2πi (kx·dx/W + ky·dy/H))``, as in Michaeli et al. 2023
    ("Alias-free convnets"): the image is treated as one period of a band-limited signal, so an
    integer shift is exactly ``torch.roll`` and shifts compose (``a`` then ``b`` is ``a + b``).

    Nyquist bin (even H or W): the frequency ``n/2`` is its own mirror image, so the complex factor
    ``exp(∓iπd)`` would make the result complex for a fractional ``d``. We use its real part
    ``cos(πd)`` instead: the Nyquist term is read as the real cosine ``c·cos(πt)`` of the
    trigonometric interpolant, and ``cos(π(t - d))`` sampled at integer ``t`` is exactly
    ``cos(πd)·cos(πt)``. So the result is real, integer shifts are exact (``cos(πd) = (-1)^d``), but a
    fractional shift scales the Nyquist component by ``cos(πd)`` (it vanishes at half a pixel): norm
    preservation and composition hold exactly only for images with no Nyquist energy.

    Returns a real tensor of ``x``'s dtype (half precision is computed in float32).
    """
    _floating(x, "fourier_shift")
    height, width = x.shape[-2:]
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    spectrum = torch.fft.rfft2(work)
    shifted = spectrum * fourier_phases(height, width, dx, dy, x.device).to(spectrum.dtype)
    return torch.fft.irfft2(shifted, s=(height, width)).to(x.dtype)


def fourier_phases(height: int, width: int, dx: float, dy: float, device: torch.device,
                   axes: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """The factors (complex128) by which ``fourier_shift`` multiplies a spectrum to shift by ``(dx,
    dy)``: one table serves every map of that size and shift. ``axes`` names the spectrum:
    ``(-2, -1)`` an ``rfft2`` one, ``(H, W // 2 + 1)``; ``(-1,)`` an ``rfft`` along x, ``(1, W // 2 + 1)``
    (``dy`` must be 0); ``(-2,)`` an ``rfft`` along y, ``(H // 2 + 1, 1)`` (``dx`` must be 0). With
    the other component 0 the 1-D transform is the same shift at about half the work."""
    if axes == (-1,) or axes == (-2,):
        along_x = axes == (-1,)
        if (dy if along_x else dx) != 0:
            raise ValueError(f"a transform along {'x' if along_x else 'y'} only cannot shift by ({dx}, {dy})")
        factors = _phase(width if along_x else height, dx if along_x else dy, full=False, device=device)
        return factors[None, :] if along_x else factors[:, None]
    rows = _phase(height, dy, full=True, device=device)
    cols = _phase(width, dx, full=False, device=device)
    return rows[:, None] * cols[None, :]


def fourier_shift_derivative(x: torch.Tensor, vx: float, vy: float) -> torch.Tensor:
    """``d/dt fourier_shift(x, t·vx, t·vy)`` at ``t = 0``: the band-limited (spectral) derivative.

    Each frequency is multiplied by ``-2πi (kx·vx/W + ky·vy/H)``; the Nyquist bins get 0, the
    derivative of their ``cos(πd)`` factor at ``d = 0``. The operator is skew-symmetric, so
    ``<x, A x> = 0``: the energy of a map does not change to first order. Returns ``x``'s dtype.
    """
    _floating(x, "fourier_shift_derivative")
    height, width = x.shape[-2:]
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()

    def rate(n: int, full: bool) -> torch.Tensor:
        return _at_nyquist(n, -2.0 * math.pi * _wavenumbers(n, full, x.device) / n, 0.0)

    factor = 1j * (vy * rate(height, True)[:, None] + vx * rate(width, False)[None, :])
    spectrum = torch.fft.rfft2(work)
    return torch.fft.irfft2(spectrum * factor.to(spectrum.dtype), s=(height, width)).to(x.dtype)


def bilinear_shift(x: torch.Tensor, dx: float, dy: float, padding_mode: str = "zeros") -> torch.Tensor:
    """Shift images ``(..., H, W)`` by ``(dx, dy)`` pixels with bilinear resampling (Gruver et al. 2023).

    Output pixel ``(i, j)`` takes the bilinear interpolation of the input at ``(i - dy, j - dx)``
    (``grid_sample``, ``align_corners=False``); positions outside the image are filled by
    ``padding_mode``: ``zeros``, ``border`` (repeat the edge) or ``reflection``. An integer shift
    moves pixels exactly; a fractional one also blurs (bilinear weights average two neighbours).
    Sampling runs in float64: float32 grid coordinates are off by about ``size · 1e-7`` pixels,
    which leaves errors near 1e-4 in a whole-pixel shift of a 224-px image. Returns ``x``'s dtype.
    """
    _floating(x, "bilinear_shift")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}: use one of {', '.join(PADDING_MODES)}")
    height, width = x.shape[-2:]
    rows = torch.arange(height, dtype=torch.float64, device=x.device) - dy
    cols = torch.arange(width, dtype=torch.float64, device=x.device) - dx
    # pixel index p -> normalised coordinate (2p + 1) / n - 1 (pixel centres, align_corners=False)
    v = (2.0 * rows + 1.0) / height - 1.0
    u = (2.0 * cols + 1.0) / width - 1.0
    grid = torch.stack(torch.meshgrid(u, v, indexing="xy"), dim=-1)[None]
    flat = x.reshape(1, -1, height, width).to(torch.float64)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.reshape(x.shape).to(x.dtype)


def bilinear_shift_derivative(x: torch.Tensor, vx: float, vy: float, padding_mode: str = "zeros") -> torch.Tensor:
    """``d/dt bilinear_shift(x, t·vx, t·vy, padding_mode)`` at ``t = 0``, as the central difference
    ``-(vx·(x[j+1] - x[j-1]) + vy·(x[i+1] - x[i-1])) / 2``.

    The bilinear interpolant has a kink at every pixel centre, so its left and right derivatives
    there differ (a backward and a forward difference); this is their mean. Along one axis it
    equals the symmetric quotient ``(bilinear_shift(x, ε·v) - bilinear_shift(x, -ε·v)) / 2ε``
    exactly for any ``0 < ε·|v| ≤ 1``; along both, in the limit ``ε → 0``. Outside the image: 0
    (``zeros``) or the edge pixel (``border``, and ``reflection``, which reflects about the pixel
    edge). Returns ``x``'s dtype.
    """
    _floating(x, "bilinear_shift_derivative")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}: use one of {', '.join(PADDING_MODES)}")
    height, width = x.shape[-2:]
    flat = x.reshape(1, -1, height, width)
    padded = F.pad(flat, (1, 1, 1, 1), mode="constant" if padding_mode == "zeros" else "replicate")
    out = torch.zeros_like(flat)
    if vx:
        out -= 0.5 * vx * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
    if vy:
        out -= 0.5 * vy * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    return out.reshape(x.shape)
