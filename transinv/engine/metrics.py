"""Metric definitions (per-image numbers) and their additive state (sums and counts).

Every metric is reduced to one float64 number per image as soon as its inputs exist; those
numbers are added into ``MetricState`` (sums of x, x^2, x^3, a count and the bootstrap
replicates' weighted sums per key), which merges by addition across batches, shards and
processes. Means and intervals exist only in ``MetricState.rows``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from ..metric_registry import (  # noqa: F401  (the names live in the registry; re-exported here)
    ACCURACY, CONSISTENCY, COSINE_DISTANCE, EMBEDDING_CHANGE, NN_AGREEMENT, PIXEL_AGREEMENT, PIXEL_KL_DIVERGENCE,
    SEGMENTATION_CONSISTENCY, CONSISTENCY_IF_CORRECT, CONSISTENCY_IF_WRONG, EQUIVARIANCE_ERROR, JAGGEDNESS,
    KL_DIVERGENCE, OUTPUT_LAYER, PATH_PROB_CHANGE, POOLED_INVARIANCE_ERROR, PROB_CHANGE, RANDOM_WORST_CASE_ACCURACY,
    RANDOM_WORST_CASE_AGREEMENT, TOP1_AGREEMENT, TOP1_AGREEMENT_IF_CORRECT, TOP1_AGREEMENT_IF_WRONG,
    WORST_CASE_ACCURACY, WORST_CASE_ACCURACY_FRACTIONAL, WORST_CASE_ACCURACY_INTEGER, WORST_CASE_AGREEMENT,
    WORST_CASE_AGREEMENT_FRACTIONAL, WORST_CASE_AGREEMENT_INTEGER, fixed_at_reference, is_proportion, value_bounds,
)
from ..metric_registry import EQUIVARIANCE_ERROR_INTERIOR, EQUIVARIANCE_ERROR_RESAMPLED, INPLACE_CHANGE  # noqa: F401
from ..metric_registry import RANDOM_SEGMENTATION_CONSISTENCY  # noqa: F401
from .subpixel import fourier_phases, fourier_shift  # noqa: F401  (fourier_shift: re-exported)

Shift = tuple[int, int]


@dataclass(frozen=True)
class OutputComparison:
    """Per-image output metrics of shifted logits against the reference logits."""

    agreement: torch.Tensor
    kl: torch.Tensor
    prob_change: torch.Tensor
    prediction: torch.Tensor


@dataclass(frozen=True)
class ReferenceLogits:
    """Unshifted logits ``(N, classes)`` with what every shift's comparison reuses (computed once
    per batch): log-probabilities, probabilities, the top-1 class and its probability."""

    log_p: torch.Tensor
    p: torch.Tensor
    index: torch.Tensor
    p_top: torch.Tensor

    @classmethod
    def of(cls, reference: torch.Tensor) -> "ReferenceLogits":
        log_p = torch.log_softmax(reference.double(), dim=1)
        p, index = log_p.exp(), reference.argmax(dim=1)[:, None]
        return cls(log_p, p, index, p.gather(1, index))


def compare_outputs(reference: torch.Tensor | ReferenceLogits, shifted: torch.Tensor) -> OutputComparison:
    """top-1 agreement, KL(p(x) || p(T_d x)) in nats, and the change of p at the reference class,
    per image; ``shifted`` ``(..., N, classes)`` may stack several shifts ahead of the images
    (compared in the same few kernels as one)."""
    ref = reference if isinstance(reference, ReferenceLogits) else ReferenceLogits.of(reference)
    log_q = torch.log_softmax(shifted.double(), dim=-1)
    prediction = shifted.argmax(dim=-1)
    kl = (ref.p * (ref.log_p - log_q)).sum(dim=-1).clamp_min(0.0)
    prob_change = (log_q.gather(-1, ref.index.expand(*log_q.shape[:-1], 1)).exp() - ref.p_top).abs()[..., 0]
    return OutputComparison((prediction == ref.index[:, 0]).double(), kl, prob_change, prediction)


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over all but the batch dim, returned in float64 (computed in the input's dtype)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).double()


def _pieces(length: int, k: int, circular: bool) -> list[tuple[slice, slice]]:
    """Slice pairs (shifted, reference) along one axis holding the same content after a shift ``k``.

    Not circular: the overlap only. Circular: the overlap plus the part that wrapped around, so
    the pairs cover the whole axis without materialising a rolled copy.
    """
    if circular:
        k %= length
        pairs = [(slice(k, length), slice(0, length - k))]
        return pairs + [(slice(0, k), slice(length - k, length))] if k else pairs
    if abs(k) >= length:
        return []
    if k >= 0:
        return [(slice(k, length), slice(0, length - k))]
    return [(slice(0, length + k), slice(-k, length))]


@dataclass(frozen=True)
class Reference:
    """A layer's unshifted maps ``(N, C, h, w)`` with what every shift's comparison reuses, computed
    once per batch: the per-position energy (sum of squares over channels), the map norm, the
    per-channel means and their norm as denominators (NaN where 0, see ``_denominator``) and, if
    the layer is compared at fractional shifts, the maps' spectrum over ``spectrum_axes`` (see
    ``fourier_axes``; made here, not on first use, so a captured CUDA graph never holds a half-made one)."""

    maps: torch.Tensor
    energy: torch.Tensor
    pooled: torch.Tensor
    pooled_norm: torch.Tensor
    norm: torch.Tensor
    spectrum: torch.Tensor | None = None
    spectrum_axes: tuple[int, ...] | None = None

    @classmethod
    def of(cls, maps: torch.Tensor, spectrum_axes: tuple[int, ...] | None = None, fused: bool = False) -> "Reference":
        """``fused``: the channel means as ``compare_pass(fused=True)`` takes them (``_channel_means``)."""
        pooled = _channel_means(maps, fused)
        energy = maps.pow(2).sum(dim=1).double()
        spectrum = torch.fft.rfftn(maps, dim=spectrum_axes) if spectrum_axes else None
        return cls(maps, energy, pooled, _denominator(_per_image_norm(pooled)),
                   _denominator(energy.sum(dim=(-2, -1)).sqrt()), spectrum, spectrum_axes)


def _reference(reference: torch.Tensor | Reference) -> Reference:
    return reference if isinstance(reference, Reference) else Reference.of(reference)


def equivariance_error(
    reference: torch.Tensor | Reference, shifted: torch.Tensor, k: Shift, circular: bool
) -> torch.Tensor:
    """Per image ``||f(T_d x) - T_k f(x)|| / ||f(x)||`` over the region defined in both maps.

    ``k = (kx, ky)`` is the feature-map shift. circular: whole maps, ``T_k`` a roll; otherwise
    only positions present in both maps after shifting by ``k`` (the overlap), with both norms on
    that region. Images whose reference norm is 0 on the region give NaN and are not counted.
    """
    ref = _reference(reference)
    kx, ky = k
    h, w = ref.maps.shape[-2:]
    pieces = [(sy, sx, ry, rx) for sy, ry in _pieces(h, ky, circular) for sx, rx in _pieces(w, kx, circular)]
    if not pieces:  # no overlap: nothing defined
        return torch.full((ref.maps.shape[0],), float("nan"), dtype=torch.float64, device=ref.maps.device)
    num = den = None  # summed piece by piece (most shifts have one piece: no zero-filled start)
    for sy, sx, ry, rx in pieces:
        piece_num = _per_image_norm(shifted[..., sy, sx] - ref.maps[..., ry, rx]) ** 2
        piece_den = ref.energy[:, ry, rx].sum(dim=(-2, -1))
        num, den = (piece_num, piece_den) if num is None else (num + piece_num, den + piece_den)
    return _ratio(num.sqrt(), den.sqrt())


def pooled_invariance_error(reference: torch.Tensor | Reference, shifted: torch.Tensor) -> torch.Tensor:
    """Per image ``||g(T_d x) - g(x)|| / ||g(x)||`` with ``g`` the global average over positions.

    ``shifted`` may stack several shifts of the reference's images (shift-major, ``(S * N, C, h, w)``):
    the result is then ``(S, N)``, every shift in one step (each row as computed alone).
    """
    ref = _reference(reference)
    g_cur = shifted.mean(dim=(-2, -1)).double()
    g_cur = g_cur.unflatten(0, (-1, len(ref.pooled))) if len(g_cur) != len(ref.pooled) else g_cur
    return torch.linalg.vector_norm(g_cur - ref.pooled, dim=-1) / ref.pooled_norm


def _denominator(den: torch.Tensor) -> torch.Tensor:
    """``den`` where positive (at least the smallest normal float64), NaN elsewhere: dividing by it
    gives NaN for images whose reference norm is 0, in one division."""
    return torch.where(den > 0, den.clamp_min(torch.finfo(torch.float64).tiny), float("nan"))


def inplace_change(reference: torch.Tensor | Reference, shifted: torch.Tensor) -> torch.Tensor:
    """Per image ``||f(T_d x) - f(x)|| / ||f(x)||`` over the whole map, no realignment (the same
    position compared with itself); maps of different sizes give NaN."""
    ref = _reference(reference)
    if shifted.shape != ref.maps.shape:
        return torch.full((shifted.shape[0],), float("nan"), dtype=torch.float64, device=shifted.device)
    squares = ((shifted - ref.maps) ** 2).sum(dim=1).double()  # over channels in float32, positions in float64
    return squares.sum(dim=(-2, -1)).sqrt() / ref.norm


def _axis_masks(n: int, k: float, circular: bool, margin: int, resampled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis of length ``n``: the positions ``j`` compared after a feature shift ``k``, and
    those of them in the interior (``j`` and its source ``j - k`` both at least ``margin`` from the
    border). Not circular, the source must lie in the map; resampled, one pixel inside it, and
    ``j`` too (the Fourier shift wraps content around the edge)."""
    j = torch.arange(n, dtype=torch.float64)
    source = (j - k) % n if circular else j - k
    edge = 1 if resampled and not circular else 0
    compared = torch.ones(n, dtype=torch.bool) if circular else (
        (source >= edge) & (source <= n - 1 - edge) & (j >= edge) & (j <= n - 1 - edge))
    inner = (j >= margin) & (j <= n - 1 - margin) & (source >= margin) & (source <= n - 1 - margin)
    return compared, compared & inner


