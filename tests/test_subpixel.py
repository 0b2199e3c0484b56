"""Known answers for the sub-pixel shifts: exact rolls, composition, conservation, ramps, the Nyquist choice."""

from __future__ import annotations

import math
from typing import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from transinv.engine.shifts import shifted_view
from transinv.engine.subpixel import bilinear_shift, fourier_phases, fourier_shift, fourier_shift_derivative

sizes = st.integers(min_value=1, max_value=12)
whole = st.integers(min_value=-15, max_value=15)
fraction = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**16)
FAST = settings(deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only adds waits (~8 ms a call on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _no_nyquist(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random float64 image with the Nyquist row and column (even H, W) of its spectrum zeroed."""
    spectrum = torch.fft.fft2(_image(shape, seed, torch.float64))
    height, width = shape[-2:]
    if height % 2 == 0:
        spectrum[..., height // 2, :] = 0
    if width % 2 == 0:
        spectrum[..., :, width // 2] = 0
    return torch.fft.ifft2(spectrum).real


def _interior(height: int, width: int, dx: float, dy: float) -> tuple[slice, slice]:
    """The output rows and columns whose source ``(i - dy, j - dx)`` lies inside the image."""
    rows = slice(max(math.ceil(dy), 0), max(height + min(math.floor(dy), 0), 0))
    cols = slice(max(math.ceil(dx), 0), max(width + min(math.floor(dx), 0), 0))
    return rows, cols


@FAST
@given(height=sizes, width=sizes, dx=whole, dy=whole, seed=seeds)
def test_fourier_integer_shift_is_roll(height: int, width: int, dx: int, dy: int, seed: int) -> None:
    x = _image((2, 3, height, width), seed)
    shifted = fourier_shift(x, dx, dy)
    assert shifted.dtype == x.dtype and shifted.shape == x.shape
    torch.testing.assert_close(shifted, torch.roll(x, (dy, dx), dims=(-2, -1)), atol=1e-5, rtol=0)


@FAST
@given(height=sizes, width=sizes, a=st.tuples(fraction, fraction), b=st.tuples(fraction, fraction), seed=seeds)
def test_fourier_shifts_compose_without_nyquist(
    height: int, width: int, a: tuple[float, float], b: tuple[float, float], seed: int
) -> None:
    x = _no_nyquist((2, height, width), seed)
    twice = fourier_shift(fourier_shift(x, *a), *b)
    once = fourier_shift(x, a[0] + b[0], a[1] + b[1])
    torch.testing.assert_close(twice, once, atol=1e-5, rtol=0)


@FAST
@given(height=sizes, width=sizes, dx=fraction, dy=fraction, seed=seeds)
def test_fourier_shift_keeps_mean_and_norm(height: int, width: int, dx: float, dy: float, seed: int) -> None:
    x = _no_nyquist((3, height, width), seed)
    shifted = fourier_shift(x, dx, dy)
    torch.testing.assert_close(shifted.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted.norm(dim=(-2, -1)), x.norm(dim=(-2, -1)), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("d", [0.25, 0.5, 1.7, -2.3])
def test_fourier_shift_of_a_cosine_is_the_shifted_cosine(d: float) -> None:
    """Below Nyquist the shift is exact: cos(2πk(n)/N) becomes cos(2πk(n - d)/N)."""
    n = torch.arange(10, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * 3 * n / 10 + 0.4)
    expected = torch.cos(2 * math.pi * 3 * (n - d) / 10 + 0.4)
    torch.testing.assert_close(fourier_shift(wave[None, :], d, 0.0)[0], expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(fourier_shift(wave[:, None], 0.0, d)[:, 0], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("d", [0.0, 0.25, 0.5, 1.0, 1.5, -0.75])
def test_fourier_shift_scales_nyquist_by_cos(d: float) -> None:
    """The documented Nyquist choice: the checkerboard (-1)^(i+j) is scaled by cos(πdx)·cos(πdy)."""
    board = (-1.0) ** (torch.arange(6.0)[:, None] + torch.arange(8.0)[None, :])
    expected = board * math.cos(math.pi * d) * math.cos(math.pi * 0.5 * d)
    torch.testing.assert_close(fourier_shift(board, d, 0.5 * d), expected, atol=1e-6, rtol=0)


class _HostValues(TorchDispatchMode):
    """Records the ops that make a tensor from a host value (then copied to the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        if str(func).startswith(("aten.scalar_tensor", "aten.lift_fresh")):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_phase_tables_are_made_on_the_device_alone() -> None:
    """The Nyquist bin is set on the device: an item assignment there copies a host scalar to a GPU (a
    stream sync per view, refused inside a CUDA graph capture). The meta device shows such a copy."""
    meta = torch.device("meta")
    with _HostValues() as control:  # what the watch sees of an item assignment
        torch.zeros(4, device=meta)[2] = 1.0
    assert control.seen
    with _HostValues() as host:
        fourier_phases(8, 6, 0.5, 0.25, meta)
        fourier_phases(8, 6, 0.5, 0.0, meta, axes=(-1,))
        fourier_shift_derivative(torch.zeros(2, 8, 6, device=meta), 1.0, 0.5)
    assert host.seen == []


def test_half_precision_is_kept() -> None:
    x = _image((1, 2, 8, 8), 0)
    assert fourier_shift(x.bfloat16(), 0.5, 0.5).dtype == torch.bfloat16
    assert bilinear_shift(x.bfloat16(), 0.5, 0.5).dtype == torch.bfloat16


def test_integer_images_are_refused() -> None:
    with pytest.raises(TypeError):
        fourier_shift(torch.zeros(4, 4, dtype=torch.int64), 0.5, 0)


@FAST
@given(
    height=st.integers(2, 12),
    width=st.integers(2, 12),
    dx=st.integers(-11, 11),
    dy=st.integers(-11, 11),
    padding=st.sampled_from(["zeros", "border", "reflection"]),
    seed=seeds,
)
def test_bilinear_integer_shift_is_exact(height: int, width: int, dx: int, dy: int, padding: str, seed: int) -> None:
    x = _image((2, 3, height, width), seed)
    shifted = bilinear_shift(x, dx, dy, padding)
    rows, cols = _interior(height, width, dx, dy)
    exact = torch.roll(x, (dy, dx), dims=(-2, -1))
    torch.testing.assert_close(shifted[..., rows, cols], exact[..., rows, cols], atol=1e-5, rtol=0)
    if padding == "zeros" and abs(dx) < width and abs(dy) < height and height == width:
        torch.testing.assert_close(shifted, shifted_view(x, (dx, dy), height, "pad", 0.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_bilinear_integer_shift_is_exact_at_full_size(padding: str) -> None:
    """Float32 grid coordinates would leave ~1e-4 errors here; the shift must still be exact."""
    x = _image((1, 3, 224, 224), 1) * 2.5
    rows, cols = _interior(224, 224, 3, -5)
    exact = torch.roll(x, (-5, 3), dims=(-2, -1))
    shifted = bilinear_shift(x, 3, -5, padding)
    torch.testing.assert_close(shifted[..., rows, cols], exact[..., rows, cols], atol=1e-5, rtol=0)


def test_bilinear_half_pixel_shift_of_a_ramp() -> None:
    ramp = 3.0 * torch.arange(9.0) - 2.0
    image = ramp.expand(5, 9)
    shifted = bilinear_shift(image, 0.5, 0.0)
    torch.testing.assert_close(shifted[:, 1:], (3.0 * (torch.arange(9.0) - 0.5) - 2.0)[1:].expand(5, 8))
    down = bilinear_shift(image.T.contiguous(), 0.0, 0.5)
    torch.testing.assert_close(down[1:, :], shifted[:, 1:].T)


@FAST
@given(d=fraction, padding=st.sampled_from(["zeros", "border", "reflection"]))
def test_bilinear_shift_of_a_ramp_is_the_shifted_ramp(d: float, padding: str) -> None:
    """Bilinear interpolation reproduces linear functions: a ramp shifted by d is a(j - d) + b inside."""
    width = 12
    j = torch.arange(width, dtype=torch.float64)
    image = (0.7 * j + 1.0).expand(2, 4, width)
    shifted = bilinear_shift(image, d, 0.0, padding)
    _, cols = _interior(4, width, d, 0.0)
    torch.testing.assert_close(shifted[..., cols], (0.7 * (j - d) + 1.0)[cols].expand(2, 4, -1), atol=1e-10, rtol=0)


def test_bilinear_refuses_unknown_padding() -> None:
    with pytest.raises(ValueError, match="padding_mode"):
        bilinear_shift(torch.zeros(1, 1, 4, 4), 0.5, 0.0, "circular")
