"""Figures from real (small) measurements: every kind of panel is written as a valid, non-blank
image; legends and titles never cover data; style options (labels, title, size, dpi) take effect."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.text import Text
from PIL import Image
from typer.testing import CliRunner

import transinv
from transinv.cli import app
from transinv.engine.data import builtin_images_dir
from transinv.reports.plots import DPI, draw_results, plot_results, plot_style
from transinv.reports.results import load_results


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three of the built-in photographs, shrunk, named ImageNet-style (``<wnid>_*``) so they are labelled."""
    folder = tmp_path_factory.mktemp("labelled")
    for wnid, name in zip(("n01440764", "n01443537", "n01484850"), ("astronaut", "chelsea", "coffee")):
        image = Image.open(builtin_images_dir() / f"{name}.jpg").convert("RGB")
        image.thumbnail((64, 64))
        image.save(folder / f"{wnid}_{name}.jpg", quality=95)
    return folder


def _measure(model: str, data: Path, shift: str = "0..3", direction: str = "x", **options: object) -> pd.DataFrame:
    result = transinv.measure(model, weights="none", data=str(data), num_images=2, size=32, resize=40,
                              shift=shift, direction=direction, layers="default", **options)
    return result.rows


@pytest.fixture(scope="session")
def x_rows(images: Path) -> pd.DataFrame:
    return _measure("resnet18", images)


@pytest.fixture(scope="session")
def small_rows(images: Path) -> pd.DataFrame:
    return _measure("example:circular_gap", images)


@pytest.fixture(scope="session")
def grid_rows(images: Path) -> pd.DataFrame:
    return _measure("example:strided_circular", images, shift="-1..1", direction="grid")


@pytest.fixture(scope="session")
def three_rows(images: Path) -> pd.DataFrame:
    """One model in three variants: three heatmaps side by side in each row."""
    return _measure("example:strided_circular", images, shift="0..2", variants="base,blurpool,padding:circular")


def plot(rows: pd.DataFrame, path: Path, *args: object, **kwargs: object) -> list[str]:
    """``plot_results`` with every warning an error: a figure must draw without any."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return plot_results(rows, path, *args, **kwargs)


def draw(rows: pd.DataFrame, *args: object, **kwargs: object) -> Figure:
    """``draw_results``, rendered, with every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig, _ = draw_results(rows, *args, **kwargs)
        fig.canvas.draw()
    return fig


def assert_image(path: Path) -> None:
    """A readable raster with colour channels that is not one flat colour."""
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert not np.all(pixels == pixels[0, 0])


