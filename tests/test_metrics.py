"""Metric formulas on hand-made tensors, and the additive state they accumulate into."""

from __future__ import annotations

import math

import torch

from transinv import metrics as M


def test_identical_outputs_agree_with_zero_divergence() -> None:
    logits = torch.randn(5, 7)
    out = M.compare_outputs(logits, logits.clone())
    assert out.agreement.tolist() == [1.0] * 5
    assert out.kl.abs().max() < 1e-12
    assert out.prob_change.abs().max() < 1e-12


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
    assert M.wilson_interval(1.0, 4)[1] == 1.0 and M.wilson_interval(0.0, 4)[0] == 0.0


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
