"""--compile-metrics: the layer comparisons in torch.compile'd kernels give the eager numbers.

Compiling takes seconds per kernel on the CPU (a C++ compiler, as CI has), so these are slow tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import transinv
from transinv.engine import metrics as M

pytestmark = pytest.mark.slow
SMALL = dict(size=32, resize=48, weights="none", seed=0)
KEYS = ["layer", "shift_x", "shift_y", "metric"]


def compiled(model: str, **kwargs: object) -> pd.DataFrame:
    """The rows of a run with --compile-metrics, checked to have compiled (no fallback note, and the
    settings say so)."""
    notes: list[str] = []
    result = transinv.measure(model, compile_metrics=True, warn=notes.append, **kwargs)
    assert not [note for note in notes if note.startswith("--compile-metrics")], notes
    assert result.settings["metrics_compiled"] is True
    return result.rows


def _both(model: str, **kwargs: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of an eager and a compiled-comparison run, in the same order."""
    eager = transinv.measure(model, warn=lambda _: None, **SMALL, **kwargs).rows.sort_values(KEYS).reset_index(drop=True)
    fused = compiled(model, **SMALL, **kwargs).sort_values(KEYS).reset_index(drop=True)
    pd.testing.assert_frame_equal(eager[KEYS + ["n"]], fused[KEYS + ["n"]])
    return eager, fused


@pytest.mark.parametrize("circular", [False, True])
def test_a_compiled_pass_gives_the_eager_numbers(circular: bool) -> None:
    """Whole and fractional shifts, not consecutive, one not compared, a zero reference (NaN), with
    and without interior margins: the compiled pass's numbers are the eager pass's, to float32 rounding."""
    torch.manual_seed(3)
    shifts = [(2, -1), (0.5, 0.0), None, (-3, 0), (1.5, -0.5), (0, 0)]
    maps, shifted = torch.randn(4, 5, 9, 8), torch.randn(len(shifts) * 4, 5, 9, 8)
    maps[1] = 0
    shifted[-4:] = maps  # the last shift, (0, 0), sees the reference's own maps
    for margin in ((1, 1), None):
        groups = M.pass_geometry(9, 8, shifts, circular, margin, torch.float32, "cpu", gather=True)
        eager = M.compare_pass(M.Reference.of(maps), shifted, groups)
        fused = M.compare_pass(M.Reference.of(maps, fused=True), shifted, groups, fused=True)
        for a, b in zip((*eager.errors, eager.inplace, eager.pooled), (*fused.errors, fused.inplace, fused.pooled)):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, equal_nan=True)
        assert fused.inplace[:, 1].isnan().all() and fused.errors[0][:, 1].isnan().all()  # the zero reference
        assert (fused.errors[0][-1].nan_to_num() == 0).all() and (fused.pooled[-1].nan_to_num() == 0).all()  # bit for bit
    with pytest.raises(ValueError, match="no error maps"):
        M.compare_pass(M.Reference.of(maps, fused=True), shifted, groups, spatial=True, fused=True)


def test_compiled_comparisons_keep_the_exact_answers(few_images: Path) -> None:
    """A circular, stride-1 network: every comparison exactly 0 compiled too (same terms, same kernels)."""
    eager, fused = _both("example:circular_gap", data=str(few_images), shift="-2..2", direction="grid",
                         mode="circular", layers="0,1,2,3")
    layers = fused[fused["layer"] != M.OUTPUT_LAYER]
    assert set(layers["metric"]) >= {M.EQUIVARIANCE_ERROR, M.POOLED_INVARIANCE_ERROR, M.INPLACE_CHANGE}
    exact = layers[layers["metric"].isin([M.EQUIVARIANCE_ERROR, M.EQUIVARIANCE_ERROR_INTERIOR])]
    assert (exact["value"] <= 1e-6).all()
    pooled = layers[layers["metric"] == M.POOLED_INVARIANCE_ERROR]
    assert (pooled["value"] <= 1e-6).all()
    zero = layers[(layers["shift_x"] == 0) & (layers["shift_y"] == 0)]
    assert len(zero) and (zero["value"] == 0).all()  # shift 0: bit for bit


@pytest.mark.parametrize("mode", ["crop", "circular"])
def test_compiled_comparisons_give_the_eager_numbers(few_images: Path, mode: str) -> None:
    """resnet18 at whole and (after its strides) fractional feature shifts, interior margins
    included: every value within float32 rounding of the eager comparison's."""
    eager, fused = _both("resnet18", data=str(few_images), shift="0..3", mode=mode, layers="default")
    assert set(fused["metric"]) >= {M.EQUIVARIANCE_ERROR, M.EQUIVARIANCE_ERROR_RESAMPLED, M.INPLACE_CHANGE,
                                    M.POOLED_INVARIANCE_ERROR}
    if mode == "crop":
        assert M.EQUIVARIANCE_ERROR_INTERIOR in set(fused["metric"])
    assert eager["value"].isna().equals(fused["value"].isna())
    pd.testing.assert_series_equal(eager["value"], fused["value"], rtol=1e-5, atol=1e-7)
    zero = fused[(fused["shift_x"] == 0) & (fused["layer"] != M.OUTPUT_LAYER)]
    assert (zero["value"].dropna() == 0).all()


def test_compiled_comparisons_of_fewer_metrics_are_those_of_all(few_images: Path) -> None:
    """--layer-metrics with --compile-metrics: the rows kept are those of the full compiled run."""
    common = dict(data=str(few_images), shift="0..2", layers="default", **SMALL)
    full = compiled("resnet18", **common).set_index(KEYS)["value"]
    some = compiled("resnet18", layer_metrics="equivariance_error,inplace_change", **common)
    some = some[some["layer"] != M.OUTPUT_LAYER].set_index(KEYS)["value"]
    assert len(some) and set(some.index.get_level_values("metric")) == {M.EQUIVARIANCE_ERROR, M.INPLACE_CHANGE}
    pd.testing.assert_series_equal(some, full.loc[some.index], rtol=1e-6, atol=1e-9)


def test_without_a_compiler_the_comparisons_run_eagerly_with_a_note(few_images: Path, tmp_path: Path) -> None:
    """No working C++ compiler (and an empty inductor cache): one note on stderr, the eager numbers,
    and a result file that says the comparisons were not compiled."""
    args = ["measure", "resnet18", "--weights", "none", "--data", str(few_images), "--size", "32",
            "--resize", "48", "--shift", "0..2", "-f", "json"]
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "transinv"]
    fused = subprocess.run([*run, *args, "--compile-metrics"], capture_output=True, text=True, env=env, timeout=600)
    eager = subprocess.run([*run, *args], capture_output=True, text=True, timeout=600)
    assert fused.returncode == 0, fused.stderr
    assert "--compile-metrics: torch.compile failed" in fused.stderr and "Traceback" not in fused.stderr
    fused_doc, eager_doc = json.loads(fused.stdout), json.loads(eager.stdout)
    assert fused_doc["rows"] == eager_doc["rows"]
    assert fused_doc["settings"]["compile_metrics"] is True and fused_doc["settings"]["metrics_compiled"] is False
