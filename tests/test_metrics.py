"""Metric formulas on hand-made tensors, and the additive state they accumulate into."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from transinv.engine import metrics as M


def test_identical_outputs_agree_with_zero_divergence() -> None:
    logits = torch.randn(5, 7)
    out = M.compare_outputs(logits, logits.clone())
    assert out.agreement.tolist() == [1.0] * 5
    assert out.kl.abs().max() < 1e-12
    assert out.prob_change.abs().max() < 1e-12


def test_stacked_shifts_give_each_shifts_output_metrics_bit_for_bit() -> None:
    """Several shifts stacked ahead of the images (how a batch's passes are compared) give what each
    shift gives alone, to the bit."""
    torch.manual_seed(0)
    reference, shifted = torch.randn(6, 10), torch.randn(4, 6, 10)
    stacked = M.compare_outputs(M.ReferenceLogits.of(reference), shifted)
    for s, one in enumerate(shifted):
        alone = M.compare_outputs(reference, one)
        for field in ("agreement", "kl", "prob_change", "prediction"):
            assert torch.equal(getattr(stacked, field)[s], getattr(alone, field)), field


def test_output_metrics_by_hand() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.6, 0.1]], dtype=torch.float64)
    out = M.compare_outputs(p.log(), q.log())
    expected_kl = sum(a * math.log(a / b) for a, b in zip(p[0].tolist(), q[0].tolist()))
    assert math.isclose(out.kl.item(), expected_kl, rel_tol=1e-12)
    assert math.isclose(out.prob_change.item(), 0.4, rel_tol=1e-12)  # |0.3 - 0.7| at class 0
    assert out.agreement.item() == 0.0 and out.prediction.item() == 1


def test_equivariance_error_of_exact_shift_is_zero_and_of_wrong_shift_is_not() -> None:
    f = torch.randn(2, 3, 8, 8)
    rolled = torch.roll(f, (1, 2), (-2, -1))  # k = (kx=2, ky=1)
    assert M.equivariance_error(f, rolled, (2, 1), circular=True).max() == 0
    assert M.equivariance_error(f, rolled, (1, 1), circular=True).min() > 0.5
    # crop-like: only the overlap is compared, so the wrapped-in strip does not count
    assert M.equivariance_error(f, rolled, (2, 1), circular=False).max() == 0


def test_equivariance_error_is_relative_norm_on_the_overlap() -> None:
    ref = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    cur = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    cur[..., 0, 1:] = 3.0  # overlap for k=(1, 0) is columns 1..3 of cur vs 0..2 of ref
    err = M.equivariance_error(ref, cur, (1, 0), circular=False)
    assert math.isclose(err.item(), math.sqrt(3 * 4) / math.sqrt(12), rel_tol=1e-12)


def test_pooled_invariance_error_by_hand() -> None:
    ref = torch.zeros(1, 2, 2, 2)
    ref[0, 0] = 1.0  # g = (1, 0)
    cur = ref.clone()
    cur[0, 1] = 0.5  # g = (1, 0.5)
    assert math.isclose(M.pooled_invariance_error(ref, cur).item(), 0.5, rel_tol=1e-12)


def test_zero_reference_is_not_counted() -> None:
    state = M.MetricState([("l", (1, 0), M.POOLED_INVARIANCE_ERROR)])
    values = M.pooled_invariance_error(torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2))
    state.add(("l", (1, 0), M.POOLED_INVARIANCE_ERROR), values)
    assert state.rows() == []


def test_state_merges_by_addition_into_means_of_per_image_values() -> None:
    key = (M.OUTPUT_LAYER, (1, 0), M.KL_DIVERGENCE)
    whole, a, b = M.MetricState([key]), M.MetricState([key]), M.MetricState([key])
    values = torch.tensor([0.1, 0.2, 0.6, 1.0, float("nan")], dtype=torch.float64)
    whole.add(key, values)
    a.add(key, values[:2])
    b.add(key, values[2:])
    a.merge(b)
    assert torch.allclose(a.data, whole.data)
    (row,) = whole.rows()
    assert row["n"] == 4 and math.isclose(row["value"], 0.475, rel_tol=1e-12)
    assert math.isclose(row["std"], torch.tensor([0.1, 0.2, 0.6, 1.0], dtype=torch.float64).std().item(), rel_tol=1e-9)


def test_wilson_interval_known_values() -> None:
    low, high = M.wilson_interval(0.5, 100)
    assert math.isclose(low, 0.40383, abs_tol=1e-5) and math.isclose(high, 0.59617, abs_tol=1e-5)
    for n in (4, 7, 12, 1000):  # exactly 0 and 1 at the ends (n = 7 and 12 left ~3e-17 of rounding)
        assert M.wilson_interval(1.0, n)[1] == 1.0 and M.wilson_interval(0.0, n)[0] == 0.0


def test_bootstrap_interval_brackets_the_mean_and_is_seeded_per_image() -> None:
    key = ("l", (1, 0), M.KL_DIVERGENCE)
    values = torch.linspace(0, 1, 50, dtype=torch.float64)
    whole, halves = M.MetricState([key]), M.MetricState([key])
    whole.weights = M.bootstrap_weights(torch.arange(50))
    whole.add(key, values)
    for part in (slice(0, 20), slice(20, 50)):
        piece = M.MetricState([key])
        piece.weights = M.bootstrap_weights(torch.arange(50)[part])
        piece.add(key, values[part])
        halves.merge(piece)
    (row,) = whole.rows()
    assert row["ci_low"] < row["value"] < row["ci_high"]
    assert 0.3 < row["ci_low"] and row["ci_high"] < 0.7  # about mean +- 2 * 0.29 / sqrt(50)
    (split,) = halves.rows()
    assert all(math.isclose(split[k], row[k], rel_tol=1e-12) for k in ("value", "std", "ci_low", "ci_high"))
    assert torch.allclose(whole.replicate_means(), halves.replicate_means(), rtol=1e-12, atol=0)


def _lowbias32(x: int) -> int:
    """The reference hash in plain Python integers (no overflow to avoid)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_weight_hash_matches_plain_integer_arithmetic() -> None:
    inputs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1] + torch.randint(0, 2**32, (200,)).tolist()
    assert M._hash32(torch.tensor(inputs, dtype=torch.int64)).tolist() == [_lowbias32(x) for x in inputs]