@dataclass(frozen=True)
class ShiftComparison:
    """One shift of one layer against its reference: the per-image errors on the compared region
    and on its interior, and the absolute error per position summed over images (NaN where not compared)."""

    error: torch.Tensor
    interior: torch.Tensor
    error_sum: torch.Tensor | None  # (h, w): sum over images of the channel mean of |f(T_d x) - T_k f(x)|


def compare_shift(
    reference: Reference, shifted: torch.Tensor, k: tuple[float, float], circular: bool, margin: tuple[int, int] = (0, 0),
    spatial: bool = True, axes: tuple[int, ...] | None = None,
) -> ShiftComparison:
    """``equivariance_error`` at a feature shift ``k = (kx, ky)``, whole or fractional, its interior
    version (``margin = (my, mx)`` feature pixels left out at each border) and, if ``spatial``, the
    spatial error map (else None): ``compare_pass`` for one shift (``axes``: see ``pass_geometry``).

    Whole ``k``: ``T_k`` is a roll (exact, the same numbers as ``equivariance_error``). Fractional:
    ``T_k`` is the band-limited circular ``fourier_shift`` of the reference maps, and the reference
    norm is that of the resampled maps on the same region.
    """
    h, w = reference.maps.shape[-2:]
    (group,) = pass_geometry(h, w, [k], circular, margin, reference.maps.dtype, reference.maps.device, axes=axes)
    errors, error_sum = _group_errors(reference, shifted.flatten(-2)[None], group, spatial)
    return ShiftComparison(errors[0, :, 0], errors[0, :, 1], None if error_sum is None else error_sum[0])


