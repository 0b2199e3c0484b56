"""``--per-image``: one row per image and shift that agrees with the aggregated metrics, and
``transinv flips``, which ranks those rows and draws the images that flip most easily."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import transinv
from transinv.engine.data import builtin_images_dir
from transinv.errors import UserError
from transinv.reports.flips import draw_flips, load_per_image, rank_flips
from transinv.reports.per_image import COLUMNS

IMAGES = builtin_images_dir()
FC_HEAD = "transinv.tour_models:fc_head"  # a flattened head: its class flips at small shifts
SMALL = {"weights": "none", "size": 32, "resize": 48, "layers": "none", "shift": "0..4", "progress": False}


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[transinv.Result, pd.DataFrame]:
    path = tmp_path_factory.mktemp("per-image") / "rows.csv"
    result = transinv.measure(FC_HEAD, per_image=str(path), **SMALL)
    return result, pd.read_csv(path)


def test_one_row_per_image_and_shift(measured: tuple[transinv.Result, pd.DataFrame]) -> None:
    result, rows = measured
    assert list(rows.columns) == COLUMNS
    assert len(rows) == 9 * 5 and rows.groupby("image").size().eq(5).all()
    assert list(rows["shift_x"][:5]) == [0, 1, 2, 3, 4] and (rows["shift_y"] == 0).all()
    assert set(rows["model"]) == {"fc_head"} and set(rows["variant"]) == {"base"}
    assert (rows["label"] == -1).all() and rows["label_name"].isna().all()  # built-in photos: no labels
    assert rows["reference_class_name"].isna().all()  # 10 classes: no ImageNet names
    zero = rows[rows["shift_x"] == 0]
    assert not zero["flipped"].any() and np.allclose(zero["reference_prob"], zero["shifted_prob"])
    assert (rows["flipped"] == (rows["reference_class"] != rows["shifted_class"])).all()
    unflipped = rows[~rows["flipped"]]
    assert np.allclose(unflipped["shifted_prob"], unflipped["prob_of_reference_class_shifted"])


def test_rows_agree_with_the_aggregated_metrics(measured: tuple[transinv.Result, pd.DataFrame]) -> None:
    """Per shift: mean of `not flipped` is top1_agreement, and the mean change of the reference
    class's probability is prob_change, over the same n images."""
    result, rows = measured
    out = result.rows[result.rows["layer"] == "output"]
    agreement = out[out["metric"] == "top1_agreement"].set_index("shift_x")
    assert rows["flipped"].dtype == bool
    assert np.allclose((~rows["flipped"]).groupby(rows["shift_x"]).mean().to_numpy(), agreement["value"].to_numpy(float))
    assert list(agreement["n"]) == list(rows.groupby("shift_x").size())
    assert agreement["value"].min() < 1  # the flattened head flips some images: the test can fail
    change = (rows["prob_of_reference_class_shifted"] - rows["reference_prob"]).abs().groupby(rows["shift_x"]).mean()
    prob_change = out[out["metric"] == "prob_change"].set_index("shift_x")["value"]
    assert np.allclose(change.to_numpy(), prob_change.to_numpy(float), rtol=1e-9, atol=1e-12)


def test_batch_size_and_variants_do_not_change_the_rows(tmp_path: Path,
                                                        measured: tuple[transinv.Result, pd.DataFrame]) -> None:
    path = tmp_path / "rows.csv"
    transinv.measure(FC_HEAD, per_image=str(path), batch_size=2, variants="base,padding:circular", **SMALL)
    rows = pd.read_csv(path)
    assert list(rows["variant"].unique()) == ["base", "padding:circular"]
    base = rows[rows["variant"] == "base"].reset_index(drop=True)
    pd.testing.assert_frame_equal(base, measured[1], check_exact=False, rtol=1e-5)  # float32 forward: batch-size rounding


