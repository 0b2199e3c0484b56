"""compare_runs, compare_within and summarize on real (small) runs and on constructed per-image
values, with known answers and with paired intervals recomputed from the per-image differences."""

from __future__ import annotations

import io
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import transinv
from transinv.engine import metrics as M
from transinv.cli import app
from transinv.reports.compare import KEYS, compare_results, compare_runs, compare_within, summarize
from transinv.errors import UserError
from transinv.examples import EXAMPLES
from transinv.reports.render import render
from transinv.reports.results import Result, make_rows, read_result

WORST = "worst_case_agreement"
# layers every variant has (BlurPool adds blur layers of its own to the default selection)
LAYERS = "conv1,maxpool,layer1,layer2,layer3,layer4"
SETTINGS = dict(weights="none", size=32, resize=40, shift="0..2", layers=LAYERS, warn=lambda _: None)


def _saved(rows: pd.DataFrame) -> pd.DataFrame:
    """What reading the run's CSV gives back (shifts become float with NaN, as in a real file)."""
    return pd.read_csv(io.StringIO(rows.to_csv(index=False)))


@pytest.fixture(scope="module")
def runs() -> dict[str, Result]:
    """On the built-in images: resnet18 base and blurpool in one run, each alone, and vgg11."""
    return {
        "both": transinv.measure("resnet18", variants="base,blurpool", **SETTINGS),
        "base": transinv.measure("resnet18", **SETTINGS),
        "blurpool": transinv.measure("resnet18", antialias="blurpool", **SETTINGS),
        "vgg11": transinv.measure("vgg11", **{**SETTINGS, "layers": "default"}),
    }


def _reference(frame: pd.DataFrame) -> pd.Series:
    return (frame["shift_x"] == 0) & (frame["shift_y"] == 0)


def test_identical_runs_differ_nowhere_and_their_intervals_are_points(runs: dict[str, Result]) -> None:
    again = transinv.measure("resnet18", **SETTINGS)
    diff = compare_results(runs["base"], again)
    assert list(diff.columns) == KEYS + ["value_a", "value_b", "difference", "diff_low", "diff_high", "relative",
                                         "n_a", "n_b", "status"]
    assert len(diff) == len(runs["base"].rows) and (diff["status"] == "both").all()
    assert (diff["difference"] == 0).all() and (diff["n_a"] == diff["n_b"]).all()
    moved = ~_reference(diff).fillna(False)
    assert (diff.loc[moved, ["diff_low", "diff_high"]] == 0).all(axis=None)
    assert diff.loc[~moved, ["diff_low", "diff_high"]].isna().all(axis=None)  # shift 0: no interval
    assert list(diff["layer"]) == list(runs["base"].rows["layer"])  # run a's order is kept


def test_worst_case_rows_with_empty_shifts_are_matched(runs: dict[str, Result]) -> None:
    base, blurpool = runs["base"].rows, _saved(runs["blurpool"].rows)
    assert base.loc[base["metric"] == WORST, ["shift_x", "shift_y"]].isna().all(axis=None)
    diff = compare_results(base, blurpool)
    worst = diff[diff["metric"] == WORST]
    assert len(worst) == 1 and worst["status"].iloc[0] == "both"
    assert worst[["shift_x", "shift_y"]].isna().all(axis=None)
    assert worst["value_b"].iloc[0] == blurpool.loc[blurpool["metric"] == WORST, "value"].iloc[0]


@pytest.mark.parametrize("removed", ["a row", WORST])
def test_a_removed_row_is_only_in_a(runs: dict[str, Result], removed: str) -> None:
    base = _saved(runs["base"].rows)
    drop = base.index[base["metric"] == WORST][0] if removed == WORST else base.index[7]
    diff = compare_results(base, base.drop(index=drop))
    only = diff[diff["status"] != "both"]
    assert list(only["status"]) == ["only a"]
    assert only["value_b"].isna().all() and only["n_b"].isna().all()
    assert only["layer"].iloc[0] == base.loc[drop, "layer"] and only["metric"].iloc[0] == base.loc[drop, "metric"]
    assert list(compare_results(base.drop(index=drop), base)["status"]).count("only b") == 1