@dataclass(frozen=True)
class ShiftGroup:
    """The shifts of one pass that a layer compares alike: whole feature shifts (``T_k`` a roll,
    done as one gather) or fractional ones (``T_k`` the Fourier shift, one product of spectra)."""

    positions: tuple[int, ...]  # the shifts' places in the pass (shift-major stack)
    select: slice | torch.Tensor  # picks them out of the stack (a slice when they are consecutive)
    index: torch.Tensor | None  # whole, gathered: (S * h * w,) the reference position each compared position reads
    rolls: tuple[tuple[int, int], ...]  # whole: each shift's roll (ky, kx) of the reference maps
    phases: torch.Tensor | None  # fractional: (S, ...) the Fourier factors of the spectrum over ``axes``, its dtype
    axes: tuple[int, ...]  # fractional: the axes the Fourier resampling transforms (``fourier_axes``)
    masks: torch.Tensor  # (S, h * w, M) float64: the compared region, then (margin given) its interior
    sources: torch.Tensor | None  # whole: (h * w, S * M) the masks moved to the reference positions they read
    outside: torch.Tensor  # (S, h * w) bool: positions not compared (NaN in the error maps)

    @property
    def resampled(self) -> bool:
        return self.phases is not None


def is_whole(k: tuple[float, float]) -> bool:
    return float(k[0]).is_integer() and float(k[1]).is_integer()


def fourier_axes(ks: Sequence[tuple[float, float]]) -> tuple[int, ...]:
    """The axes the Fourier resampling of the fractional feature shifts ``(kx, ky)`` transforms:
    x only (``(-1,)``) when every ``ky`` is 0, y only (``(-2,)``) when every ``kx`` is 0, else both."""
    if all(ky == 0 for _, ky in ks):
        return (-1,)
    if all(kx == 0 for kx, _ in ks):
        return (-2,)
    return (-2, -1)


def pass_geometry(
    height: int, width: int, shifts: Sequence[tuple[float, float] | None], circular: bool,
    margin: tuple[int, int] | None, dtype: torch.dtype, device: torch.device | str, gather: bool | None = None,
    axes: tuple[int, ...] | None = None,
) -> tuple[ShiftGroup, ...]:
    """What comparing a pass's feature shifts ``(kx, ky)`` (None: not compared) on ``height x width``
    maps of ``dtype`` needs, made once per layer and group of shifts: at most two groups, whole
    shifts then fractional ones. ``margin = (my, mx)``: the masks get an interior column (M = 2).
    ``gather``: roll the reference for every whole shift in one index gather (one launch; the
    default on a GPU) rather than by block copies per shift (several times faster on the CPU).
    ``axes``: those the fractional shifts' Fourier resampling transforms (default: ``fourier_axes``
    of this pass's; a layer passes those of all its shifts, so one reference spectrum serves them)."""
    gather = torch.device(device).type == "cuda" if gather is None else gather
    groups = []
    for resampled in (False, True):
        positions = tuple(i for i, k in enumerate(shifts) if k is not None and is_whole(k) != resampled)
        if not positions:
            continue
        ks = [shifts[i] for i in positions]
        masks = []
        for kx, ky in ks:
            rows, rows_in = _axis_masks(height, ky, circular, margin[0] if margin else 0, resampled)
            cols, cols_in = _axis_masks(width, kx, circular, margin[1] if margin else 0, resampled)
            columns = [rows[:, None] & cols[None, :]] + ([rows_in[:, None] & cols_in[None, :]] if margin else [])
            masks.append(torch.stack(columns, dim=-1).flatten(0, 1))
        mask = torch.stack(masks).double()  # (S, h * w, M)
        consecutive = positions == tuple(range(positions[0], positions[-1] + 1))
        select = slice(positions[0], positions[-1] + 1) if consecutive else torch.tensor(positions, device=device)
        index = sources = phases = None
        transformed = (axes or fourier_axes(ks)) if resampled else ()
        if resampled:
            complex_dtype = torch.promote_types(dtype, torch.complex64)
            phases = torch.stack([fourier_phases(height, width, kx, ky, device, transformed)
                                  for kx, ky in ks]).to(complex_dtype)
        else:
            reads = [((torch.arange(height)[:, None] - int(ky)) % height * width
                      + (torch.arange(width)[None, :] - int(kx)) % width).flatten() for kx, ky in ks]
            read_masks = torch.empty_like(mask)
            for s, read in enumerate(reads):  # a roll is a permutation: each mask at the positions it reads
                read_masks[s, read] = mask[s]
            index = torch.cat(reads).to(device) if gather else None
            sources = read_masks.permute(1, 0, 2).flatten(1).to(device)
        rolls = tuple((int(ky) % height, int(kx) % width) for kx, ky in ks) if not resampled else ()
        groups.append(ShiftGroup(positions, select, index, rolls, phases, transformed, mask.to(device), sources,
                                 (mask[..., 0] == 0).to(device)))
    return tuple(groups)


