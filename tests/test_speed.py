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


def _pass(shifts: list, margin=(1, 1), circular=False, seed=3, gather=True):
    """A reference, a pass of shifted maps stacked shift-major, and its comparison (whole shifts
    rolled by one gather, as on a GPU, or by block copies, as on the CPU)."""
    torch.manual_seed(seed)
    reference, shifted = torch.randn(4, 5, 9, 8), torch.randn(len(shifts) * 4, 5, 9, 8)
    reference[1] = 0  # a zero reference: NaN wherever a ratio divides by it
    ref = M.Reference.of(reference)
    groups = M.pass_geometry(9, 8, shifts, circular, margin, torch.float32, "cpu", gather)
    return ref, shifted, groups, M.compare_pass(ref, shifted, groups, spatial=True)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("circular", [False, True])
def test_a_fused_pass_gives_each_shifts_numbers(circular: bool, gather: bool) -> None:
    """Whole and fractional shifts, not consecutive, one not compared (None), all in one pass: every
    number equals the one-shift definitions (interior, error maps, in-place change, pooled error),
    the reference rolled by a gather or by block copies."""
    shifts = [(2, -1), (0.5, 0.0), None, (-3, 0), (1.5, -0.5), (0, 0)]
    ref, shifted, groups, out = _pass(shifts, circular=circular, gather=gather)
    assert [g.resampled for g in groups] == [False, True]
    assert [g.positions for g in groups] == [(0, 3, 5), (1, 4)]
    maps = shifted.unflatten(0, (len(shifts), -1))
    for group, errors, sums in zip(groups, out.errors, out.error_sums):
        for row, i in enumerate(group.positions):
            alone = M.compare_shift(ref, maps[i], shifts[i], circular, margin=(1, 1), axes=group.axes or None)
            torch.testing.assert_close(errors[row, :, 0], alone.error, rtol=1e-12, atol=0, equal_nan=True)
            torch.testing.assert_close(errors[row, :, 1], alone.interior, rtol=1e-12, atol=0, equal_nan=True)
            torch.testing.assert_close(sums[row], alone.error_sum, rtol=1e-12, atol=0, equal_nan=True)
            if not group.resampled:
                expected = M.equivariance_error(ref.maps, maps[i], shifts[i], circular)
                torch.testing.assert_close(errors[row, :, 0], expected, rtol=1e-6, atol=0, equal_nan=True)
    for i in range(len(shifts)):
        torch.testing.assert_close(out.inplace[i], M.inplace_change(ref.maps, maps[i]), rtol=1e-6, atol=0, equal_nan=True)
        torch.testing.assert_close(out.pooled[i], M.pooled_invariance_error(ref.maps, maps[i]), rtol=1e-12, atol=0,
                                   equal_nan=True)
    assert out.inplace[:, 1].isnan().all() and out.errors[0][:, 1].isnan().all()  # the zero reference


@pytest.mark.parametrize("circular", [False, True])
def test_a_shift_along_one_axis_is_resampled_by_a_1d_transform_with_the_2d_numbers(circular: bool) -> None:
    """Fractional shifts along x only (or y only) transform that axis alone (``fourier_axes``): the
    same errors as the 2-D transform, to float32 rounding; a layer with shifts along both uses 2-D."""
    for shifts, axes in (([(0.5, 0), (1.5, 0)], (-1,)), ([(0, 0.5), (0, -2.5)], (-2,))):
        assert M.fourier_axes(shifts) == axes
        ref, shifted, groups, out = _pass(shifts, circular=circular)
        assert groups[0].axes == axes
        both = M.pass_geometry(9, 8, shifts, circular, (1, 1), torch.float32, "cpu", axes=(-2, -1))
        two_d = M.compare_pass(ref, shifted, both, spatial=True)
        torch.testing.assert_close(out.errors[0], two_d.errors[0], rtol=1e-5, atol=1e-7, equal_nan=True)
        torch.testing.assert_close(out.error_sums[0], two_d.error_sums[0], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert M.fourier_axes([(0.5, 0), (0, 0.5)]) == (-2, -1)
    with pytest.raises(ValueError, match="along x only"):
        M.fourier_phases(8, 8, 0.5, 0.5, "cpu", axes=(-1,))


_VIEWS = {f"aten::{name}" for name in ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "slice",
                                         "select", "as_strided", "expand", "unsqueeze", "squeeze", "detach")}


