"""Every metric end to end against an independent computation written from the README's definitions.

A small hand-built network with non-trivial answers (a zero-padded stride-2 convolution, random
weights, a position-dependent head) is measured by ``transinv.measure`` on photographs cut to
exactly the canvas size (so decoding changes nothing but the normalisation). The test builds every
shifted view itself from the pixels, runs the same network in float64, and computes each metric per
image in plain numpy; the rows must match to 1e-6. Nothing of transinv's views, hooks, metric code
or statistics is used on the reference side.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import transinv
from transinv.engine import metrics as M
from transinv.engine.data import imagenet_classes
from transinv.metric_registry import fixed_at_reference, is_proportion

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
SIZE, SHIFTS, PAIRS, SEED = 16, list(range(-2, 4)), (-2, 2), 3
FILL = 0.7  # pad mode's fill, normalised units (0, the mean, would equal the zero padding: exact, see README)
TOL = 1e-6
STRIDE = 2  # of every measured layer: the first convolution has stride 2
# padding margins (feature pixels): output row 0 of the stride-2 convolution reads input row -1 (padding),
# row 1 reads rows 1..3 (none), so "0" and the ReLU "1" have 1; the 3x3 convolution "2" after them has 2
MARGINS = {"0": 1, "1": 1, "2": 2}
Z = 1.959963984540054  # the 97.5% quantile of the standard normal


def _network() -> nn.Sequential:
    torch.manual_seed(11)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),  # "0": zero padding, stride 2
        nn.ReLU(),  # "1"
        nn.Conv2d(6, 8, 3, padding=1),  # "2"
        nn.AdaptiveAvgPool2d(2),  # a 2x2 grid of cells: the head sees position
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        net[5].weight.mul_(4.0)  # wide logit margins: float32 and float64 agree on every top-1 class
    return net.eval()


def _shift_pairs(direction: str) -> list[tuple[int, int]]:
    return [{"x": (v, 0), "y": (0, v), "diagonal": (v, v)}[direction] for v in SHIFTS]


def _canvas_side(mode: str) -> int:
    reach = max(max(abs(v) for v in SHIFTS), *map(abs, PAIRS))
    return SIZE + 2 * reach if mode == "crop" else SIZE


def _view(canvas: np.ndarray, d: tuple[int, int], mode: str) -> np.ndarray:
    """The view at shift d from the definition: view(i, j) = content(i - dy, j - dx)."""
    dx, dy = d
    side = canvas.shape[-1]
    margin = (side - SIZE) // 2
    out = np.full((3, SIZE, SIZE), FILL if mode == "pad" else np.nan)
    for i in range(SIZE):
        for j in range(SIZE):
            si, sj = i - dy, j - dx
            if mode == "crop":
                out[:, i, j] = canvas[:, margin + si, margin + sj]
            elif mode == "circular":
                out[:, i, j] = canvas[:, si % SIZE, sj % SIZE]
            elif 0 <= si < SIZE and 0 <= sj < SIZE:  # pad: the exposed strip keeps the fill
                out[:, i, j] = canvas[:, si, sj]
    return out


def _forward(net64: nn.Sequential, views: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Maps of layers 0, 1, 2 (each (N, C, h, w)) and the logits of a float64 copy of the network."""
    x = torch.tensor(np.stack(views))
    maps = []
    with torch.no_grad():
        for index, module in enumerate(net64):
            x = module(x)
            if index <= 2:
                maps.append(x.numpy().copy())
    return maps, x.numpy()


def _equivariance(f0: np.ndarray, fd: np.ndarray, k: tuple[int, int], circular: bool, margin: int = 0) -> float:
    """||f(T_d x) - T_k f(x)|| / ||f(x)|| over the positions defined in both maps (all, circularly);
    with a margin, only positions at least that far from the border in both maps (the interior)."""
    kx, ky = k
    _, h, w = f0.shape
    num = den = 0.0
    for i in range(h):
        for j in range(w):
            ri, rj = i - ky, j - kx
            if circular:
                ri, rj = ri % h, rj % w
            elif not (0 <= ri < h and 0 <= rj < w):
                continue
            if min(i, j, ri, rj) < margin or max(i, ri) > h - 1 - margin or max(j, rj) > w - 1 - margin:
                continue
            num += float(np.sum((fd[:, i, j] - f0[:, ri, rj]) ** 2))
            den += float(np.sum(f0[:, ri, rj] ** 2))
    return math.sqrt(num / den)


