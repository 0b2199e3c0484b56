"""Nothing that changes speed changes a number: batching, shift grouping, workers, processes."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import transinv

SMALL = dict(weights="none", size=32, resize=48, shift="0..4", seed=0)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame, tol: float = 1e-6) -> None:
    keys = ["model", "variant", "layer", "shift_x", "shift_y", "metric"]
    a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns=["value", "std"]), b.drop(columns=["value", "std"]))
    assert ((a["value"] - b["value"]).abs() <= tol).all()


def test_shift_grouping_and_workers_leave_results_identical(few_images: Path) -> None:
    one_shift_per_pass = transinv.measure("resnet18", data=str(few_images), batch_size=6, **SMALL).rows
    # batch_size 24 with 6 images: four shifts share each forward pass
    grouped = transinv.measure("resnet18", data=str(few_images), batch_size=24, **SMALL).rows
    # batches of 4 then 2 images (the last pass stacks shifts), decoded in two worker processes
    workers = transinv.measure("resnet18", data=str(few_images), batch_size=4, workers=2, **SMALL).rows
    _assert_same(one_shift_per_pass, grouped)
    _assert_same(one_shift_per_pass, workers)


def test_prefetch_changes_no_number(few_images: Path) -> None:
    """Decoding ahead in a thread (the default) gives exactly the rows of decoding in line."""
    inline = transinv.measure("resnet18", data=str(few_images), batch_size=4, prefetch=False, **SMALL).rows
    ahead = transinv.measure("resnet18", data=str(few_images), batch_size=4, **SMALL).rows
    pd.testing.assert_frame_equal(inline, ahead)


def test_channels_last_changes_no_number(few_images: Path) -> None:
    base = transinv.measure("resnet18", data=str(few_images), layers="none", **SMALL).rows
    cl = transinv.measure("resnet18", data=str(few_images), layers="none", channels_last=True, **SMALL).rows
    _assert_same(base, cl, tol=1e-4)


# |reduced - fp32| <= RELATIVE * |fp32| + ABSOLUTE for every layer error, KL divergence and probability
# change (README, "Speed, memory, GPU and torchrun"); measured here at most 0.6% (bf16) and 0.07% (fp16)
# relative, or 1e-6 absolute on values near 0
PRECISION_BOUNDS = {"bf16": (0.02, 1e-5), "fp16": (0.002, 1e-6)}
CONTINUOUS = ["equivariance_error", "pooled_invariance_error", "kl_divergence", "prob_change"]


KEYS = ["layer", "shift_x", "shift_y", "metric"]


@pytest.fixture(scope="module")
def fp32_rows(few_images: Path) -> pd.DataFrame:
    return transinv.measure("resnet18", data=str(few_images), **SMALL).rows.set_index(KEYS)


@pytest.mark.parametrize("precision", list(PRECISION_BOUNDS))
def test_reduced_precision_stays_within_the_stated_bound_of_fp32(
    few_images: Path, fp32_rows: pd.DataFrame, precision: str
) -> None:
    base = fp32_rows
    reduced = transinv.measure("resnet18", data=str(few_images), precision=precision, **SMALL)
    assert reduced.settings["precision"] == precision
    rows = reduced.rows.set_index(KEYS)
    assert rows.index.equals(base.index) and (rows["n"] == base["n"]).all()
    continuous = base.index.get_level_values("metric").isin(CONTINUOUS)
    relative, absolute = PRECISION_BOUNDS[precision]
    a, b = base.loc[continuous, "value"], rows.loc[continuous, "value"]
    moved = a[a.index.get_level_values("shift_x") != 0]
    assert len(a) > 50 and (moved > 0).all() and moved.median() > 1e-3  # values the bound can tell apart
    excess = (b - a).abs() - (relative * a.abs() + absolute)
    assert (excess <= 0).all(), excess[excess > 0]


def test_models_and_variants_measured_side_by_side(few_images: Path) -> None:
    result = transinv.measure(
        ["resnet18", "example:circular_gap"], data=str(few_images), variants="base,blurpool", layers="none", **SMALL
    )
    series = set(zip(result.rows["model"], result.rows["variant"]))
    assert series == {("resnet18", "base"), ("resnet18", "blurpool"),
                      ("example:circular_gap", "base"), ("example:circular_gap", "blurpool")}
    alone = transinv.measure("resnet18", data=str(few_images), layers="none", **SMALL).rows
    _assert_same(result.rows[(result.rows["model"] == "resnet18") & (result.rows["variant"] == "base")], alone)


@pytest.fixture
def seven_images(few_images: Path) -> Path:
    """The six photos and a copy of the first: 7 images, two of them identical."""
    extra = few_images.parent / "seven"
    extra.mkdir(exist_ok=True)
    for f in few_images.iterdir():
        shutil.copy(f, extra / f.name)
    shutil.copy(next(few_images.iterdir()), extra / "n01440764_copy.JPEG")
    return extra


def _one_and_two_processes(args: list[str], port: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The CSV rows of ``transinv ARGS`` in one process and under torchrun with two."""
    single = subprocess.run([sys.executable, "-m", "transinv", *args], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(  # torchrun, as the module every torch install has
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "transinv", *args],
        capture_output=True, text=True, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr
    return pd.read_csv(io.StringIO(single.stdout)), pd.read_csv(io.StringIO(multi.stdout))


def test_torchrun_two_processes_equal_one(seven_images: Path) -> None:
    """7 images over 2 ranks (4 + 3): no image lost or counted twice, same numbers to 1e-6."""
    a, b = _one_and_two_processes(
        ["measure", "resnet18", "--weights", "none", "--data", str(seven_images), "--size", "32", "--resize", "48",
         "--shift", "0..3", "--batch-size", "3", "-f", "csv"], 29517)
    assert a[a["metric"] == "top1_agreement"]["n"].eq(7).all()
    _assert_same(a, b)


def test_torchrun_retrieves_among_every_process_images(seven_images: Path) -> None:
    """nn_agreement searches the whole set: an exactly invariant encoder retrieves every image but
    the two identical ones (a tie fails), 5/7, in batches of 2 on one process or split over two."""
    a, b = _one_and_two_processes(
        ["measure", "example:circular_encoder", "--data", str(seven_images), "--size", "32", "--resize", "48",
         "--mode", "circular", "--shift", "0..2", "--layers", "none", "--batch-size", "2", "-f", "csv"], 29518)
    nearest = a[a["metric"] == "nn_agreement"]
    assert len(nearest) == 3 and (nearest["value"] == 5 / 7).all() and nearest["n"].eq(7).all()
    _assert_same(nearest, b[b["metric"] == "nn_agreement"])
    rounding = ["ci_low", "ci_high"]  # of embedding changes ~1e-7, rounding apart between batchings
    _assert_same(a.drop(columns=rounding), b.drop(columns=rounding))