def test_bootstrap_weights_are_poisson_one_and_belong_to_the_image() -> None:
    weights = M.bootstrap_weights(torch.arange(2000))  # 2000 images x 1000 replicates
    assert weights.shape == (2000, M.BOOTSTRAP_REPLICATES)
    assert abs(weights.mean().item() - 1) < 0.003 and abs(weights.var().item() - 1) < 0.01
    for k in range(4):  # P(w = k) = e^-1 / k!
        assert abs((weights == k).double().mean().item() - math.exp(-1) / math.factorial(k)) < 0.002
    standardised = (weights - 1).T  # replicates x images
    neighbours = (standardised[:, 1:] * standardised[:, :-1]).mean().item()
    consecutive = (standardised[1:] * standardised[:-1]).mean().item()
    assert abs(neighbours) < 0.01 and abs(consecutive) < 0.01  # images and replicates uncorrelated
    assert torch.equal(M.bootstrap_weights(torch.tensor([1999, 7])), weights[[1999, 7]])


def _filled(values: dict, image_ids: torch.Tensor) -> M.MetricState:
    """A state fed ``{key: per-image values}`` as one batch of the given images."""
    state = M.MetricState(values)
    state.begin_batch(M.bootstrap_weights(image_ids))
    for key, v in values.items():
        state.add(key, v)
    state.flush()
    return state


def test_studentized_interval_equals_a_direct_bootstrap_t() -> None:
    values = torch.distributions.Exponential(2.0).sample((40,)).double()
    (row,) = _filled({("l", (3, 0), M.KL_DIVERGENCE): values}, torch.arange(100, 140)).rows()
    x = values.numpy()
    w = M.bootstrap_weights(torch.arange(100, 140)).numpy().T  # replicates x images
    t = []
    for weights in w:  # one replicate at a time, from the definition
        m = (weights * x).sum() / weights.sum()
        s = math.sqrt((weights * (x - m) ** 2).sum() / (weights.sum() - 1))
        t.append((m - x.mean()) / (s / math.sqrt(len(x))))
    se = x.std(ddof=1) / math.sqrt(len(x))
    q_low, q_high = np.quantile(t, [0.025, 0.975])
    assert math.isclose(row["ci_low"], x.mean() - q_high * se, rel_tol=1e-9)
    assert math.isclose(row["ci_high"], x.mean() - q_low * se, rel_tol=1e-9)


def test_studentized_interval_covers_a_skewed_mean_at_n_32() -> None:
    """Nominal 95% at n = 32 on lognormal(sigma = 1) values, 4000 simulated data sets through
    MetricState: coverage in [0.92, 0.97]. The percentile interval of the same replicates covers
    about 0.88, so the test tells the two apart."""
    n, groups, per_group, truth = 32, 40, 100, math.exp(0.5)
    generator = torch.Generator().manual_seed(11)
    covered = covered_by_percentile = 0
    for group in range(groups):  # each group: its own 32 images, 100 data sets sharing their weights
        sets = torch.randn(per_group, n, generator=generator, dtype=torch.float64).exp()
        state = _filled({("l", (k, 0), M.KL_DIVERGENCE): sets[k] for k in range(per_group)},
                        torch.arange(group * n, (group + 1) * n))
        rows = state.rows()
        covered += sum(r["ci_low"] <= truth <= r["ci_high"] for r in rows)
        low, high = torch.nanquantile(state.replicate_means(), torch.tensor([0.025, 0.975], dtype=torch.float64), dim=1)
        covered_by_percentile += int(((low <= truth) & (truth <= high)).sum())
    print(f"coverage {covered / (groups * per_group):.4f}, percentile {covered_by_percentile / (groups * per_group):.4f}")
    assert 0.92 <= covered / (groups * per_group) <= 0.97
    assert covered_by_percentile / (groups * per_group) < 0.90


