"""compare_results and summarize on real (small) runs saved to CSV and read back, with known answers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import transinv
from transinv.compare import KEYS, compare_results, summarize
from transinv.errors import UserError

WORST = "worst_case_accuracy"


def _saved(rows: pd.DataFrame) -> pd.DataFrame:
    """What reading the run's CSV gives back (shifts become float with NaN, as in a real file)."""
    return pd.read_csv(io.StringIO(rows.to_csv(index=False)))


@pytest.fixture(scope="module")
def runs(imagenet_sample: Path) -> dict[str, pd.DataFrame]:
    """resnet18 base and blurpool, an identical second resnet18 run, and vgg11: each as its CSV reads."""
    settings = dict(weights="none", data=str(imagenet_sample), num_images=2, size=32, resize=40, shift="0..2")
    layers = "conv1,maxpool,layer1,layer2,layer3,layer4"  # in both variants (BlurPool adds layers of its own)
    both = transinv.measure("resnet18", variants="base,blurpool", layers=layers, **settings).rows
    return {
        "base": _saved(both[both["variant"] == "base"]),
        "blurpool": _saved(both[both["variant"] == "blurpool"]),
        "again": _saved(transinv.measure("resnet18", layers=layers, **settings).rows),
        "vgg11": _saved(transinv.measure("vgg11", layers="default", **settings).rows),
    }


def test_identical_runs_differ_nowhere(runs: dict[str, pd.DataFrame]) -> None:
    diff = compare_results(runs["base"], runs["again"])
    assert list(diff.columns) == KEYS + ["value_a", "value_b", "difference", "relative", "n_a", "n_b", "status"]
    assert len(diff) == len(runs["base"])
    assert (diff["status"] == "both").all()
    assert (diff["difference"] == 0).all()
    assert (diff["n_a"] == diff["n_b"]).all()
    assert list(diff["layer"]) == list(runs["base"]["layer"])  # run a's order is kept


def test_worst_case_rows_with_empty_shifts_are_matched(runs: dict[str, pd.DataFrame]) -> None:
    base = runs["base"]
    assert base.loc[base["metric"] == WORST, ["shift_x", "shift_y"]].isna().all(axis=None)
    in_memory = base.astype({"shift_x": "Int64", "shift_y": "Int64"})  # as Result.rows holds them
    diff = compare_results(in_memory, runs["blurpool"])
    worst = diff[diff["metric"] == WORST]
    assert len(worst) == 1 and worst["status"].iloc[0] == "both"
    assert worst[["shift_x", "shift_y"]].isna().all(axis=None)
    assert worst["value_b"].iloc[0] == runs["blurpool"].loc[runs["blurpool"]["metric"] == WORST, "value"].iloc[0]


@pytest.mark.parametrize("removed", ["a row", WORST])
def test_a_removed_row_is_only_in_a(runs: dict[str, pd.DataFrame], removed: str) -> None:
    base = runs["base"]
    drop = base.index[base["metric"] == WORST][0] if removed == WORST else base.index[7]
    diff = compare_results(base, base.drop(index=drop))
    only = diff[diff["status"] != "both"]
    assert list(only["status"]) == ["only a"]
    assert only["value_b"].isna().all() and only["n_b"].isna().all()
    assert only["layer"].iloc[0] == base.loc[drop, "layer"] and only["metric"].iloc[0] == base.loc[drop, "metric"]
    assert list(compare_results(base.drop(index=drop), base)["status"]).count("only b") == 1


def test_doubled_values_differ_by_a(runs: dict[str, pd.DataFrame]) -> None:
    base = runs["base"]
    doubled = base.assign(value=base["value"] * 2)
    diff = compare_results(base, doubled, "before", "after")
    assert (diff["difference"] == diff["value_before"]).all()
    nonzero = diff["value_before"] != 0
    assert nonzero.any() and (diff.loc[nonzero, "relative"] == 1).all()
    assert diff.loc[~nonzero, "relative"].isna().all()


def test_summary_of_a_known_change(runs: dict[str, pd.DataFrame]) -> None:
    base = runs["base"]
    summary = summarize(compare_results(base, base.assign(value=base["value"] * 2), "before", "after"))
    assert list(summary.columns[:5]) == ["model", "variant", "mode", "metric", "layer"]
    assert len(summary) == len(base.groupby(["metric", "layer"]))
    pooled = base[base["metric"] == "pooled_invariance_error"]
    for layer, group in pooled.groupby("layer"):
        row = summary[(summary["metric"] == "pooled_invariance_error") & (summary["layer"] == layer)].iloc[0]
        largest = group.loc[group["value"].abs().idxmax()]
        assert row["mean_before"] == pytest.approx(group["value"].mean())
        assert row["mean_after"] == pytest.approx(2 * group["value"].mean())
        assert row["mean_difference"] == pytest.approx(group["value"].mean())
        assert row["max_abs_difference"] == pytest.approx(abs(largest["value"]))
        assert (row["shift_x"], row["shift_y"]) == (largest["shift_x"], largest["shift_y"])
        assert (row["matched"], row["unmatched"]) == (len(group), 0)
    layers = summary.loc[summary["metric"] == "pooled_invariance_error", "layer"]
    assert list(layers) == list(pooled["layer"].unique())  # forward order
    worst = summary[summary["metric"] == WORST].iloc[0]
    assert pd.isna(worst["shift_x"]) and worst["matched"] == 1


def test_two_models_side_by_side(runs: dict[str, pd.DataFrame]) -> None:
    diff = compare_results(runs["base"], runs["vgg11"])
    assert (diff["model"] == "resnet18 vs vgg11").all()
    output = diff[diff["layer"] == "output"]
    assert (output["status"] == "both").all()
    assert len(output) == (runs["base"]["layer"] == "output").sum() == (runs["vgg11"]["layer"] == "output").sum()
    assert set(diff.loc[diff["status"] == "only a", "layer"]) == set(runs["base"]["layer"]) - {"output"}
    assert set(diff.loc[diff["status"] == "only b", "layer"]) == set(runs["vgg11"]["layer"]) - {"output"}
    summary = summarize(diff)
    assert (summary.loc[summary["layer"] == "output", "matched"] > 0).all()
    assert summary.loc[summary["layer"] != "output", "mean_a"].isna().all()


def test_two_variants_side_by_side(runs: dict[str, pd.DataFrame]) -> None:
    diff = compare_results(runs["base"], runs["blurpool"])
    assert (diff["variant"] == "base vs blurpool").all() and (diff["model"] == "resnet18").all()
    assert (diff["status"] == "both").all() and len(diff) == len(runs["base"])
    assert np.allclose(diff["difference"], diff["value_b"] - diff["value_a"])


def test_old_files_without_variant_are_base(runs: dict[str, pd.DataFrame]) -> None:
    old = runs["base"].drop(columns=["variant"])
    diff = compare_results(old, runs["again"])
    assert (diff["variant"] == "base").all() and (diff["status"] == "both").all()


def test_bad_input_is_explained(runs: dict[str, pd.DataFrame]) -> None:
    base = runs["base"]
    with pytest.raises(UserError, match="labels"):
        compare_results(base, base, "x", "x")
    with pytest.raises(UserError, match="no column value"):
        compare_results(base.drop(columns=["value"]), base)
    with pytest.raises(UserError, match="more than one row"):
        compare_results(pd.concat([base, base.assign(weights="DEFAULT")]), base)
    with pytest.raises(UserError, match="compare_results"):
        summarize(base)
