"""Assertions for a user's pytest suite: measure a model and fail, one line per broken bound,
when its shift invariance or equivariance is worse than a tolerance (``transinv check`` in code).

A bound that the run cannot check (unknown metric, a layer it did not measure) raises
``UserError`` instead: the test errors, it never passes silently.
"""

from __future__ import annotations

from typing import Any, Mapping

from .gates import check, failure_message, parse_bounds
from .options import MeasureOptions
from .plan import ModelSpec
from .reports.results import Result

Bounds = Mapping[str, float] | None


def _assert(model: ModelSpec, at_most: dict[str, float], at_least: dict[str, float],
            options: MeasureOptions | None, keywords: dict[str, Any]) -> Result:
    from .api import measure

    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    bounds = parse_bounds(at_most, at_least)  # before measuring: a typo costs no run
    result = measure(model, options, progress=False, **keywords)
    verdicts = check(bounds, result.rows)
    if not all(v.passed for v in verdicts):
        raise AssertionError(failure_message(verdicts))
    return result


def assert_shift_invariant(
    model: ModelSpec, *, max_kl: float | None = 1e-9, min_agreement: float | None = 1.0,
    at_most: Bounds = None, at_least: Bounds = None, options: MeasureOptions | None = None, **keywords: Any,
) -> Result:
    """Fail unless ``kl_divergence <= max_kl`` and ``top1_agreement >= min_agreement`` at every
    shift (None drops a bound; an exactly invariant float32 model measures a KL near 1e-15); ``at_most``/``at_least`` add bounds in the CLI's spelling
    (``{"prob_change:4": 1e-3}``). Measure options come as ``options`` or keywords (``mode="circular"``);
    by default only the output is measured (``layers="none"``). Returns the measured ``Result``."""
    __tracebackhide__ = True
    upper = {**({"kl_divergence": max_kl} if max_kl is not None else {}), **(at_most or {})}
    lower = {**({"top1_agreement": min_agreement} if min_agreement is not None else {}), **(at_least or {})}
    if options is None and "layers" not in keywords:
        keywords["layers"] = "none"
    return _assert(model, upper, lower, options, keywords)


def assert_equivariant(
    model: ModelSpec, layer: str, *, tol: float = 1e-5, at_most: Bounds = None, at_least: Bounds = None,
    options: MeasureOptions | None = None, **keywords: Any,
) -> Result:
    """Fail unless ``equivariance_error`` at ``layer`` is at most ``tol`` at every shift aligned
    with the layer's stride (relative: ``‖f(T x) − T f(x)‖ / ‖f(x)‖``; float32 rounding stays below 1e-6). ``layer``
    is a name from ``transinv layers`` / ``list_layers``; it is measured unless ``layers`` is given."""
    __tracebackhide__ = True
    if options is None and "layers" not in keywords:
        keywords["layers"] = layer
    upper = {f"equivariance_error@{layer}": tol, **(at_most or {})}
    return _assert(model, upper, dict(at_least or {}), options, keywords)


__all__ = ["assert_shift_invariant", "assert_equivariant"]
