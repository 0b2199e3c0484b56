"""Gates: `transinv check` bounds and the pytest helpers, on constructed models whose answers are
known (exactly invariant, exactly equivariant at aligned shifts only, not equivariant at all)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import transinv
from transinv import cli
from transinv.errors import UserError
from transinv.gates import check, parse_bound, parse_bounds
from transinv.testing import assert_equivariant, assert_shift_invariant

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(weights="none", size=32, resize=40, num_images=2, mode="circular")
FLAGS = ["--weights", "none", "--size", "32", "--resize", "40", "--num-images", "2", "--mode", "circular"]


@pytest.fixture(scope="module")
def strided() -> pd.DataFrame:
    """Circular shifts of a network with one stride-2 convolution: exact at even shifts only."""
    return transinv.measure("example:strided_circular", shift="0..2", layers="default", progress=False, **FAST).rows


# -- parsing ---------------------------------------------------------------------------------------

def test_bounds_parse_metric_layer_and_shift() -> None:
    b = parse_bound("equivariance_error@layer3:4=1e-4", "max")
    assert (b.metric, b.layer, b.shift, b.limit, b.side) == ("equivariance_error", "layer3", 4.0, 1e-4, "max")
    assert parse_bound("kl_divergence:2,-1=0.5", "max").shift == (2.0, -1.0)
    assert parse_bound("top1_agreement=0.99", "min").layer == "output"
    assert parse_bound("equivariance_error=1e-3", "max").layer is None  # every layer
    assert [b.side for b in parse_bounds({"kl_divergence": 1e-6}, ["top1_agreement=1"])] == ["max", "min"]


@pytest.mark.parametrize("text, needle", [
    ("kl_divergence", "write METRIC[@LAYER][:SHIFT]=VALUE"),
    ("kl_divergence=small", "'small' is not a number"),
    ("kl_divergence=nan", "finite"),
    ("kl_divergenc=1", "unknown metric 'kl_divergenc' (did you mean kl_divergence, "),
    ("kl_divergence@layer3=1", "measured at the output: drop @layer3"),
    ("equivariance_error@output=1", "measured at layers"),
    ("equivariance_error@=1", "@ needs a layer name"),
    ("consistency:4=0.5", "covers the whole shift set: drop :4"),
    ("top1_agreement=1.5", "lies in [0, 1]"),
    ("kl_divergence:1,2,3=1", "one number"),
])
def test_bad_bounds_are_one_line_errors(text: str, needle: str) -> None:
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_bound(text, "max")


def test_no_bounds_is_an_error() -> None:
    with pytest.raises(UserError, match="at least one bound"):
        parse_bounds(None, None)


# -- evaluation against known answers --------------------------------------------------------------

def test_even_shifts_pass_odd_shifts_fail_with_the_worst_row(strided: pd.DataFrame) -> None:
    exact, broken, everywhere = check(parse_bounds(["kl_divergence:2=1e-9", "kl_divergence:1=1e-9",
                                                    "kl_divergence=1e-9"]), strided)
    assert exact.passed and exact.worst["value"] < 1e-9
    assert not broken.passed and not everywhere.passed
    assert everywhere.rows == 2 and everywhere.worst["shift_x"] == 1  # shift 0, the reference, is not counted
    line = everywhere.line()
    assert line.startswith("FAIL kl_divergence at output, shift 1,0: ") and "> max 1e-09" in line
    assert re.search(r"\[95% CI [0-9.e-]+, (?:[0-9.e-]+|inf)\], n=2", line) and "worst of 2 rows" in line


def test_a_layer_bound_covers_every_aligned_shift(strided: pd.DataFrame) -> None:
    (stride2,) = check(parse_bounds(["equivariance_error@2=1e-5"]), strided)  # the stride-2 convolution
    assert stride2.passed and stride2.worst["shift_x"] == 2 and stride2.rows == 1
    (every,) = check(parse_bounds(["equivariance_error=1e-5"]), strided)
    assert every.passed and every.rows > 2


@pytest.mark.parametrize("bound, needle", [
    ("equivariance_error@layer9=1", "no layer 'layer9' in this run; it measured: 0, 1, 2, 3"),
    ("accuracy=0.5", "no accuracy rows (it needs labelled images); it has: "),
    ("kl_divergence:7=1", "no kl_divergence rows at this shift; the run has shifts 0,0, 1,0, 2,0"),
])
def test_bounds_the_run_cannot_check_are_errors_not_passes(strided: pd.DataFrame, bound: str, needle: str) -> None:
    with pytest.raises(UserError, match=re.escape(needle)):
        check(parse_bounds([bound]), strided)


def test_a_layer_with_no_aligned_shift_is_an_error() -> None:
    rows = transinv.measure("example:strided_circular", shift="0..1", layers="2", progress=False, **FAST).rows
    with pytest.raises(UserError, match="only at shift 0"):
        check(parse_bounds(["equivariance_error@2=1"]), rows)


# -- the CLI's exit codes --------------------------------------------------------------------------

def _check(*args: str):
    return CliRunner().invoke(cli.app, ["check", "example:strided_circular", *FLAGS, "--shift", "0..2", *args])


def test_check_exits_0_when_every_bound_holds() -> None:
    result = _check("--max", "kl_divergence:2=1e-9", "--min", "top1_agreement:2=1", "--max", "equivariance_error@2=1e-5")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("ok  ") == 3 and "all 3 bounds hold" in result.stderr


def test_check_exits_1_with_one_line_per_failure() -> None:
    result = _check("--max", "kl_divergence=1e-9", "--max", "kl_divergence:2=1e-9")
    assert result.exit_code == 1, result.output
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and "shift 1,0" in failures[0] and "1 of 2 bounds failed" in result.stderr


@pytest.mark.parametrize("args, needle", [
    (["--max", "kl_divergenc=1"], "did you mean kl_divergence, "),
    (["--max", "equivariance_error@layer9=1"], "no layer 'layer9'"),
    ([], "at least one bound"),
])
def test_check_exits_2_on_bad_bounds(args: list[str], needle: str) -> None:
    result = _check(*args)
    assert result.exit_code == 2 and needle in result.stderr and result.stdout == ""


# -- the pytest helpers ----------------------------------------------------------------------------

def test_assert_shift_invariant_passes_fails_and_rejects_bad_bounds() -> None:
    result = assert_shift_invariant("example:circular_gap", shift="0..3", **FAST)
    assert set(result.rows["layer"]) == {"output"}  # output only by default
    with pytest.raises(AssertionError) as failed:  # odd shifts miss the stride-2 sampling grid
        assert_shift_invariant("example:strided_circular", shift="0..3", **FAST)
    assert re.fullmatch(r"1 of 2 bounds failed:\nFAIL kl_divergence at output, shift [13],0: .* > max 1e-09 "
                        r"\(worst of 3 rows\)(; .*)?", str(failed.value))
    with pytest.raises(UserError, match="did you mean prob_change"):
        assert_shift_invariant("example:circular_gap", at_most={"prob_chnge": 1e-3}, shift="0..1", **FAST)
    assert_shift_invariant("example:strided_circular", max_kl=None, min_agreement=0.0, shift="0..3", **FAST)


def test_assert_equivariant_passes_fails_and_rejects_bad_layers() -> None:
    assert_equivariant("example:circular_gap", "2", tol=1e-5, shift="0..2", **FAST)
    with pytest.raises(AssertionError, match=r"FAIL equivariance_error at 2, shift \d,0: .* > max 1e-05"):
        assert_equivariant("example:circular_gap", "2", tol=1e-5, shift="0..2", **{**FAST, "mode": "crop"})
    with pytest.raises(UserError, match="no layer 'conv9'"):
        assert_equivariant("example:circular_gap", "conv9", layers="default", shift="0..2", **FAST)


def test_the_readme_example_runs_as_pasted(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- pytest-example:start -->", 1)[1].split("<!-- pytest-example:end -->", 1)[0]
    code = code.split("```python", 1)[1].rsplit("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "README example", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert len(tests) >= 2
    for test in tests:
        test()