def test_doubled_values_differ_by_a(runs: dict[str, Result]) -> None:
    base = _saved(runs["base"].rows)
    doubled = base.assign(value=base["value"] * 2)
    diff = compare_results(base, doubled, "before", "after")
    assert (diff["difference"] == diff["value_before"]).all()
    nonzero = diff["value_before"] != 0
    assert nonzero.any() and (diff.loc[nonzero, "relative"] == 1).all()
    assert diff.loc[~nonzero, "relative"].isna().all()
    assert diff[["diff_low", "diff_high"]].isna().all(axis=None)  # tables carry no replicates


def test_summary_of_a_known_change_leaves_out_shift_0(runs: dict[str, Result]) -> None:
    base = _saved(runs["base"].rows)
    summary = summarize(compare_results(base, base.assign(value=base["value"] * 2), "before", "after"))
    assert list(summary.columns[:5]) == ["model", "variant", "mode", "metric", "layer"]
    pooled = base[base["metric"] == "pooled_invariance_error"]
    for layer, group in pooled.groupby("layer"):
        row = summary[(summary["metric"] == "pooled_invariance_error") & (summary["layer"] == layer)].iloc[0]
        moved = group[~_reference(group)]
        largest = moved.loc[moved["value"].abs().idxmax()]
        assert row["mean_before"] == pytest.approx(moved["value"].mean())
        assert row["mean_after"] == pytest.approx(2 * moved["value"].mean())
        assert row["mean_difference"] == pytest.approx(moved["value"].mean())
        assert row["max_abs_difference"] == pytest.approx(abs(largest["value"]))
        assert (row["shift_x"], row["shift_y"]) == (largest["shift_x"], largest["shift_y"])
        assert (row["matched"], row["unmatched"]) == (len(group) - 1, 0)
    layers = summary.loc[summary["metric"] == "pooled_invariance_error", "layer"]
    assert list(layers) == list(pooled["layer"].unique())  # forward order
    equivariance = base[(base["metric"] == "equivariance_error") & ~_reference(base)]
    shown = summary.loc[summary["metric"] == "equivariance_error", "layer"]
    assert list(shown) == list(equivariance["layer"].unique())  # layers aligned only at shift 0: no row
    worst = summary[summary["metric"] == WORST].iloc[0]
    assert pd.isna(worst["shift_x"]) and worst["matched"] == 1


def test_two_models_side_by_side(runs: dict[str, Result]) -> None:
    base, vgg = _saved(runs["base"].rows), _saved(runs["vgg11"].rows)
    diff = compare_results(base, vgg)
    assert (diff["model"] == "resnet18 vs vgg11").all()
    output = diff[diff["layer"] == "output"]
    assert (output["status"] == "both").all()
    assert len(output) == (base["layer"] == "output").sum() == (vgg["layer"] == "output").sum()
    assert set(diff.loc[diff["status"] == "only a", "layer"]) == set(base["layer"]) - {"output"}
    assert set(diff.loc[diff["status"] == "only b", "layer"]) == set(vgg["layer"]) - {"output"}
    summary = summarize(diff)
    assert (summary.loc[summary["layer"] == "output", "matched"] > 0).all()
    assert summary.loc[summary["layer"] != "output", "mean_a"].isna().all()


def test_two_variants_side_by_side(runs: dict[str, Result]) -> None:
    diff = compare_results(_saved(runs["base"].rows), _saved(runs["blurpool"].rows))
    assert (diff["variant"] == "base vs blurpool").all() and (diff["model"] == "resnet18").all()
    assert (diff["status"] == "both").all() and len(diff) == len(runs["base"].rows)


def test_old_files_without_variant_are_base(runs: dict[str, Result]) -> None:
    old = _saved(runs["base"].rows).drop(columns=["variant"])
    diff = compare_results(old, runs["base"].rows)
    assert (diff["variant"] == "base").all() and (diff["status"] == "both").all()


def test_bad_input_is_explained(runs: dict[str, Result]) -> None:
    base = runs["base"].rows
    with pytest.raises(UserError, match="labels"):
        compare_results(base, base, "x", "x")
    with pytest.raises(UserError, match="no column value"):
        compare_results(base.drop(columns=["value"]), base)
    with pytest.raises(UserError, match="more than one row"):
        compare_results(pd.concat([base, base.assign(weights="DEFAULT")]), base)
    with pytest.raises(UserError, match="compare_results"):
        summarize(base)
    with pytest.raises(UserError, match="nothing to compare"):
        compare_within(runs["base"])


# -- paired intervals against a direct computation from per-image values -----------------------