def _band_limited_shift(f: np.ndarray, kx: float, ky: float) -> np.ndarray:
    """The README's resampling: every frequency's phase moved by (kx, ky) on the full 2-D spectrum,
    the Nyquist frequency of an even axis scaled by cos(pi k) instead (so the result stays real)."""

    def factors(n: int, k: float) -> np.ndarray:
        freq = np.fft.fftfreq(n, 1.0 / n)
        out = np.exp(-2j * np.pi * freq * k / n)
        if n % 2 == 0:
            out[n // 2] = np.cos(np.pi * k)
        return out

    _, h, w = f.shape
    spectrum = np.fft.fft2(f) * np.outer(factors(h, ky), factors(w, kx))[None]
    return np.real(np.fft.ifft2(spectrum))


def _resampled(f0: np.ndarray, fd: np.ndarray, k: tuple[float, float], circular: bool) -> float:
    """``equivariance_error`` against the band-limited shift of f(x) by the fractional k; not circular,
    on the positions whose own and source positions are at least one pixel inside the map."""
    moved = _band_limited_shift(f0, *k)
    _, h, w = f0.shape
    num = den = 0.0
    for i in range(h):
        for j in range(w):
            ri, rj = i - k[1], j - k[0]
            if not circular and not (1 <= min(i, ri) and max(i, ri) <= h - 2 and 1 <= min(j, rj) and max(j, rj) <= w - 2):
                continue
            num += float(np.sum((fd[:, i, j] - moved[:, i, j]) ** 2))
            den += float(np.sum(moved[:, i, j] ** 2))
    return math.sqrt(num / den)


def _pooled(f0: np.ndarray, fd: np.ndarray) -> float:
    g0, gd = f0.mean(axis=(1, 2)), fd.mean(axis=(1, 2))
    return float(np.linalg.norm(gd - g0) / np.linalg.norm(g0))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _wilson(p: float, n: int) -> tuple[float, float]:
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _pair_offsets(image: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The documented consistency draw: four integers uniform in PAIRS, from a generator seeded
    with seed * 1000003 + the image's position in the run."""
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + image)
    dx1, dy1, dx2, dy2 = torch.randint(PAIRS[0], PAIRS[1] + 1, (4,), generator=generator).tolist()
    return (dx1, dy1), (dx2, dy2)


def _crops(mode: str, photos: Path) -> list[Image.Image]:
    """Square crops of the test photographs at exactly the canvas size, so resizing is a no-op."""
    side = _canvas_side(mode)
    crops = []
    for k, source in enumerate(sorted(photos.glob("*.JPEG"))):
        image = Image.open(source).convert("RGB")
        left, top = (image.width - side) // 2 + k, (image.height - side) // 2  # + k: never the same crop
        crops.append(image.crop((left, top, left + side, top + side)))
    return crops


def _normalised(crop: Image.Image) -> np.ndarray:
    """A canvas as transinv defines it: pixels / 255, minus the mean, over the std; (3, S, S)."""
    pixels = np.asarray(crop, dtype=np.float64) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def reference(canvases: list[np.ndarray], labels: list[int], mode: str, direction: str) -> dict[tuple, list[float]]:
    """Per-image values of every metric, keyed like the rows: (layer, shift or None, metric)."""
    net64 = _network().double()
    shifts = _shift_pairs(direction)
    values: dict[tuple, list[float]] = {}

    def add(key: tuple, value: float) -> None:
        values.setdefault(key, []).append(value)

    for image, (canvas, label) in enumerate(zip(canvases, labels)):
        maps, logits = _forward(net64, [_view(canvas, d, mode) for d in shifts])
        classes = logits.argmax(axis=1)
        top2 = np.sort(logits, axis=1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0] > 1e-4).all(), "the construction must not hinge on float rounding"
        zero = shifts.index((0, 0))
        p0 = _softmax(logits[zero])
        c0 = classes[zero]
        for s, d in enumerate(shifts):
            for layer, f in zip("012", maps):
                if d[0] % STRIDE == 0 and d[1] % STRIDE == 0:
                    k = (d[0] // STRIDE, d[1] // STRIDE)
                    add((layer, d, M.EQUIVARIANCE_ERROR), _equivariance(f[zero], f[s], k, mode == "circular"))
                    add((layer, d, M.EQUIVARIANCE_ERROR_INTERIOR),
                        _equivariance(f[zero], f[s], k, mode == "circular", MARGINS[layer]))
                else:
                    k = (d[0] / STRIDE, d[1] / STRIDE)
                    add((layer, d, M.EQUIVARIANCE_ERROR_RESAMPLED), _resampled(f[zero], f[s], k, mode == "circular"))
                add((layer, d, M.INPLACE_CHANGE), float(np.linalg.norm(f[s] - f[zero]) / np.linalg.norm(f[zero])))
                add((layer, d, M.POOLED_INVARIANCE_ERROR), _pooled(f[zero], f[s]))
            pd_ = _softmax(logits[s])
            add(("output", d, M.TOP1_AGREEMENT), float(classes[s] == c0))
            add(("output", d, M.KL_DIVERGENCE), float(np.sum(p0 * (np.log(p0) - np.log(pd_)))))
            add(("output", d, M.PROB_CHANGE), float(abs(pd_[c0] - p0[c0])))
            if label >= 0:
                add(("output", d, M.ACCURACY), float(classes[s] == label))
                split = M.TOP1_AGREEMENT_IF_CORRECT if c0 == label else M.TOP1_AGREEMENT_IF_WRONG
                add(("output", d, split), float(classes[s] == c0))
        add(("output", None, M.WORST_CASE_AGREEMENT), float(all(classes == c0)))
        if label >= 0:
            add(("output", None, M.WORST_CASE_ACCURACY), float(all(classes == label)))
        order = [shifts.index(d) for d in sorted(shifts, key=sum)]
        path = [classes[i] for i in order]
        add(("output", None, M.JAGGEDNESS), float(np.mean([a != b for a, b in zip(path, path[1:])])))
        probs = [_softmax(logits[i]) for i in order]  # each step's probability of the previous step's class
        add(("output", None, M.PATH_PROB_CHANGE),
            float(np.mean([abs(q[c] - p[c]) for p, q, c in zip(probs, probs[1:], path)])))
        first, second = _pair_offsets(image)
        _, pair_logits = _forward(net64, [_view(canvas, first, mode), _view(canvas, second, mode)])
        consistent = float(pair_logits[0].argmax() == pair_logits[1].argmax())
        add(("output", None, M.CONSISTENCY), consistent)
        if label >= 0:
            add(("output", None, M.CONSISTENCY_IF_CORRECT if c0 == label else M.CONSISTENCY_IF_WRONG), consistent)
    return values


@pytest.mark.parametrize("mode, direction", [("crop", "x"), ("circular", "diagonal"), ("pad", "y")])
def test_every_metric_matches_an_independent_numpy_computation(
    mode: str, direction: str, imagenet_sample: Path, tmp_path: Path
) -> None:
    crops = _crops(mode, imagenet_sample)
    net64 = _network().double()
    unshifted = [int(_forward(net64, [_view(_normalised(c), (0, 0), mode)])[1].argmax()) for c in crops]
    # labels: right at shift 0 for images 0-2, wrong for image 3 and two others, none for two
    labels = [*unshifted[:3], (unshifted[3] + 1) % 10, -1, 7, 8, -1][: len(crops)]
    wnids = imagenet_classes()[0]
    names = [f"{wnids[y]}_{k}.png" if y >= 0 else f"photo_{k}.png" for k, y in enumerate(labels)]
    for crop, name in zip(crops, names):
        crop.save(tmp_path / name)  # PNG: the pixels read back unchanged
    order = sorted(range(len(names)), key=names.__getitem__)  # transinv's image order: file order
    result = transinv.measure(
        _network(), data=str(tmp_path), mode=mode, direction=direction, shift=f"{SHIFTS[0]}..{SHIFTS[-1]}",
        consistency=f"{PAIRS[0]}..{PAIRS[1]}", layers="0,1,2", size=SIZE, resize=_canvas_side(mode),
        mean=MEAN, std=STD, fill=FILL, batch_size=3, seed=SEED, by_correctness=True,
    )
    expected = reference([_normalised(crops[k]) for k in order], [labels[k] for k in order], mode, direction)
    rows = result.rows
    got = {
        (r.layer, None if pd.isna(r.shift_x) else (int(r.shift_x), int(r.shift_y)), r.metric): r
        for r in rows.itertuples()
    }
    assert set(got) == set(expected)
    assert set(rows["metric"]) == {M.EQUIVARIANCE_ERROR, M.POOLED_INVARIANCE_ERROR, M.EQUIVARIANCE_ERROR_INTERIOR,
                                   M.EQUIVARIANCE_ERROR_RESAMPLED, M.INPLACE_CHANGE, M.TOP1_AGREEMENT, M.KL_DIVERGENCE,
                                   M.PROB_CHANGE, M.ACCURACY, M.WORST_CASE_AGREEMENT, M.WORST_CASE_ACCURACY,
                                   M.JAGGEDNESS, M.PATH_PROB_CHANGE, M.CONSISTENCY, M.TOP1_AGREEMENT_IF_CORRECT, M.TOP1_AGREEMENT_IF_WRONG,
                                   M.CONSISTENCY_IF_CORRECT, M.CONSISTENCY_IF_WRONG}
    for key, per_image in expected.items():
        row, values = got[key], np.array(per_image)
        assert row.n == len(values), key
        assert row.value == pytest.approx(values.mean(), abs=TOL), key
        assert row.std == pytest.approx(values.std(ddof=1) if len(values) > 1 else 0.0, abs=TOL), key
        if key[1] == (0, 0) and fixed_at_reference(key[2]):  # fixed by definition: no interval
            assert np.isnan(row.ci_low) and np.isnan(row.ci_high), key
        elif is_proportion(key[2]):
            assert (row.ci_low, row.ci_high) == pytest.approx(_wilson(values.mean(), len(values)), abs=1e-12), key
        else:
            assert row.ci_low <= row.value + 1e-12 and row.value <= row.ci_high + 1e-12, key
        if key[0] != "output":
            d = key[1]
            assert row.stride == STRIDE and row.aligned == (d[0] % STRIDE == 0 and d[1] % STRIDE == 0), key

    def values(metric: str) -> pd.Series:
        at_zero = ((rows["shift_x"] == 0) & (rows["shift_y"] == 0)).fillna(False)
        return rows.loc[(rows["metric"] == metric) & ~at_zero, "value"]

    # non-trivial answers: every moved error and divergence is 100 times the tolerance or more, and the
    # top-1 figures are neither all 0 nor all 1
    for metric in (M.EQUIVARIANCE_ERROR, M.POOLED_INVARIANCE_ERROR, M.EQUIVARIANCE_ERROR_RESAMPLED, M.INPLACE_CHANGE,
                   M.KL_DIVERGENCE, M.PROB_CHANGE):
        assert (values(metric) > 100 * TOL).all(), metric
    for metric in (M.TOP1_AGREEMENT, M.ACCURACY, M.JAGGEDNESS, M.WORST_CASE_AGREEMENT, M.CONSISTENCY):
        assert values(metric).between(0, 1, inclusive="neither").any(), metric
    assert values(M.ACCURACY).nunique() > 1