def test_x_direction_draws_output_lines_and_layer_heatmaps(x_rows: pd.DataFrame, tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.png"
    panels = plot(x_rows, target)
    assert_image(target)
    assert len(panels) == 2
    assert "top1_agreement" in panels[0] and "accuracy" in panels[0] and "worst_case" not in panels[0]
    assert "heatmap" in panels[1] and "equivariance_error" in panels[1] and "pooled_invariance_error" in panels[1]
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["x.png"]  # no temporary file left behind


def test_grid_draws_dx_dy_maps(grid_rows: pd.DataFrame, tmp_path: Path) -> None:
    panels = plot(grid_rows, tmp_path / "grid.png")
    assert_image(tmp_path / "grid.png")
    assert "top1_agreement at output over (dx, dy)" in panels[0] and "heatmap" in panels[1]
    panels = plot(grid_rows, tmp_path / "grid-layer.png", layer="1")
    assert panels == [panels[0]] and "pooled_invariance_error at 1 over (dx, dy)" in panels[0]
    assert_image(tmp_path / "grid-layer.png")


def test_two_models_share_panels(x_rows: pd.DataFrame, small_rows: pd.DataFrame, tmp_path: Path) -> None:
    both = pd.concat([x_rows, small_rows], ignore_index=True)
    panels = plot(both, tmp_path / "two.png")
    assert_image(tmp_path / "two.png")
    assert all("resnet18" in p and "example:circular_gap" in p for p in panels)


def test_variants_and_confidence_bands(small_rows: pd.DataFrame, tmp_path: Path) -> None:
    a, b = small_rows.assign(variant="a"), small_rows.assign(variant="b", value=small_rows["value"] * 0.5)
    rows = pd.concat([a, b], ignore_index=True)
    rows = rows.assign(ci_low=rows["value"] - 0.05, ci_high=rows["value"] + 0.05)
    panels = plot(rows, tmp_path / "variants.png")
    assert_image(tmp_path / "variants.png")
    assert "example:circular_gap/a" in panels[0] and "example:circular_gap/b" in panels[0]


def test_layer_selection_draws_that_layer_against_shift(x_rows: pd.DataFrame, tmp_path: Path) -> None:
    panels = plot(x_rows, tmp_path / "layer.png", layer="layer1")
    assert_image(tmp_path / "layer.png")
    (panel,) = panels
    assert panel == "equivariance_error, pooled_invariance_error at layer1 against shift, one line per model: resnet18"


def test_metric_selection(x_rows: pd.DataFrame, tmp_path: Path) -> None:
    assert plot(x_rows, tmp_path / "kl.png", metric="kl_divergence") == [
        "kl_divergence at output against shift, one line per model: resnet18"
    ]
    assert_image(tmp_path / "kl.png")
    (panel,) = plot(x_rows, tmp_path / "pooled.svg", metric="pooled_invariance_error")
    assert panel.startswith("pooled_invariance_error heatmap")
    assert "<svg" in (tmp_path / "pooled.svg").read_text()
    (panel,) = plot(x_rows, tmp_path / "worst.png", metric="worst_case_accuracy")
    assert panel == "worst_case_accuracy per model: resnet18"


@pytest.mark.parametrize(
    ("metric", "layer", "hint"),
    [
        ("top5", None, "available metrics: .*kl_divergence"),
        (None, "layer9", "available layers: conv1, .*output"),
        ("equivariance_error", "output", "layer 'output' has no 'equivariance_error' rows.*top1_agreement"),
    ],
)
def test_unknown_metric_or_layer_lists_what_is_there(
    x_rows: pd.DataFrame, tmp_path: Path, metric: str | None, layer: str | None, hint: str
) -> None:
    with pytest.raises(ValueError, match=hint):
        plot(x_rows, tmp_path / "none.png", metric=metric, layer=layer)
    assert not (tmp_path / "none.png").exists()


def test_load_results_round_trips_csv_and_json(x_rows: pd.DataFrame, tmp_path: Path) -> None:
    csv, doc = tmp_path / "r.csv", tmp_path / "r.json"
    x_rows.to_csv(csv, index=False)
    records = x_rows.astype(object).where(x_rows.notna(), None).to_dict(orient="records")
    doc.write_text(json.dumps({"rows": records}))
    for loaded in (load_results([csv]), load_results([doc])):
        assert list(loaded.columns) == list(x_rows.columns) and len(loaded) == len(x_rows)
        assert list(loaded["layer"]) == list(x_rows["layer"])
        np.testing.assert_allclose(loaded["value"].astype(float), x_rows["value"].astype(float))
        assert loaded["shift_x"].isna().sum() == x_rows["shift_x"].isna().sum()
    both = load_results([csv, doc])
    assert len(both) == 2 * len(x_rows)
    plot(both, tmp_path / "loaded.png")
    assert_image(tmp_path / "loaded.png")


def test_load_results_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"other.csv: not a transinv result \(missing columns: model, "):
        load_results([other])
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json: not a transinv result"):
        load_results([listing])
    with pytest.raises(ValueError, match="missing.csv"):
        load_results([tmp_path / "missing.csv"])


# -- legends, titles, size and labels ----------------------------------------------------------


def covered(fig: Figure) -> list[str]:
    """What a legend covers: a panel's area or a plotted data point, in display coordinates."""
    found = []
    for legend in fig.findobj(Legend):
        box = legend.get_window_extent()
        for ax in fig.axes:
            if box.overlaps(ax.get_window_extent()):
                found.append(f"legend over panel {ax.get_title()!r}")
            for line in ax.get_lines():
                points = line.get_transform().transform(line.get_xydata())
                if any(box.contains(x, y) for x, y in points):
                    found.append(f"legend over a point of {line.get_label()!r}")
    return found


def test_legends_sit_outside_every_panel(x_rows: pd.DataFrame, small_rows: pd.DataFrame) -> None:
    both = pd.concat([x_rows, small_rows], ignore_index=True)
    for kwargs in ({}, {"metric": "accuracy", "figsize": (6, 3)}, {"layer": "output", "metric": "kl_divergence"}):
        fig = draw(both, **kwargs)
        (legend,) = fig.findobj(Legend)
        texts = [" ".join(t.get_text().split()) for t in legend.get_texts()]  # wrapped in a narrow figure
        assert [t.split(" (")[0] for t in texts] == ["resnet18", "example:circular_gap"], kwargs
        # the accuracy panel is drawn (labelled images): the legend gives each series' worst case
        assert all((" (worst-case accuracy " in t) == ("metric" not in kwargs or kwargs["metric"] == "accuracy")
                   for t in texts), texts
        assert covered(fig) == [], kwargs
    fig.axes[0].legend(loc="center")  # the check itself sees a legend placed over the data
    fig.canvas.draw()
    assert covered(fig)


