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


def test_channels_last_and_bf16_run_and_stay_close(few_images: Path) -> None:
    base = transinv.measure("resnet18", data=str(few_images), layers="none", **SMALL).rows
    cl = transinv.measure("resnet18", data=str(few_images), layers="none", channels_last=True, **SMALL).rows
    _assert_same(base, cl, tol=1e-4)
    bf16 = transinv.measure("resnet18", data=str(few_images), layers="none", precision="bf16", **SMALL)
    assert bf16.settings["precision"] == "bf16" and not bf16.rows.empty


def test_models_and_variants_measured_side_by_side(few_images: Path) -> None:
    result = transinv.measure(
        ["resnet18", "example:circular_gap"], data=str(few_images), variants="base,blurpool", layers="none", **SMALL
    )
    series = set(zip(result.rows["model"], result.rows["variant"]))
    assert series == {("resnet18", "base"), ("resnet18", "blurpool"),
                      ("example:circular_gap", "base"), ("example:circular_gap", "blurpool")}
    alone = transinv.measure("resnet18", data=str(few_images), layers="none", **SMALL).rows
    _assert_same(result.rows[(result.rows["model"] == "resnet18") & (result.rows["variant"] == "base")], alone)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_two_processes_equal_one(few_images: Path, tmp_path: Path) -> None:
    """7 images over 2 ranks (4 + 3): no image lost or counted twice, same numbers to 1e-6."""
    extra = few_images.parent / "seven"
    extra.mkdir(exist_ok=True)
    for f in few_images.iterdir():
        shutil.copy(f, extra / f.name)
    shutil.copy(next(few_images.iterdir()), extra / "n01440764_copy.JPEG")
    args = ["measure", "resnet18", "--weights", "none", "--data", str(extra), "--size", "32", "--resize", "48",
            "--shift", "0..3", "--batch-size", "3", "-f", "csv"]
    single = subprocess.run([sys.executable, "-m", "transinv", *args], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = str(Path(sys.executable).parent / "torchrun")
    multi = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", "29517", "-m", "transinv", *args],
        capture_output=True, text=True, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr
    a, b = pd.read_csv(io.StringIO(single.stdout)), pd.read_csv(io.StringIO(multi.stdout))
    assert a[a["metric"] == "top1_agreement"]["n"].eq(7).all()
    _assert_same(a, b)