def _operators(run) -> list[str]:
    """The ATen operators ``run()`` calls at the top level, views left out (each of the others
    launches at least one kernel on a GPU)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None and e.name not in _VIEWS]


def test_a_fused_pass_makes_the_same_operator_calls_whatever_its_shifts_and_no_host_sync() -> None:
    """One shift or five stacked in a pass, as a GPU compares them (one gather for the rolls): the
    same operator calls (the launches of a layer do not grow with the shifts of a pass), and none
    reads a value back to the host."""
    calls = []
    for shifts in ([(1, 0)], [(1, 0), (0, 2), (-1, -1), (3, 0), (0, 0)], [(0.5, 0)], [(0.5, 0), (1.5, 1.0), (0, 0.5)]):
        ref, shifted, groups, _ = _pass(shifts)
        calls.append(_operators(lambda: M.compare_pass(ref, shifted, groups)))
    assert calls[0] == calls[1] and calls[2] == calls[3]
    assert not {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero"} & set(sum(calls, []))
    assert len(calls[0]) < 40  # the unfused comparison made about 100 calls per layer and shift


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
    keys = ["layer", "shift_x", "shift_y", "metric"]
    eager = eager.sort_values(keys).reset_index(drop=True)
    for both in (False, True):  # the model compiled; and its comparisons too (--compile-metrics, compiled apart)
        notes: list[str] = []
        compiled = transinv.measure(_Tiny(), compile=True, compile_metrics=both, **dict(small, warn=notes.append)).rows
        assert not [note for note in notes if note.startswith("--compile-metrics")], notes
        compiled = compiled.sort_values(keys).reset_index(drop=True)
        pd.testing.assert_frame_equal(eager[keys + ["n"]], compiled[keys + ["n"]])
        assert ((eager["value"] - compiled["value"]).abs() <= 1e-5).all()


@pytest.mark.slow
def test_a_model_compiled_again_with_other_layers_hooked_runs_their_hooks(few_images: Path) -> None:
    """--compile on a model of a class compiled before in the process with other layers hooked (none:
    output metrics): torch's compiled code does not guard on hooks, so it is dropped and the new
    hooks run (the per-layer rows of eager), where the stale code left them out (a KeyError)."""
    small = dict(data=str(few_images), size=32, resize=48, shift="0..2", warn=lambda _: None)
    model = _Tiny()
    transinv.measure(model, compile=True, layers="none", **small)
    compiled = transinv.measure(model, compile=True, layers="default", **small).rows
    eager = transinv.measure(_Tiny(), layers="default", **small).rows
    assert (compiled["layer"] != "output").any()
    assert compiled[["layer", "metric", "n"]].equals(eager[["layer", "metric", "n"]])
    assert ((compiled["value"] - eager["value"]).abs() <= 1e-5).all()


def test_compiled_comparisons_give_way_to_error_maps(few_images: Path, tmp_path: Path) -> None:
    """--compile-metrics with --error-maps: one note, and the eager comparison's numbers (no compiling)."""
    notes: list[str] = []
    small = dict(data=str(few_images), size=32, resize=48, shift="0..2", weights="none", error_maps=str(tmp_path / "e.npz"))
    both = transinv.measure("resnet18", compile_metrics=True, warn=notes.append, **small).rows
    eager = transinv.measure("resnet18", warn=lambda _: None, **small).rows
    assert any(note.startswith("--compile-metrics: not with --error-maps") for note in notes)
    pd.testing.assert_frame_equal(both, eager)