def test_panel_titles_are_wrapped_so_they_never_overlap(three_rows: pd.DataFrame) -> None:
    long = ["strided circular network, as built", "the same network with BlurPool before each stride",
            "the same network with circular padding everywhere"]
    fig = draw(three_rows, labels=long)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) >= 9  # 3 output panels, 2 rows of 3 heatmaps
    assert any("\n" in ax.get_title() for ax in titled)  # these titles are wider than a heatmap
    for i, ax in enumerate(titled):
        box = ax.title.get_window_extent()
        assert box.width <= ax.get_window_extent().width + 1, ax.get_title()
        for other in titled[i + 1 :]:
            assert not box.overlaps(other.title.get_window_extent()), (ax.get_title(), other.get_title())
        for other in fig.axes:
            assert other is ax or not box.overlaps(other.get_window_extent()), ax.get_title()


@pytest.mark.parametrize("figsize", [None, (10, 9)])
def test_a_word_too_long_for_a_panel_is_broken_inside(x_rows: pd.DataFrame, figsize: tuple | None) -> None:
    fig = draw(x_rows, labels=["ResNet18_random_weights_measured_on_three_builtin_photographs_at_32px"], figsize=figsize)
    for ax in fig.axes:
        if ax.get_title():
            assert ax.title.get_window_extent().width <= ax.get_window_extent().width + 1, ax.get_title()


def test_suptitle_is_wrapped_and_says_partial(small_rows: pd.DataFrame) -> None:
    title = " ".join(["Translation invariance of a circularly padded network with global average pooling"] * 3)
    fig = draw(small_rows.assign(partial=True), title=title)
    (suptitle,) = [t for t in fig.findobj(Text) if t.get_text() == fig.get_suptitle()]
    assert suptitle.get_text().replace("\n", " ").startswith(title)
    assert suptitle.get_text().endswith("\npartial results: the run was interrupted")
    assert suptitle.get_text().count("\n") >= 2  # the title itself took two lines or more
    box = suptitle.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width
    assert not any(box.overlaps(ax.get_window_extent()) or box.overlaps(ax.title.get_window_extent()) for ax in fig.axes)


@pytest.mark.parametrize(("figsize", "dpi"), [((5.0, 4.0), 50), ("6.5,3", 80), (None, None)])
def test_image_size_is_figsize_times_dpi(x_rows: pd.DataFrame, tmp_path: Path, figsize: object, dpi: int | None) -> None:
    target = tmp_path / "sized.png"
    plot(x_rows, target, metric="kl_divergence", figsize=figsize, dpi=dpi)
    height, width = matplotlib.image.imread(target).shape[:2]
    if figsize is None:
        fig, _ = draw_results(x_rows, metric="kl_divergence")
        expected = fig.get_size_inches() * DPI
    else:
        expected = np.array([float(v) for v in (figsize.split(",") if isinstance(figsize, str) else figsize)]) * dpi
    assert (width, height) == tuple(round(v) for v in expected)


def test_labels_rename_series_in_legend_titles_ticks_and_descriptions(
    x_rows: pd.DataFrame, small_rows: pd.DataFrame, tmp_path: Path
) -> None:
    both = pd.concat([x_rows, small_rows], ignore_index=True)
    fig = draw(both, labels={"resnet18": "ResNet-18", "example:circular_gap": "circular GAP"})
    (legend,) = fig.findobj(Legend)
    assert [t.get_text().split(" (")[0] for t in legend.get_texts()] == ["ResNet-18", "circular GAP"]
    titles = " ".join(ax.get_title().replace("\n", " ") for ax in fig.axes)
    assert "equivariance_error: ResNet-18" in titles and "circular GAP" in titles and "resnet18" not in titles
    fig = draw(both, metric="kl_divergence", labels=["ResNet-18", "circular GAP"])  # in series order
    assert [t.get_text() for t in fig.findobj(Legend)[0].get_texts()] == ["ResNet-18", "circular GAP"]
    fig = draw(both, metric="worst_case_accuracy", labels={"resnet18": "ResNet-18"})  # the others keep their name
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["ResNet-18", "example:circular_gap"]
    (panel,) = plot(both, tmp_path / "labelled.png", metric="pooled_invariance_error", labels={"resnet18": "ResNet-18"})
    assert "ResNet-18" in panel and "resnet18" not in panel