def _constructed(values: dict[tuple, torch.Tensor], variant: str) -> Result:
    """A run of model 'm' whose per-image values are given, measured on images 0..n-1."""
    state = M.MetricState(values)
    state.begin_batch(M.bootstrap_weights(torch.arange(len(next(iter(values.values()))))))
    for key, v in values.items():
        state.add(key, v)
    state.flush()
    records = [{"model": "m", "variant": variant, "weights": "none", "mode": "crop", "stride": None, "aligned": None,
                "partial": False, **row} for row in state.rows()]
    settings = {"data": ["constructed"], "num_images": None, "seed": 0}
    return Result(make_rows(records), settings, {"images": 40}, state.replicate_means().numpy())


def _direct_interval(differences: np.ndarray) -> tuple[float, float]:
    """The expanded percentile interval of the per-image differences' mean, from the definition:
    replicate r's mean is sum_i w_ir d_i / sum_i w_ir, with the run's bootstrap weights."""
    n = len(differences)
    weights = M.bootstrap_weights(torch.arange(n)).numpy().T  # replicates x images
    means = weights @ differences / weights.sum(axis=1)
    level = NormalDist().cdf(-math.sqrt(n / (n - 1)) * 2.022691)  # t_{39, 0.975}
    low, high = np.quantile(means, [level, 1 - level])
    return float(low), float(high)


def test_paired_interval_is_the_bootstrap_of_per_image_differences() -> None:
    generator = torch.Generator().manual_seed(3)
    a = {("output", (s, 0), M.KL_DIVERGENCE): torch.rand(40, generator=generator, dtype=torch.float64) ** 3
         for s in (0, 1, 2)}
    b = {key: v * 0.5 + 0.2 * torch.rand(40, generator=generator, dtype=torch.float64) for key, v in a.items()}
    comparison = compare_runs(_constructed(a, "base"), _constructed(b, "fixed"))
    rows = comparison.rows.set_index("shift_x")
    for shift in (1, 2):
        key = ("output", (shift, 0), M.KL_DIVERGENCE)
        low, high = _direct_interval((b[key] - a[key]).numpy())
        assert rows.loc[shift, "diff_low"] == pytest.approx(low, rel=1e-6)
        assert rows.loc[shift, "diff_high"] == pytest.approx(high, rel=1e-6)
    assert np.isnan(rows.loc[0, ["diff_low", "diff_high"]].to_numpy(float)).all()
    # the summary's mean over shifts 1 and 2: the bootstrap of each image's mean difference
    (summary,) = summarize(comparison).to_dict("records")
    per_image = sum(b[("output", (s, 0), M.KL_DIVERGENCE)] - a[("output", (s, 0), M.KL_DIVERGENCE)] for s in (1, 2)) / 2
    low, high = _direct_interval(per_image.numpy())
    assert summary["diff_low"] == pytest.approx(low, rel=1e-6) and summary["diff_high"] == pytest.approx(high, rel=1e-6)
    assert summary["mean_difference"] == pytest.approx(per_image.mean().item(), rel=1e-12)


def test_a_constant_change_per_image_has_a_point_interval() -> None:
    """b = a + 0.25 on every image: the difference is 0.25 in every replicate, however spread a is."""
    a = {("output", (1, 0), M.KL_DIVERGENCE): torch.linspace(0, 3, 40, dtype=torch.float64) ** 2}
    b = {key: v + 0.25 for key, v in a.items()}
    run_a, run_b = _constructed(a, "base"), _constructed(b, "fixed")
    (row,) = compare_results(run_a, run_b).to_dict("records")
    assert row["diff_low"] == pytest.approx(0.25, abs=1e-12) and row["diff_high"] == pytest.approx(0.25, abs=1e-12)
    own = run_b.rows.iloc[0]
    assert own["ci_high"] - own["ci_low"] > 1  # each run's own interval is wide


# -- real runs: one file, two files, CSV ----------------------------------------------------------


def test_one_run_and_two_files_give_the_same_paired_intervals(runs: dict[str, Result], tmp_path: Path) -> None:
    runs["both"].to_json(tmp_path / "both.json")
    runs["base"].to_json(tmp_path / "base.json")
    runs["blurpool"].to_json(tmp_path / "blurpool.json")
    within = compare_within(runs["both"]).rows
    from_file = compare_within(read_result(tmp_path / "both.json")).rows
    across = compare_runs(read_result(tmp_path / "base.json"), read_result(tmp_path / "blurpool.json")).rows
    assert (within["variant"] == "base vs blurpool").all() and len(within) == len(runs["base"].rows)
    moved = ~_reference(within).fillna(False)
    assert within.loc[moved, "diff_low"].notna().all()
    for other in (from_file, across):
        pd.testing.assert_frame_equal(within.drop(columns=["relative"]), other.drop(columns=["relative"]))
    blurpool = runs["both"].rows[runs["both"].rows["variant"] == "blurpool"]
    assert np.allclose(within["value_b"], blurpool["value"], rtol=0, atol=0)
    inside = (within["diff_low"] <= within["difference"]) & (within["difference"] <= within["diff_high"])
    assert inside[moved].all()