def _group_errors(
    reference: Reference, stack: torch.Tensor, group: ShiftGroup, spatial: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per shift of ``group`` and image, ``||f(T_d x) - T_k f(x)|| / ||T_k f(x)||`` on each mask
    ``(S, N, M)``, and (``spatial``) the error maps ``(S, h, w)``; ``stack``: the group's shifted
    maps ``(S, N, C, h * w)``. Every shift of the group in the same few operations."""
    h, w = reference.maps.shape[-2:]
    moved, energy = _moved_reference(reference, group)
    if moved is None:  # every roll at once
        moved = _rolled(reference.maps, group)
    diff = torch.sub(stack, moved, out=moved)  # moved is a fresh copy: no second map-sized buffer
    errors = _masked_errors(_channel_energy(diff), group.masks, energy)
    if not spatial:
        return errors, None
    error_sum = diff.abs().mean(dim=2).sum(dim=1).double().masked_fill(group.outside, float("nan"))
    return errors, error_sum.unflatten(-1, (h, w))


def _channel_energy(maps: torch.Tensor) -> torch.Tensor:
    """``(S, N, C, P) -> (S, N, P)`` float64: the sum of squares over channels at each position: on
    a GPU one norm kernel (no squared copy), on the CPU a product and a sum (there several times
    faster than a norm over a strided axis)."""
    if maps.is_cuda:
        return torch.linalg.vector_norm(maps, dim=2).double().square()
    return (maps * maps).sum(dim=2).double()


def _masked_errors(diff_energy: torch.Tensor, masks: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """``(S, N, M)``: the difference's energy ``(S, N, P)`` summed on each mask ``(S, P, M)``, over the
    reference's ``energy`` there, square-rooted; NaN where the reference has no energy on the region
    (a positive energy is a normal float64)."""
    return torch.where(energy > 0, torch.bmm(diff_energy, masks) / energy, math.nan).sqrt()


def _moved_reference(reference: Reference, group: ShiftGroup,
                     energy: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The reference moved by each shift of ``group``, ``(S, N, C, h * w)``: Fourier-shifted (a fresh
    tensor), or None for whole shifts (rolled by the caller: block copies or, compiled, a gather); and
    (``energy``; else None) the reference's energy on each shift's masks ``(S, N, M)`` (whole shifts: one product)."""
    h, w = reference.maps.shape[-2:]
    if not group.resampled:
        on_masks = reference.energy.flatten(1) @ group.sources
        return None, on_masks.unflatten(1, (len(group.positions), -1)).transpose(0, 1)
    spectrum = (reference.spectrum if reference.spectrum_axes == group.axes
                else torch.fft.rfftn(reference.maps, dim=group.axes))
    sizes = [(h, w)[axis] for axis in group.axes]
    moved = torch.fft.irfftn(spectrum * group.phases[:, None, None], s=sizes, dim=group.axes).flatten(-2)
    return moved, torch.bmm(_channel_energy(moved), group.masks) if energy else None


def _fused_errors(stack: torch.Tensor, reference: torch.Tensor, index: torch.Tensor | None, moved: torch.Tensor | None,
                  masks: torch.Tensor, energy: torch.Tensor | None) -> torch.Tensor:
    """``_group_errors`` without the spatial maps, written to be compiled: the reference ``(N, C, P)``
    gathered by ``index`` (or ``moved``: rolled or resampled) is subtracted from ``stack`` ``(S, N, C, P)`` and
    summed in squares over channels in one kernel that reads each map once, with no map-sized
    temporary; ``energy`` None: the moved maps' own energy on the masks, in the same kernel."""
    if moved is None:
        moved = _gathered(reference, index)
    if energy is None:
        energy = torch.bmm((moved * moved).sum(dim=2).double(), masks)
    diff = stack - moved
    return _masked_errors((diff * diff).sum(dim=2).double(), masks, energy)


def _fused_change(stack: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Written to be compiled: per shift and image of ``stack`` ``(S, N, C, P)``, the squared distance to
    ``reference`` ``(N, C, P)`` at the same positions (over channels in float32, then in float64)."""
    return ((stack - reference) ** 2).sum(dim=2).double().sum(dim=-1)


def _fused_means(stack: torch.Tensor) -> torch.Tensor:
    """Written to be compiled: the channel means ``(S, N, C)`` of ``stack`` ``(S, N, C, P)``, in float64."""
    return stack.mean(dim=-1).double()


def _channel_means(maps: torch.Tensor, fused: bool) -> torch.Tensor:
    """The channel means of ``maps`` ``(S * N, C, h, w)`` in float64, computed alike for the reference and
    every pass (the reference's pass is one shift, the same call), so shift 0 gives 0 bit for bit:
    eager, or with the compiled kernel of ``fused_kernels``."""
    if fused:
        return fused_kernels(_dynamic(maps.device)).means(maps.flatten(-2)[None])[0]
    return maps.mean(dim=(-2, -1)).double()


class FusedKernels(NamedTuple):
    """The compiled comparison kernels (``fused_kernels``)."""

    errors: Callable[..., torch.Tensor]
    change: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    means: Callable[[torch.Tensor], torch.Tensor]


def _dynamic(device: torch.device) -> bool:
    """Whether the compiled kernels serve every map size (the CPU) or each size gets its own (a GPU).

    Inductor sizes a GPU reduction's blocks from the shapes it compiles for, so one kernel for every
    size is sized by the first it meets. On an H200, kernels compiled for resnet18's conv1 maps took
    0.5 to 0.75 of the time of one for every size (single calls, host overhead included:
    ``benchmarks/fused_kernels-h200.json``). The price: a compile per map size and branch, again for
    a smaller last batch. C++ loops on the CPU do not depend on the size, and each compile costs seconds."""
    return device.type != "cuda"


@functools.cache
def fused_kernels(dynamic: bool) -> FusedKernels:
    """``_fused_errors``, ``_fused_change`` and ``_fused_means`` through ``torch.compile`` (inductor:
    Triton kernels on a GPU, C++ on the CPU), made once per process; compiled on first use for any
    map size (``dynamic``) or for each, once per branch taken (whole or resampled shifts) and size-1
    axis: more than torch's default limit of 8 compiles per function in a varied run, so theirs is raised."""
    import torch._dynamo  # imported on first use only: it is slow to import

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    limit = config.patch(**{name: 64 if dynamic else 256})
    return FusedKernels(*(limit(torch.compile(kernel, dynamic=dynamic))
                          for kernel in (_fused_errors, _fused_change, _fused_means)))


def check_fused_kernels(device: torch.device) -> None:
    """Run every fused kernel and branch once on ``device`` before any map is measured, on passes
    shaped as most are (one shift, distinct sizes of 2 or more elsewhere, inference tensors), so
    what this compiles serves the run on the CPU (on a GPU, where each map size gets its own
    kernels, it only checks that compiling works): raises where torch.compile cannot compile (no C++
    compiler for the CPU, no Triton for the GPU)."""
    kernels = fused_kernels(_dynamic(device))
    with torch.inference_mode():
        stack, moved = torch.ones(1, 4, 5, 7, device=device), torch.ones(1, 4, 5, 7, device=device)
        masks = torch.ones(1, 7, 2, dtype=torch.float64, device=device)
        energy = torch.ones(4, 1, 2, dtype=torch.float64, device=device).transpose(0, 1)  # as _moved_reference's
        kernels.errors(stack, stack[0], torch.arange(7, device=device), None, masks, energy)
        kernels.errors(stack, stack[0], None, moved, masks, None)
        kernels.change(stack, stack[0])
        kernels.means(stack)


def _gathered(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(S, N, C, P)``: the flat maps ``(N, C, P)`` read at ``index`` ``(S * P,)``, each shift's positions."""
    return maps[..., index].unflatten(-1, (-1, maps.shape[-1])).permute(2, 0, 1, 3)


def _rolled(maps: torch.Tensor, group: ShiftGroup) -> torch.Tensor:
    """``(S, N, C, h * w)``: the maps ``(N, C, h, w)`` rolled by each whole shift of ``group``: one
    index gather (one launch) or four block copies per shift (see ``pass_geometry``)."""
    n, c, h, w = maps.shape
    if group.index is not None:
        return _gathered(maps.flatten(-2), group.index)
    out = maps.new_empty(len(group.rolls), n, c, h, w)
    for target, (ky, kx) in zip(out, group.rolls):
        for rows, source_rows in ((slice(ky, h), slice(0, h - ky)), (slice(0, ky), slice(h - ky, h))):
            for cols, source_cols in ((slice(kx, w), slice(0, w - kx)), (slice(0, kx), slice(w - kx, w))):
                target[..., rows, cols] = maps[..., source_rows, source_cols]
    return out.flatten(-2)


@dataclass(frozen=True)
class PassComparison:
    """One layer's comparison of a pass of ``S`` stacked shifts with its reference, per image."""

    errors: tuple[torch.Tensor, ...]  # per group (S_g, N, M): the error on the region, then the interior
    error_sums: tuple[torch.Tensor | None, ...]  # per group (S_g, h, w), or None (no spatial maps)
    inplace: torch.Tensor | None  # (S, N), None when not asked for
    pooled: torch.Tensor | None  # (S, N), None when not asked for


def compare_pass(
    reference: Reference, maps: torch.Tensor, groups: Sequence[ShiftGroup], spatial: bool = False,
    inplace: bool = True, pooled: bool = True, fused: bool = False,
) -> PassComparison:
    """Every per-layer metric of a pass ``maps`` ``(S * N, C, h, w)`` (shift-major) in a few
    operations whatever ``S``: the equivariance errors of each group of ``pass_geometry``, the
    in-place change and the pooled invariance error (each if asked for); nothing read back to the host.

    ``fused``: the map-sized work in compiled kernels (``fused_kernels``; the reference made with
    ``fused`` too, no spatial maps): the same definitions, summed in another order (float32
    rounding). Whole shifts with a gather index (a GPU's) are gathered inside the kernel; rolled by
    block copies first otherwise (on the CPU a gather is scalar loads: 12x slower, measured).
    """
    n, c, h, w = reference.maps.shape
    stack = maps.reshape(-1, n, c, h * w)
    ref = reference.maps.flatten(-2)
    if fused:
        if spatial:
            raise ValueError("fused comparisons make no error maps")
        kernels = fused_kernels(_dynamic(maps.device))
        out = []
        for group in groups:
            moved, energy = _moved_reference(reference, group, energy=False)
            if moved is None and group.index is None:  # rolled by block copies (the CPU's way): the kernel reads them
                moved = _rolled(reference.maps, group)
            out.append((kernels.errors(stack[group.select], ref, group.index, moved, group.masks, energy), None))
        change = kernels.change(stack, ref) if inplace else None
    else:
        out = [_group_errors(reference, stack[group.select], group, spatial) for group in groups]
        change = _channel_energy(stack - ref).sum(dim=-1) if inplace else None
    change = change.sqrt() / reference.norm if inplace else None
    pooled_error = (torch.linalg.vector_norm(_channel_means(maps, fused).unflatten(0, (-1, n)) - reference.pooled, dim=-1)
                    / reference.pooled_norm if pooled else None)
    return PassComparison(tuple(e for e, _ in out), tuple(m for _, m in out), change, pooled_error)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / _denominator(den)


Key = tuple[str, Shift | None, str]  # (layer, shift or None for whole-set metrics, metric)


BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_SEED = 20190411
BOOTSTRAP_SCHEME = f"poisson(1) by inverse CDF of lowbias32 hashes, seed {BOOTSTRAP_SEED}"  # names the draws in JSON
Z95 = 1.959963984540054
REFERENCE: Shift = (0, 0)
MIN_IMAGES = 10  # fewer images: an interval is flagged "n<10"
COCHRAN = 25  # a mean's interval is flagged "skewed" when n < COCHRAN * skewness**2 (Cochran 1977)
_MASK32 = 0xFFFFFFFF


def _poisson_cdf() -> torch.Tensor:
    """P(Poisson(1) <= k) for k = 0, 1, ... while below 1 - 2**-40 (the weights' inverse-CDF table)."""
    cdf, term, k = [], math.exp(-1.0), 0
    while not cdf or cdf[-1] < 1 - 2.0**-40:
        cdf.append((cdf[-1] if cdf else 0.0) + term)
        k += 1
        term /= k
    return torch.tensor(cdf, dtype=torch.float64)


_POISSON_CDF = _poisson_cdf()


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """The low 32 bits of ``x * c`` (``x``, ``c`` below 2**32) without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' hash-prospector): a bijective 32-bit integer hash with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def bootstrap_weights(image_ids: torch.Tensor, replicates: int = BOOTSTRAP_REPLICATES) -> torch.Tensor:
    """Poisson(1) resampling weights ``(images, replicates)``, a fixed function of each image's index.

    The online (Poisson) bootstrap: replicate ``r`` counts image ``i`` ``w_ir`` times. ``w_ir`` is
    the Poisson(1) inverse CDF of a uniform made by hashing ``(i, r)`` (counter-based, vectorised),
    so the intervals do not depend on batch size, worker count or process count.
    """
    ids = image_ids.detach().to("cpu", torch.int64)
    streams = _hash32((ids + BOOTSTRAP_SEED) & _MASK32)
    counters = (streams[:, None] + torch.arange(replicates, dtype=torch.int64)) & _MASK32
    uniform = (_hash32(counters).double() + 0.5) / 2.0**32
    return torch.searchsorted(_POISSON_CDF, uniform, right=True).double()


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed on ``n`` images."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    # at p = 0 (or 1) the bound is exactly 0 (or 1); the formula leaves float rounding there
    return 0.0 if p <= 0 else max(0.0, centre - half), 1.0 if p >= 1 else min(1.0, centre + half)


_ROUNDING = 64 * torch.finfo(torch.float64).eps  # relative size of float64 cancellation in E[x^2] - E[x]^2
_UNBOUNDED = 1e300  # t of a replicate without spread: finite, so quantiles interpolate, then read as inf


def studentized_interval(
    mean: torch.Tensor, squares: torch.Tensor, count: torch.Tensor, boot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """95% bootstrap-t intervals of means, one per key, from additive sums only.

    ``mean``, ``squares`` (sum of x^2) and ``count`` are ``(keys,)``; ``boot`` is ``(keys, 3, R)``:
    each replicate's weighted sums of x, x^2 and of the weights. Replicate r gives
    ``t_r = (m_r - mean) / (s_r / sqrt(n))`` (``m_r``, ``s_r``: its weighted mean and standard
    deviation; ``n`` the run's count, the weights' expected total); the interval is
    ``[mean - q_0.975 * se, mean - q_0.025 * se]`` with ``se = s / sqrt(n)`` and ``q`` the
    quantiles of ``t``. A replicate without spread (it drew copies of one value) has
    ``t_r = ±inf`` when its mean moved, so sparse values (one non-zero image) give an unbounded
    side, clipped to the metric's range by the caller. A spread below float64 rounding gives the
    point ``[mean, mean]``; keys with no usable replicate (no bootstrap weights) give NaN.
    """
    n = count.clamp_min(1)
    mean_square = squares / n
    var = torch.where(count > 1, (mean_square - mean * mean) * n / (n - 1).clamp_min(1), 0.0)
    var = torch.where(var > _ROUNDING * mean_square, var, 0.0)
    se = (var / n).sqrt()
    sums, weighted_squares, weights = boot.unbind(1)
    rep_mean = sums / weights
    rep_mean_square = weighted_squares / weights
    rep_var = (weighted_squares - weights * rep_mean * rep_mean) / (weights - 1)
    spread = (weights >= 2) & (rep_var > _ROUNDING * rep_mean_square)
    gap = rep_mean - mean[:, None]
    moved = gap.abs() > 4 * torch.finfo(torch.float64).eps * mean.abs()[:, None]
    t = torch.where(spread, gap / (rep_var / n[:, None]).sqrt(), _UNBOUNDED * gap.sign())
    t = torch.where((weights >= 1) & (spread | moved), t, float("nan"))
    q_low, q_high = torch.nanquantile(t, torch.tensor([0.025, 0.975], dtype=t.dtype), dim=1)
    q_low = torch.where(q_low.abs() < _UNBOUNDED * 1e-10, q_low, q_low.sign() * math.inf)
    q_high = torch.where(q_high.abs() < _UNBOUNDED * 1e-10, q_high, q_high.sign() * math.inf)
    low = torch.where(se > 0, mean - q_high * se, mean)
    high = torch.where(se > 0, mean - q_low * se, mean)
    return low, high


def skewness(mean: torch.Tensor, squares: torch.Tensor, cubes: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Sample skewness ``g1 = m3 / m2^1.5`` of the per-image values from their sums (0 where
    the spread is below float64 rounding)."""
    n = count.clamp_min(1)
    m2 = squares / n - mean * mean
    m3 = cubes / n - 3 * mean * squares / n + 2 * mean**3
    spread = m2 > _ROUNDING * squares / n
    return torch.where(spread, m3 / m2.clamp_min(torch.finfo(torch.float64).tiny) ** 1.5, 0.0)


def _t_quantile(z: float, dof: float) -> float:
    """Student-t quantile at the normal quantile ``z``: the Cornish-Fisher expansion to fourth order
    in 1/dof (Abramowitz & Stegun 26.7.5), within 2e-3 of the exact value from 4 degrees of freedom."""
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2) + (
        3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3) + (
        79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * dof**4)


def expanded_percentile_interval(replicates: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """95% expanded percentile intervals (Hesterberg 2015) of statistics known by their replicates.

    ``replicates`` is ``(keys, R)`` (NaN replicates are ignored), ``n`` ``(keys,)`` the images
    behind each. The percentile interval at levels ``a`` and ``1 - a`` with
    ``a = Phi(-sqrt(n / (n - 1)) * t_{n-1, 0.975})`` instead of 0.025, which undoes the
    percentile interval's narrowness at small ``n``. Keys with ``n < 2`` give NaN.
    """
    low, high = torch.full((2, len(n)), float("nan"), dtype=torch.float64)
    usable = ~replicates.isnan().all(dim=1) if replicates.shape[1] else torch.zeros(len(n), dtype=torch.bool)
    for k in n[usable & (n >= 2)].unique().tolist():
        a = NormalDist().cdf(-math.sqrt(k / (k - 1)) * _t_quantile(Z95, k - 1))
        rows = usable & (n == k)
        low[rows], high[rows] = torch.nanquantile(replicates[rows], torch.tensor([a, 1 - a], dtype=replicates.dtype), dim=1)
    return low, high


class MetricState:
    """Additive state per (layer, shift, metric) key: float64 sums of x, x^2, x^3 and a count,
    plus each Poisson bootstrap replicate's weighted sums of x, x^2 and of its weights.

    The key list is fixed at creation, so the state is two tensors that merge by addition and
    cross processes with ``all_reduce``. ``weights`` (set per batch) are the batch's bootstrap
    weights, one row per image, in the order the values are added.
    """

    def __init__(self, keys: Iterable[Key], device: torch.device | str = "cpu",
                 replicates: int = BOOTSTRAP_REPLICATES) -> None:
        self.keys: list[Key] = list(dict.fromkeys(keys))
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.data = torch.zeros(len(self.keys), 4, dtype=torch.float64, device=device)
        self.boot = torch.zeros(len(self.keys), 3, replicates, dtype=torch.float64, device=device)
        self.weights: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None
        self._rows: dict[tuple[Key, ...], torch.Tensor] = {}  # row indices of key lists, on the device

    def begin_batch(self, weights: torch.Tensor) -> None:
        """Collect one batch's per-image values (one row per key) until ``flush``: one copy per
        ``add`` instead of a dozen small reductions, which matters where kernel launches dominate."""
        self.weights = weights.to(self.data.device)
        self.pending = torch.full((len(self.keys), len(weights)), float("nan"), dtype=torch.float64,
                                  device=self.data.device)

    def add(self, key: Key, values: torch.Tensor) -> None:
        """Add per-image values; NaN entries (undefined for that image) are not counted.

        Between ``begin_batch`` and ``flush`` each key takes the batch's values once (one row of
        the batch buffer); outside a batch the values are added at once.
        """
        values = values.detach().flatten()
        if self.pending is not None:
            self.pending[self.index[key]] = values
            return
        self._accumulate(values.to(torch.float64)[None], slice(self.index[key], self.index[key] + 1))

    def add_rows(self, keys: tuple[Key, ...], values: torch.Tensor) -> None:
        """``add`` for several keys at once, ``values`` one row per key: within a batch one copy
        into the batch buffer (the keys' row indices are kept on the device per key list)."""
        if self.pending is None:
            for key, row in zip(keys, values):
                self.add(key, row)
            return
        rows = self._rows.get(keys)
        if rows is None:
            rows = self._rows[keys] = torch.tensor([self.index[key] for key in keys], device=self.data.device)
        self.pending.index_copy_(0, rows, values.detach())

    def flush(self) -> None:
        """Reduce the collected batch into the sums (no-op outside ``begin_batch``). A batch never
        flushed (an interrupted one) is dropped by the next ``begin_batch``."""
        if self.pending is not None:
            self._accumulate(self.pending, slice(None))
            self.pending = None

    def _accumulate(self, values: torch.Tensor, rows: slice) -> None:
        """Add ``values`` ``(keys, images)`` into the sums and the replicates' weighted sums (one
        matrix product), without a host sync."""
        defined = ~torch.isnan(values)
        values = torch.where(defined, values, 0.0)
        squares = values * values
        self.data[rows] += torch.stack([values.sum(1), squares.sum(1), (squares * values).sum(1),
                                        defined.sum(1).double()], dim=1)
        if self.weights is not None:
            stacked = torch.stack([values, squares, defined.double()], dim=1)  # (keys, 3, images)
            self.boot[rows] += (stacked.flatten(0, 1) @ self.weights).view(len(values), 3, -1)

    def merge(self, other: "MetricState") -> None:
        """Add another state with the same keys (another batch, shard or process)."""
        if other.keys != self.keys:
            raise ValueError("cannot merge metric states with different keys")
        self.data += other.data
        self.boot += other.boot

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors to sum across processes."""
        return self.data, self.boot

    def _filled(self) -> torch.Tensor:
        """Indices of the keys that received values (the keys ``rows`` reports, in order)."""
        return (self.data[:, 3] > 0).nonzero().flatten().cpu()

    def replicate_means(self) -> torch.Tensor:
        """``(rows, R)``: each bootstrap replicate's mean for every key ``rows`` reports (NaN where a
        replicate drew none of the images). Differences of two keys' replicate means measured on
        the same images are the paired bootstrap of the difference of their means."""
        sums, _, weights = self.boot[self._filled()].cpu().unbind(1)
        return sums / weights

    def rows(self) -> list[dict]:
        """One dict per key that received values: mean ``value``, ``n``, ``std``, a 95% interval
        and ``ci_warning`` (README, Intervals).

        Proportions get a Wilson interval, other means a studentized (bootstrap-t) interval
        clipped to the metric's range (the registry's ``bounds``: a KL divergence is never
        negative). At the reference shift a metric fixed by definition (agreement 1, errors 0;
        not accuracy) gets no interval (NaN). ``ci_warning`` is ``"n<10"`` below ``MIN_IMAGES``
        images, ``"skewed"`` for a mean whose ``n < 25 * skewness**2``, else ``""``.
        """
        filled = self._filled()
        if not len(filled):
            return []
        total, squares, cubes, count = self.data[filled].cpu().unbind(1)
        mean = total / count
        var = torch.where(count > 1, (squares / count - mean * mean).clamp_min(0) * count / (count - 1).clamp_min(1), 0.0)
        low, high = studentized_interval(mean, squares, count, self.boot[filled].cpu())
        skew = skewness(mean, squares, cubes, count)
        out = []
        for i, key_index in enumerate(filled.tolist()):
            layer, shift, metric = self.keys[key_index]
            n, value = int(count[i]), mean[i].item()
            interval = (low[i].item(), high[i].item())
            warning = "n<10" if n < MIN_IMAGES else ""
            if shift == REFERENCE and fixed_at_reference(metric):
                interval, warning = (math.nan, math.nan), ""
            elif is_proportion(metric):
                interval = wilson_interval(value, n)
            else:
                bottom, top = value_bounds(metric)
                interval = (min(max(interval[0], bottom), top), min(max(interval[1], bottom), top))
                warning = warning or ("skewed" if n < COCHRAN * skew[i].item() ** 2 else "")
            out.append(
                {
                    "layer": layer,
                    "shift_x": None if shift is None else shift[0],
                    "shift_y": None if shift is None else shift[1],
                    "metric": metric,
                    "value": value,
                    "n": n,
                    "std": var[i].item() ** 0.5,
                    "ci_low": interval[0],
                    "ci_high": interval[1],
                    "ci_warning": warning,
                }
            )
        return out