def test_label_names_from_wnids_and_class_folders(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for folder, name in (("cats", "chelsea.jpg"), ("cups", "coffee.jpg")):
        (tree / folder).mkdir(parents=True)
        shutil.copy(IMAGES / name, tree / folder / name)
    shutil.copy(IMAGES / "chelsea.jpg", tmp_path / "n02123045_chelsea.jpg")
    path = tmp_path / "rows.csv"
    transinv.measure("resnet18", data=[str(tree), str(tmp_path / "n02123045_chelsea.jpg")], per_image=str(path),
                     **{**SMALL, "shift": "0,2"})
    rows = pd.read_csv(path).drop_duplicates("image").set_index("label_name")
    assert rows.loc["cats", "label"] == 0 and rows.loc["cups", "label"] == 1
    assert rows.loc["tabby", "label"] == 281  # the shipped ImageNet table
    assert rows["reference_class_name"].notna().all()  # 1000 classes: ImageNet names


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_gathers_every_rank_rows(tmp_path: Path, measured: tuple[transinv.Result, pd.DataFrame]) -> None:
    """9 images over 2 ranks: rank 0 writes all 45 rows, in the single process's order."""
    path = tmp_path / "rows.csv"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", "29531", "-m", "transinv", "measure", FC_HEAD,
         "--weights", "none", "--size", "32", "--resize", "48", "--layers", "none", "--shift", "0..4",
         "--batch-size", "2", "--per-image", str(path), "-f", "csv"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    pd.testing.assert_frame_equal(pd.read_csv(path), measured[1], check_exact=False, rtol=1e-5)


# -- flips -------------------------------------------------------------------------------------


def _row(image: str, dx: int, flipped: bool, dy: int = 0, shifted: int = 3) -> dict:
    return {"model": "net", "variant": "base", "image": str(IMAGES / image), "label": -1, "label_name": "",
            "shift_x": dx, "shift_y": dy, "reference_class": 281, "reference_class_name": "tabby",
            "reference_prob": 0.5, "shifted_class": shifted if flipped else 281,
            "shifted_class_name": "tiger_cat" if flipped else "tabby", "shifted_prob": 0.4,
            "prob_of_reference_class_shifted": 0.3, "flipped": flipped, "mode": "crop", "size": 32, "resize": 48}


def _constructed() -> pd.DataFrame:
    """brick flips at 2 (1 of 4 shifts); coffee at 1 (1 of 4); chelsea at 1 (3 of 4); grass never;
    rocket first at -1 (file order) and at 1, (2 of 4); astronaut at (1, 1), |d| = 1.41."""
    rows = []
    for image, flips in (("brick.jpg", {2}), ("coffee.jpg", {1}), ("chelsea.jpg", {1, 2, -2}), ("grass.jpg", set()),
                         ("rocket.jpg", {-1, 1})):
        rows += [_row(image, dx, dx in flips) for dx in (0, -2, -1, 1, 2)]
    rows += [_row("astronaut.jpg", 0, False), _row("astronaut.jpg", 1, True, dy=1), _row("astronaut.jpg", 2, False)]
    return pd.DataFrame(rows)


def test_rank_flips_easiest_first() -> None:
    ranked = rank_flips(_constructed())
    names = [Path(p).name for p in ranked["image"]]
    assert names == ["chelsea.jpg", "rocket.jpg", "coffee.jpg", "astronaut.jpg", "brick.jpg"]
    first = ranked.set_index(ranked["image"].map(lambda p: Path(p).name))
    assert first.loc["rocket.jpg", "shift_x"] == -1 and first.loc["rocket.jpg", "share"] == 0.5
    assert first.loc["chelsea.jpg", "flips"] == 3 and first.loc["chelsea.jpg", "shifts"] == 4
    assert first.loc["astronaut.jpg", "distance"] == pytest.approx(2 ** 0.5)
    assert "grass.jpg" not in names


def test_contact_sheet_names_the_shift_and_the_two_classes() -> None:
    frame = _constructed()
    frame.loc[frame["image"].str.endswith("brick.jpg"), "shifted_class_name"] = np.nan  # no name: 'class 3'
    fig = draw_flips(rank_flips(frame), top=5)
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
    assert len(titles) == 5 and titles[0].startswith("chelsea.jpg")
    assert "d = (1, 0): tabby -> tiger_cat" in titles[0] and "flips at 3 of 4 shifts" in titles[0]
    assert "d = (2, 0): tabby -> class 3" in titles[-1]
    with pytest.raises(UserError, match="no image changes"):
        draw_flips(rank_flips(frame[frame["image"].str.endswith("grass.jpg")]))


def test_load_per_image_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "rows.csv"
    other.write_text("model,metric,value\nresnet18,top1_agreement,1\n")
    with pytest.raises(UserError, match="not a --per-image file"):
        load_per_image(other)


def test_cli_flips_draws_the_sheet_and_prints_the_ranking(tmp_path: Path,
                                                          measured: tuple[transinv.Result, pd.DataFrame]) -> None:
    source, target = tmp_path / "rows.csv", tmp_path / "sheet.png"
    measured[1].to_csv(source, index=False)
    proc = subprocess.run([sys.executable, "-m", "transinv", "flips", str(source), "-o", str(target), "--top", "2",
                           "-f", "csv"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes()[:4] == b"\x89PNG"
    ranking = pd.read_csv(io.StringIO(proc.stdout))
    expected = rank_flips(measured[1]).head(2)
    assert list(ranking["image"]) == list(expected["image"]) and len(ranking) == 2