def test_reference_shift_has_no_interval_but_accuracy_does() -> None:
    keys = {(M.OUTPUT_LAYER, (0, 0), M.TOP1_AGREEMENT): torch.ones(20, dtype=torch.float64),
            (M.OUTPUT_LAYER, (0, 0), M.KL_DIVERGENCE): torch.zeros(20, dtype=torch.float64),
            (M.OUTPUT_LAYER, (0, 0), M.ACCURACY): (torch.arange(20) % 4 == 0).double(),
            (M.OUTPUT_LAYER, (1, 0), M.TOP1_AGREEMENT): torch.ones(20, dtype=torch.float64)}
    rows = {r["metric"] if r["shift_x"] == 0 else "moved": r for r in _filled(keys, torch.arange(20)).rows()}
    for metric in (M.TOP1_AGREEMENT, M.KL_DIVERGENCE):
        assert math.isnan(rows[metric]["ci_low"]) and math.isnan(rows[metric]["ci_high"])
    assert (rows[M.ACCURACY]["ci_low"], rows[M.ACCURACY]["ci_high"]) == M.wilson_interval(0.25, 20)
    assert rows["moved"]["ci_low"] < 0.9 and rows["moved"]["ci_high"] == 1.0  # 20 of 20 agree: Wilson


def test_skewness_from_sums_equals_the_direct_formula() -> None:
    x = torch.distributions.Gamma(0.5, 1.0).sample((300,)).double()
    m = x.mean()
    direct = ((x - m) ** 3).mean() / ((x - m) ** 2).mean() ** 1.5
    from_sums = M.skewness(m[None], (x**2).sum()[None], (x**3).sum()[None], torch.tensor([300.0], dtype=torch.float64))
    assert math.isclose(from_sums.item(), direct.item(), rel_tol=1e-9)


def test_interval_warnings_flag_few_images_and_skewed_values() -> None:
    skewed = torch.zeros(60, dtype=torch.float64)
    skewed[:2] = 5.0  # skewness about 5.3: n = 60 < 25 * 5.3^2
    few = torch.full((60,), float("nan"), dtype=torch.float64)
    few[:8] = torch.rand(8, dtype=torch.float64)
    keys = {("l", (1, 0), M.KL_DIVERGENCE): few,
            ("l", (2, 0), M.KL_DIVERGENCE): skewed,
            ("l", (3, 0), M.KL_DIVERGENCE): torch.linspace(0, 1, 60, dtype=torch.float64),
            ("l", (4, 0), M.TOP1_AGREEMENT): (torch.arange(60) < 2).double()}  # skewed too, but Wilson
    warnings = {r["shift_x"]: r["ci_warning"] for r in _filled(keys, torch.arange(60)).rows()}
    assert warnings == {1: "n<10", 2: "skewed", 3: "", 4: ""}


@pytest.mark.parametrize(("dof", "exact"), [(4, 2.776445), (9, 2.262157), (31, 2.039513), (99, 1.984217)])
def test_t_quantile_matches_the_table(dof: int, exact: float) -> None:
    assert abs(M._t_quantile(M.Z95, dof) - exact) < 2e-3


def test_expanded_percentile_interval_is_the_widened_percentile() -> None:
    replicates = torch.randn(2, 1000, dtype=torch.float64)
    replicates[1, :10] = float("nan")
    low, high = M.expanded_percentile_interval(replicates, torch.tensor([32.0, 1.0], dtype=torch.float64))
    a = NormalDist().cdf(-math.sqrt(32 / 31) * 2.039513)  # about 0.019
    expected = np.quantile(replicates[0].numpy(), [a, 1 - a])
    assert abs(low[0].item() - expected[0]) < 1e-3 and abs(high[0].item() - expected[1]) < 1e-3
    assert math.isnan(low[1]) and math.isnan(high[1])  # n < 2: no interval


def test_one_non_zero_image_leaves_the_upper_side_open() -> None:
    """31 zeros and one 1/16: replicates that miss the one image have no spread and a lower mean
    (t = -inf), so the bootstrap-t cannot bound the mean from above; clipped to jaggedness' [0, 1]."""
    sparse = torch.zeros(32, dtype=torch.float64)
    sparse[5] = 1 / 16
    (row,) = _filled({(M.OUTPUT_LAYER, None, M.JAGGEDNESS): sparse}, torch.arange(32)).rows()
    assert (row["ci_low"], row["ci_high"]) == (0.0, 1.0) and row["ci_warning"] == "skewed"
