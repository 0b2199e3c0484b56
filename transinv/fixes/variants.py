"""Variant specs (``blurpool``, ``aps+padding:circular``, ...) and the transformed copies they name."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from .aps import DEFAULT_PROBE, adaptive_polyphase_in_place
from .blurpool import BLUR_KERNELS, DEFAULT_KERNEL, antialias_in_place
from .downsample import transformed_layer
from .padding import PADDING_MODES, pad_in_place
from .report import FixError, FixReport

VARIANT_PARTS = (
    "base, blurpool, blurpool:K, blurpool-all[:K] (K = 2..7), aps, "
    "padding:MODE (MODE = zeros, circular, reflect, replicate)"
)


@dataclass(frozen=True)
class Variant:
    """A parsed variant spec: padding mode, blur kernel (None: no blur), whether the stem is blurred, APS."""

    padding: str | None = None
    kernel: int | None = None
    stem: bool = False
    aps: bool = False


def parse_variant(variant: str) -> Variant:
    """``padding:MODE``, ``blurpool[:K]``, ``blurpool-all[:K]``, ``aps`` and ``base`` joined by '+'."""
    padding: str | None = None
    kernel: int | None = None
    stem = aps = False
    seen: set[str] = set()
    for part in variant.split("+"):
        name, colon, arg = part.strip().partition(":")
        family = "blurpool" if name in ("blurpool", "blurpool-all") else name
        if family in seen:
            raise FixError(f"variant {variant!r} repeats {family!r}")
        seen.add(family)
        if name in ("base", "aps") and not colon:
            aps = aps or name == "aps"
        elif family == "blurpool":
            if colon and not (arg.strip().isdigit() and int(arg) in BLUR_KERNELS):
                raise FixError(f"variant {variant!r}: {name}:K takes a kernel size K from 2 to 7, not {arg!r}")
            kernel, stem = (int(arg) if colon else DEFAULT_KERNEL), name == "blurpool-all"
        elif name == "padding" and arg.strip() in PADDING_MODES:
            padding = arg.strip()
        else:
            raise FixError(f"unknown variant part {part.strip()!r} in {variant!r}: use {VARIANT_PARTS}, joined by '+'")
    return Variant(padding, kernel, stem, aps)


def _check_untransformed(model: nn.Module) -> None:
    if (layer := transformed_layer(model)) is not None:
        raise FixError(f"{layer} is already transformed: apply blurpool or aps to the original model")


def build_variant(
    model: nn.Module, variant: str, layers: Sequence[str] | None = None, size: int = DEFAULT_PROBE
) -> tuple[nn.Module, list[FixReport]]:
    """A transformed copy for a variant spec and one report per fix: padding first, then BlurPool
    or APS (``blurpool+aps``: APS with the blur before the choice). ``layers`` (glob patterns of
    layer paths) restricts BlurPool and APS to the strided layers they match; ``size`` is the
    probe image APS runs once to find its branches. The caller's model is never changed."""
    spec = parse_variant(variant)
    out = copy.deepcopy(model)
    reports: list[FixReport] = []
    if spec.padding is not None:
        out, report = pad_in_place(out, spec.padding)
        reports.append(report)
    if spec.kernel is not None or spec.aps:
        _check_untransformed(out)
    if spec.aps:
        out, report = adaptive_polyphase_in_place(out, spec.kernel, layers, size)
        reports.append(report)
    elif spec.kernel is not None:
        out, report = antialias_in_place(out, spec.kernel, spec.stem, layers)
        reports.append(report)
    return out, reports


def apply_variant(
    model: nn.Module,
    variant: str,
    layers: Sequence[str] | None = None,
    size: int = DEFAULT_PROBE,
    warn: Callable[[str], None] | None = None,
    name: str | None = None,
) -> nn.Module:
    """``build_variant``'s copy; ``warn`` gets one line per fix naming the layers it replaced and kept."""
    out, reports = build_variant(model, variant, layers, size)
    if warn is not None:
        for report in reports:
            warn(report.line(name or type(model).__name__))
    return out


def antialias(
    model: nn.Module, kernel: int = DEFAULT_KERNEL, stem: bool = False, layers: Sequence[str] | None = None
) -> nn.Module:
    """A BlurPool copy placed as Zhang's released models (see ``transinv.fixes.blurpool``)."""
    _check_untransformed(model)
    return antialias_in_place(copy.deepcopy(model), kernel, stem, layers)[0]


def adaptive_polyphase(
    model: nn.Module, kernel: int | None = None, layers: Sequence[str] | None = None, size: int = DEFAULT_PROBE
) -> nn.Module:
    """An APS copy placed and shared as in the authors' code (see ``transinv.fixes.aps``)."""
    _check_untransformed(model)
    return adaptive_polyphase_in_place(copy.deepcopy(model), kernel, layers, size)[0]


def set_padding(model: nn.Module, mode: str) -> nn.Module:
    """A copy whose convs pad in ``mode`` (zeros, circular, reflect, replicate) and whose padded
    pools pad explicitly in that mode before pooling unpadded ('zeros' keeps pools as they are)."""
    return pad_in_place(copy.deepcopy(model), mode)[0]
