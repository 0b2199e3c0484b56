"""Metric definitions (per-image numbers) and their additive state (sums and counts).

Every metric is reduced to one float64 number per image as soon as its inputs exist; those
numbers are added into ``MetricState`` (sum, sum of squares, count per key), which merges by
addition across batches, shards and processes. Means exist only in ``MetricState.rows``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from .metric_registry import (  # noqa: F401  (the names live in the registry; re-exported here)
    ACCURACY, CONSISTENCY, CONSISTENCY_IF_CORRECT, CONSISTENCY_IF_WRONG, EQUIVARIANCE_ERROR, JAGGEDNESS,
    KL_DIVERGENCE, OUTPUT_LAYER, PATH_PROB_CHANGE, POOLED_INVARIANCE_ERROR, PROB_CHANGE, RANDOM_WORST_CASE_ACCURACY,
    RANDOM_WORST_CASE_AGREEMENT, TOP1_AGREEMENT, TOP1_AGREEMENT_IF_CORRECT, TOP1_AGREEMENT_IF_WRONG,
    WORST_CASE_ACCURACY, WORST_CASE_ACCURACY_FRACTIONAL, WORST_CASE_ACCURACY_INTEGER, WORST_CASE_AGREEMENT,
    WORST_CASE_AGREEMENT_FRACTIONAL, WORST_CASE_AGREEMENT_INTEGER, is_proportion,
)

Shift = tuple[int, int]


@dataclass(frozen=True)
class OutputComparison:
    """Per-image output metrics of shifted logits against the reference logits."""

    agreement: torch.Tensor
    kl: torch.Tensor
    prob_change: torch.Tensor
    prediction: torch.Tensor


def compare_outputs(reference: torch.Tensor, shifted: torch.Tensor) -> OutputComparison:
    """top-1 agreement, KL(p(x) || p(T_d x)) in nats, and the change of p at the reference class."""
    log_p = torch.log_softmax(reference.double(), dim=1)
    log_q = torch.log_softmax(shifted.double(), dim=1)
    ref_class = reference.argmax(dim=1)
    prediction = shifted.argmax(dim=1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(dim=1).clamp_min(0.0)
    index = ref_class[:, None]
    prob_change = (log_q.gather(1, index).exp() - p.gather(1, index)).abs()[:, 0]
    return OutputComparison((prediction == ref_class).double(), kl, prob_change, prediction)


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
    """A layer's unshifted maps ``(N, C, h, w)`` with what every shift's comparison reuses:
    the per-position energy (sum of squares over channels) and the per-channel means."""

    maps: torch.Tensor
    energy: torch.Tensor
    pooled: torch.Tensor

    @classmethod
    def of(cls, maps: torch.Tensor) -> "Reference":
        return cls(maps, maps.pow(2).sum(dim=1).double(), maps.mean(dim=(-2, -1)).double())


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
    num = torch.zeros(ref.maps.shape[0], dtype=torch.float64, device=ref.maps.device)
    den = torch.zeros_like(num)
    for sy, ry in _pieces(h, ky, circular):
        for sx, rx in _pieces(w, kx, circular):
            num += _per_image_norm(shifted[..., sy, sx] - ref.maps[..., ry, rx]) ** 2
            den += ref.energy[:, ry, rx].sum(dim=(-2, -1))
    return _ratio(num.sqrt(), den.sqrt())


def pooled_invariance_error(reference: torch.Tensor | Reference, shifted: torch.Tensor) -> torch.Tensor:
    """Per image ``||g(T_d x) - g(x)|| / ||g(x)||`` with ``g`` the global average over positions."""
    g_ref = _reference(reference).pooled
    g_cur = shifted.mean(dim=(-2, -1)).double()
    return _ratio(_per_image_norm(g_cur - g_ref), _per_image_norm(g_ref))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), float("nan"))


Key = tuple[str, Shift | None, str]  # (layer, shift or None for whole-set metrics, metric)


BOOTSTRAP_REPLICATES = 100
BOOTSTRAP_SEED = 20190411
Z95 = 1.959963984540054

def bootstrap_weights(image_ids: torch.Tensor, replicates: int = BOOTSTRAP_REPLICATES) -> torch.Tensor:
    """Poisson(1) resampling weights ``(images, replicates)``, seeded by each image's index.

    The online (Poisson) bootstrap: each replicate counts image i ``w_i`` times. Seeding per image
    makes the intervals independent of batch size, worker count and process count.
    """
    rows = []
    for image in image_ids.tolist():
        generator = torch.Generator().manual_seed(BOOTSTRAP_SEED + int(image))
        rows.append(torch.poisson(torch.ones(replicates, dtype=torch.float64), generator=generator))
    return torch.stack(rows) if rows else torch.zeros(0, replicates, dtype=torch.float64)


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed on ``n`` images."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


class MetricState:
    """Additive state per (layer, shift, metric) key: float64 sum, sum of squares and count, plus
    per-replicate weighted sums and weights of a Poisson bootstrap (for mean intervals).

    The key list is fixed at creation, so the state is two tensors that merge by addition and
    cross processes with ``all_reduce``. ``weights`` (set per batch) are the batch's bootstrap
    weights, one row per image, in the order the values are added.
    """

    def __init__(self, keys: Iterable[Key], device: torch.device | str = "cpu") -> None:
        self.keys: list[Key] = list(dict.fromkeys(keys))
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.data = torch.zeros(len(self.keys), 3, dtype=torch.float64, device=device)
        self.boot = torch.zeros(len(self.keys), 2, BOOTSTRAP_REPLICATES, dtype=torch.float64, device=device)
        self.weights: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

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

    def flush(self) -> None:
        """Reduce the collected batch into the sums (no-op outside ``begin_batch``). A batch never
        flushed (an interrupted one) is dropped by the next ``begin_batch``."""
        if self.pending is not None:
            self._accumulate(self.pending, slice(None))
            self.pending = None

    def _accumulate(self, values: torch.Tensor, rows: slice) -> None:
        """Add ``values`` ``(keys, images)`` into sums, squares, counts and bootstrap sums, without
        a host sync."""
        defined = ~torch.isnan(values)
        values = torch.where(defined, values, 0.0)
        self.data[rows] += torch.stack([values.sum(1), (values * values).sum(1), defined.sum(1).double()], dim=1)
        if self.weights is not None:
            self.boot[rows, 0] += values @ self.weights
            self.boot[rows, 1] += defined.double() @ self.weights

    def merge(self, other: "MetricState") -> None:
        """Add another state with the same keys (another batch, shard or process)."""
        if other.keys != self.keys:
            raise ValueError("cannot merge metric states with different keys")
        self.data += other.data
        self.boot += other.boot

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors to sum across processes."""
        return self.data, self.boot

    def rows(self) -> list[dict]:
        """One dict per key that received values: mean ``value``, ``n``, ``std`` and a 95% interval.

        Proportions get a Wilson interval; other means the 2.5 and 97.5 percentiles of the
        bootstrap replicates' means.
        """
        out = []
        boot = self.boot.cpu()
        for i, (key, (total, squares, count)) in enumerate(zip(self.keys, self.data.cpu().tolist())):
            if count == 0:
                continue
            layer, shift, metric = key
            mean = total / count
            var = max(squares / count - mean * mean, 0.0) * count / (count - 1) if count > 1 else 0.0
            if is_proportion(metric):
                low, high = wilson_interval(mean, int(count))
            else:
                sums, weights = boot[i]
                means = (sums[weights > 0] / weights[weights > 0])
                low, high = (torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                             if len(means) else (mean, mean))
            out.append(
                {
                    "layer": layer,
                    "shift_x": None if shift is None else shift[0],
                    "shift_y": None if shift is None else shift[1],
                    "metric": metric,
                    "value": mean,
                    "n": int(count),
                    "std": var**0.5,
                    "ci_low": low,
                    "ci_high": high,
                }
            )
        return out
