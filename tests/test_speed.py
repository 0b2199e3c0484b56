"""What makes a run faster changes no number: stacked shifts, per-batch reference terms, --compile."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import transinv
from transinv.engine import metrics as M


def test_stacked_shifts_give_each_shifts_pooled_error_exactly() -> None:
    torch.manual_seed(0)
    reference = torch.randn(5, 7, 6, 6)
    reference[2] = 0  # a zero reference: NaN, not counted, stacked or not
    shifted = [torch.randn(5, 7, 6, 6) for _ in range(3)]
    ref = M.Reference.of(reference)
    stacked = M.pooled_invariance_error(ref, torch.cat(shifted))
    assert stacked.shape == (3, 5)
    for row, alone in zip(stacked, shifted):
        expected = M.pooled_invariance_error(reference, alone)
        assert torch.equal(row.isnan(), expected.isnan()) and expected[2].isnan()
        assert torch.equal(row.nan_to_num(), expected.nan_to_num())  # bit for bit


def test_pooled_error_matches_its_definition() -> None:
    torch.manual_seed(1)
    reference, shifted = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    g, h = reference.mean(dim=(2, 3)).double(), shifted.mean(dim=(2, 3)).double()
    expected = (h - g).norm(dim=1) / g.norm(dim=1)
    torch.testing.assert_close(M.pooled_invariance_error(reference, shifted), expected, rtol=1e-12, atol=0)


def test_reference_logits_computed_once_give_the_same_outputs() -> None:
    torch.manual_seed(2)
    reference, shifted = torch.randn(6, 10), torch.randn(6, 10)
    once = M.compare_outputs(M.ReferenceLogits.of(reference), shifted)
    each = M.compare_outputs(reference, shifted)
    for a, b in zip((once.agreement, once.kl, once.prob_change, once.prediction),
                    (each.agreement, each.kl, each.prob_change, each.prediction)):
        assert torch.equal(a, b)
    p, q = reference.double().softmax(1), shifted.double().softmax(1)
    torch.testing.assert_close(each.kl, (p * (p.log() - q.log())).sum(1), rtol=1e-10, atol=1e-12)


def test_equivariance_error_without_overlap_is_nan() -> None:
    maps = torch.randn(2, 3, 4, 4)
    assert M.equivariance_error(maps, maps, (4, 0), circular=False).isnan().all()


class _Tiny(nn.Module):
    """A small CNN whose forward pass torch.compile handles without graph breaks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.slow
def test_compile_gives_the_numbers_of_eager(few_images: Path) -> None:
    """torch.compile (inductor, a C++ compiler on the CPU) fuses ops: numbers agree to rounding."""
    small = dict(data=str(few_images), size=32, resize=48, shift="0..2", layers="default", warn=lambda _: None)
    eager = transinv.measure(_Tiny(), **small).rows
    compiled = transinv.measure(_Tiny(), compile=True, **small).rows
    keys = ["layer", "shift_x", "shift_y", "metric"]
    eager, compiled = eager.sort_values(keys).reset_index(drop=True), compiled.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(eager[keys + ["n"]], compiled[keys + ["n"]])
    assert ((eager["value"] - compiled["value"]).abs() <= 1e-5).all()
