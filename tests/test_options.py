"""The options object is the one home of every setting: CLI flags, presets, result files and the
README's flag table are all read from it, and its errors name the option."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import typer
from torch import nn

import transinv
from transinv import cli, metric_registry
from transinv.engine import distributed
from transinv.errors import UserError
from transinv.options import MeasureOptions, OptionError, flag, flag_reference, option_names
from transinv.models import LoadedModel
from transinv.plan import labels_for, make_plan
from transinv.presets import list_presets, load_preset

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _between(text: str, marker: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    assert start in text and end in text, f"README lacks the {marker} markers"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def test_readme_flag_table_is_generated_from_the_options() -> None:
    assert _between(README, "flags") == flag_reference(), "regenerate with: make readme"


def test_readme_metric_table_is_generated_from_the_registry() -> None:
    assert _between(README, "metrics") == metric_registry.markdown_table(), (
        "regenerate with: make readme"
    )


def _measure_params() -> dict[str, object]:
    command = typer.main.get_command(cli.app).commands["measure"]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


def test_every_option_is_a_flag_with_the_same_default() -> None:
    params = _measure_params()
    for f in fields(MeasureOptions):
        assert f.name in params, f"{flag(f.name)} missing from the CLI"
        param = params[f.name]
        assert flag(f.name) in param.opts
        expected = list(f.default) if isinstance(f.default, tuple) else f.default
        assert param.default == expected or (param.default is None and expected is None), f.name


def test_keywords_normalise_what_a_notebook_passes() -> None:
    a = MeasureOptions(mean="0.5,0.5,0.5", std=(0.25, 0.25, 0.25), variants="base, aps", data="imgs", shift=5)
    assert a.mean == (0.5, 0.5, 0.5) and a.std == (0.25, 0.25, 0.25)
    assert a.variants == ("base", "aps") and a.data == ("imgs",) and a.shift == "5"
    assert MeasureOptions.from_mapping(a.settings()) == a


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"workers": -1}, "workers"),
        ({"mode": "circle"}, "mode"),
        ({"shift": "0..x"}, "shift"),
        ({"mean": "1,2"}, "mean"),
        ({"std": "1,0,1"}, "std"),
        ({"device": "gpu"}, "device"),
        ({"variants": "blurpool:9"}, "variants"),
        ({"consistency": "3"}, "consistency"),
    ],
)
def test_errors_name_the_option_and_the_cli_names_the_flag(changes: dict, option: str) -> None:
    with pytest.raises(OptionError) as caught:
        MeasureOptions(**changes).validate()
    assert caught.value.option == option
    assert str(caught.value).startswith(option) and "--" not in str(caught.value).split(" ")[0]
    assert caught.value.as_flag().startswith(flag(option))


def test_unknown_keyword_or_preset_key_names_the_closest_option(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"'batch_sise' \(did you mean batch_size\?\)"):
        transinv.measure("example:constant", batch_sise=4)
    preset = tmp_path / "mine.yaml"
    preset.write_text("shift: 0..2\nnum_image: 3\n")
    with pytest.raises(UserError, match=r"unknown setting 'num_image' \(did you mean num_images"):
        load_preset(str(preset))


def test_every_shipped_preset_loads_strictly() -> None:
    names = [p["name"] for p in list_presets()]
    assert "zhang2019-consistency" in names
    for name in names:
        MeasureOptions.from_mapping(load_preset(name)).validate()


def test_given_labels_must_match_the_models() -> None:
    models = [LoadedModel("a.py:build", "as-built", nn.Identity(), None, label="build"),
              LoadedModel("b.py:build", "as-built", nn.Identity(), None, label="build")]
    assert labels_for(models, None) == ["a.py:build", "b.py:build"]
    assert labels_for(models, ["x", "y"]) == ["x", "y"]
    with pytest.raises(UserError, match="one label per model"):
        labels_for(models, ["x"])


def test_plan_groups_jobs_by_views_and_shards_images_without_running() -> None:
    options = MeasureOptions(weights="none", variants="base,aps", shift="0..2", size=32, resize=40).validate()
    plan = make_plan(["example:circular_gap", "example:constant"], options, distributed.Context())
    assert len(plan.groups) == 1  # same preprocessing and shifts: one decode for all four jobs
    assert [(j.label, j.variant) for j in plan.jobs] == [
        ("example:circular_gap", "base"), ("example:circular_gap", "aps"),
        ("example:constant", "base"), ("example:constant", "aps"),
    ]  # example labels keep their prefix (see transinv.models.source_example)
    assert plan.groups[0].shifts.shifts == ((0, 0), (1, 0), (2, 0))
    second = make_plan(["example:constant"], options, distributed.Context(rank=1, world=2))
    assert second.ids == list(range(1, len(plan.images), 2))
    assert [i.path for i in second.items] == [i.path for i in plan.items[1::2]]


def test_a_notebook_module_comes_back_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transinv.measure([model, model], shift="0..1", size=32, resize=40, num_images=2, channels_last=True,
                     progress=False, variants="base,padding:circular")
    assert model.training
    assert model[0].weight.is_contiguous() and model[0].padding_mode == "zeros"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_modules_of_one_class_get_two_labels() -> None:
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    rows = transinv.measure([a, a], shift="0..1", size=32, resize=40, num_images=2, layers="none").rows
    assert list(dict.fromkeys(rows["model"])) == ["Sequential", "Sequential#2"]


def test_light_commands_do_not_import_torch() -> None:
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from transinv.cli import app\n"
        "runner = CliRunner()\n"
        "for args in (['--help'], ['presets'], ['measure', '--help'], ['measure', 'x', '--bogus']):\n"
        "    result = runner.invoke(app, args)\n"
        "    assert result.exit_code in (0, 2), (args, result.output)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'pandas') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_option_names_are_stable_identifiers() -> None:
    assert len(option_names()) == len(set(option_names()))
    assert all(name.isidentifier() and name.islower() for name in option_names())


def test_auto_weights_fall_back_to_random_weights_with_a_note_and_the_header_says_so() -> None:
    from io import StringIO

    from rich.console import Console

    from transinv.reports.render import print_result

    notes: list[str] = []
    result = transinv.measure("resnet18", weights="auto", shift="0..1", size=32, resize=40, num_images=2,
                              layers="none", warn=notes.append)
    assert set(result.rows["weights"]) == {"none"}
    assert any("no pretrained weights here" in note for note in notes)
    console = Console(file=StringIO(), width=200)
    print_result(result, console)
    shown = console.file.getvalue()
    assert "random weights (--weights none)" in shown and "preprocessing: resize 40 -> crop 32, bilinear" in shown


def test_size_without_resize_says_what_the_view_frames() -> None:
    """--size alone keeps the weights' resize, so a small view is a centre patch: one note says so
    and names the --resize that keeps the weights' framing; --size with --resize, or none, gets none."""
    from transinv.plan import prepare_model

    note = [n for n in prepare_model("resnet18", MeasureOptions(weights="none", size=64)).notes if "--size" in n]
    assert note == ["resnet18: --size 64 views the centre 64 px of each image resized to 256 px; "
                    "--resize 73 keeps the weights' framing (256 -> 224)"]
    larger = [n for n in prepare_model("resnet18", MeasureOptions(weights="none", size=320)).notes if "--size" in n]
    assert larger == ["resnet18: --size 320 views the centre 320 px of each image resized to 320 px; "
                      "--resize 366 keeps the weights' framing (256 -> 224)"]
    for quiet in (MeasureOptions(weights="none", size=64, resize=80), MeasureOptions(weights="none"),
                  MeasureOptions(weights="none", size=224)):
        assert not [n for n in prepare_model("resnet18", quiet).notes if "--size" in n]