def test_unpaired_runs_get_no_interval_and_say_why(runs: dict[str, Result], tmp_path: Path) -> None:
    runs["base"].to_csv(tmp_path / "base.csv")
    comparison = compare_runs(read_result(tmp_path / "base.csv"), runs["blurpool"])
    assert "CSV" in comparison.note and comparison.rows[["diff_low", "diff_high"]].isna().all(axis=None)
    fewer = transinv.measure("resnet18", antialias="blurpool", num_images=5, **SETTINGS)
    comparison = compare_runs(runs["base"], fewer)
    assert "num_images" in comparison.note and comparison.rows["diff_low"].isna().all()


def test_two_modules_of_one_class_get_two_labels_and_compare_model_to_model() -> None:
    module = EXAMPLES["circular_gap"]()
    result = transinv.measure([module, module], **{**SETTINGS, "layers": "all"})
    assert list(dict.fromkeys(result.rows["model"])) == ["Sequential", "Sequential#2"]
    assert result.settings["labels"] == ["Sequential", "Sequential#2"]
    comparison = compare_within(result)
    assert (comparison.rows["layer"] == "output").all()  # layers of two models are not paired
    assert (comparison.rows["model"] == "Sequential vs Sequential#2").all()
    assert (comparison.rows["difference"] == 0).all()
    moved = ~_reference(comparison.rows).fillna(False)
    assert (comparison.rows.loc[moved, ["diff_low", "diff_high"]] == 0).all(axis=None)


def test_one_spec_given_twice_gets_two_labels() -> None:
    result = transinv.measure(["example:constant", "example:constant"], **{**SETTINGS, "layers": "none"})
    assert list(dict.fromkeys(result.rows["model"])) == ["example:constant", "example:constant#2"]


# -- what a terminal shows ---------------------------------------------------------------------


def test_side_by_side_tables_show_the_paired_difference_in_80_columns(runs: dict[str, Result]) -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render(runs["both"], 80))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "difference in top1_agreement" in text and "blurpool − base" in text
    within = compare_within(runs["both"]).rows
    kl = within[(within["metric"] == "kl_divergence") & (within["layer"] == "output") & (within["shift_x"] == 2)].iloc[0]
    shown = f"{kl['difference']:+.3g} [{kl['diff_low']:+.2g}, {kl['diff_high']:+.2g}]"
    assert shown in text
    agreement_at_0 = [line for line in text.splitlines() if line.startswith("│     0 │")][0]
    assert "[" not in agreement_at_0  # shift 0 shows its value, no interval


def test_compare_command_on_one_file(runs: dict[str, Result], tmp_path: Path) -> None:
    runs["both"].to_json(tmp_path / "both.json")
    cli = CliRunner()
    table = cli.invoke(app, ["compare", str(tmp_path / "both.json"), "-f", "table"], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert "A = base, B = blurpool" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    csv = cli.invoke(app, ["compare", str(tmp_path / "both.json"), "-f", "csv"])
    frame = pd.read_csv(io.StringIO(csv.stdout))
    assert frame["diff_low"].notna().any() and (frame["variant"] == "base vs blurpool").all()


def test_an_interrupted_run_pairs_inside_itself_but_not_with_another_file() -> None:
    a = {("output", (1, 0), M.KL_DIVERGENCE): torch.linspace(0, 1, 40, dtype=torch.float64)}
    run_a, run_b = _constructed(a, "base"), _constructed({k: v * 2 for k, v in a.items()}, "fixed")
    for run in (run_a, run_b):
        run.summary["partial"] = True
    both = Result(pd.concat([run_a.rows, run_b.rows], ignore_index=True), run_a.settings, run_a.summary,
                  np.concatenate([run_a.replicates, run_b.replicates]))
    assert compare_within(both).rows["diff_low"].notna().all()
    comparison = compare_runs(run_a, run_b)
    assert "images measured" in comparison.note and comparison.rows["diff_low"].isna().all()