@pytest.mark.parametrize(
    ("style", "message"),
    [
        ({"figsize": "0,3"}, "figsize '0,3': give a positive width and height"),
        ({"figsize": "3"}, "figsize '3'"),
        ({"figsize": "a,b"}, "figsize 'a,b'"),
        ({"figsize": (4, float("inf"))}, "figsize '4,inf'"),
        ({"dpi": -1}, "dpi -1: give a positive whole number"),
        ({"dpi": 0}, "dpi 0"),
        ({"dpi": 1.5}, "dpi 1.5"),
        ({"figsize": (100, 10), "dpi": 1000}, "is not under 65536 pixels a side"),
        ({"figsize": (65.536, 1), "dpi": 1000}, "is not under 65536 pixels a side"),
        ({"figsize": (1, 1)}, "the figure is too small for its panels.*try figsize"),
        ({"labels": {"vgg11": "VGG"}}, "label for 'vgg11', which is not a series here; series: resnet18"),
        ({"labels": ["a", "b"]}, r"2 label\(s\) for 1 series \(resnet18\)"),
        ({"labels": "ResNet"}, r"1 label\(s\) for 1 series"),
    ],
)
def test_bad_style_is_a_one_line_error_and_writes_nothing(
    x_rows: pd.DataFrame, tmp_path: Path, style: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        plot(x_rows, tmp_path / "bad.png", **style)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_two_series_may_not_share_a_label(x_rows: pd.DataFrame, small_rows: pd.DataFrame, tmp_path: Path) -> None:
    both = pd.concat([x_rows, small_rows], ignore_index=True)
    with pytest.raises(ValueError, match="two series would both be labelled 'net'"):
        plot(both, tmp_path / "bad.png", labels=["net", "net"])


def test_plot_style_parses_the_command_line() -> None:
    assert plot_style() == {}
    assert plot_style(["resnet18=ResNet-18", "b=K=3"], "T", "8, 5", 150) == {
        "labels": {"resnet18": "ResNet-18", "b": "K=3"}, "title": "T", "figsize": (8.0, 5.0), "dpi": 150}
    assert plot_style(["ResNet-18", "VGG"]) == {"labels": ["ResNet-18", "VGG"]}
    with pytest.raises(ValueError, match="not a mix of both"):
        plot_style(["resnet18=ResNet-18", "VGG"])
    with pytest.raises(ValueError, match="figsize '0,3'"):
        plot_style(figsize="0,3")
    with pytest.raises(ValueError, match="dpi -1"):
        plot_style(dpi=-1)


# -- the command line --------------------------------------------------------------------------


def test_cli_plot_and_measure_take_the_style_flags(x_rows: pd.DataFrame, images: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    saved, figure = tmp_path / "r.csv", tmp_path / "f.png"
    x_rows.to_csv(saved, index=False)
    result = runner.invoke(app, ["plot", str(saved), "-o", str(figure), "--metric", "kl_divergence", "--label",
                                 "resnet18=ResNet-18", "--title", "KL", "--figsize", "6,3", "--dpi", "40"])
    assert result.exit_code == 0, result.output
    assert matplotlib.image.imread(figure).shape[:2] == (120, 240)
    for flags, message in ((["--figsize", "0,3"], "figsize '0,3'"), (["--dpi", "-1"], "dpi -1"),
                           (["--label", "vgg=VGG"], "label for 'vgg'")):
        result = runner.invoke(app, ["plot", str(saved), "-o", str(tmp_path / "bad.png"), *flags])
        assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()

    common = ["measure", "example:circular_gap", "--weights", "none", "--data", str(images), "--num-images", "2",
              "--size", "32", "--resize", "40", "--shift", "0..2", "--layers", "none", "-f", "csv", "--no-progress"]
    result = runner.invoke(app, [*common, "--title", "T"])
    assert result.exit_code == 2 and "add --plot" in result.stderr
    result = runner.invoke(app, [*common, "--figsize", "0,3", "--plot", str(figure)])
    assert result.exit_code == 2 and "figsize '0,3'" in result.stderr and result.stdout == ""  # before measuring
    result = runner.invoke(app, [*common, "--plot", str(tmp_path / "m.png"), "--label", "GAP", "--figsize", "9,3",
                                 "--dpi", "30", "--title", "circular GAP"])
    assert result.exit_code == 0, result.output
    assert matplotlib.image.imread(tmp_path / "m.png").shape[:2] == (90, 270)
