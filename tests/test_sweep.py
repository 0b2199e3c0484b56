"""Sweeps: model lists and shards, one file per model, resume after a kill, failures recorded;
and the leaderboard read from those files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

from transinv import metric_registry as R
from transinv.engine.data import builtin_images_dir, imagenet_classes
from transinv.errors import UserError
from transinv.examples import EXAMPLES
from transinv.reports.leaderboard import leaderboard, plot_leaderboard
from transinv.options import MeasureOptions, OptionError
from transinv.progress import time_left
from transinv.sweep import (DONE, FAILED, SKIPPED, expand_models, file_stem, parse_shard, read_record, result_files,
                            run_sweep)

FAST = MeasureOptions(weights="none", size=32, resize=40, shift="0..2", num_images=2, mode="circular")
EXAMPLE_SPECS = [f"example:{name}" for name in EXAMPLES]


def _sweep(models: list[str], directory: Path, options: MeasureOptions = FAST, **kw) -> tuple[list[str], object]:
    lines: list[str] = []
    report = run_sweep(models, options, directory, log=lines.append, warn=lines.append, **kw)
    return lines, report


def _model_file(path: Path, body: str) -> str:
    path.write_text("import torch\nfrom torch import nn\n\n" + body)
    return f"{path}:build"


OOM = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def build():
    return Net()
"""
WORKS = """
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))
"""
SLOW = """
import time


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)

    def forward(self, x):
        time.sleep(0.4)
        return self.conv(x).mean((2, 3))


def build():
    return Slow()
"""


# -- which models -------------------------------------------------------------------------------

def test_expand_models_globs_sources_and_list_files(tmp_path: Path) -> None:
    assert expand_models(["example:*"]) == EXAMPLE_SPECS
    resnets = [n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("resnet")]
    assert expand_models(["torchvision:resnet*"]) == resnets and "resnet18" in resnets
    assert expand_models(["resnet1?"]) == ["resnet18"]  # a bare glob is over torchvision
    assert expand_models(["torchvision:vgg11", "example:con*"]) == ["vgg11", "example:constant"]
    listing = tmp_path / "models.txt"
    listing.write_text("# my models\nresnet18\n\nexample:c*   # the constant and circular ones\nresnet18\n")
    assert expand_models([str(listing), "mynet.py:build"]) == \
        ["resnet18", *[spec for spec in EXAMPLE_SPECS if spec.startswith("example:c")], "mynet.py:build"]
    for bad, needle in [(["nosource:*convnext*"], "no model source 'nosource'"), (["torchvision:nosuch*"], "matches no"),
                        ([str(tmp_path / "empty.txt")], "lists no models")]:
        (tmp_path / "empty.txt").write_text("# nothing\n")
        with pytest.raises(UserError, match=re.escape(needle)):
            expand_models(bad)


def test_shards_split_the_models_without_overlap() -> None:
    models = [f"m{i}" for i in range(7)]
    shards = [models[i::n] for i, n in (parse_shard(f"{k}/3") for k in range(3))]
    assert sorted(sum(shards, [])) == models and shards[0] == ["m0", "m3", "m6"]
    for bad in ("3/3", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_file_names_are_safe_and_never_hidden() -> None:
    assert file_stem("example:constant") == "example_constant"
    assert file_stem("./nets/my net.py:build") == "_nets_my_net.py_build"
    assert file_stem("resnet18") == "resnet18"


# -- one file per model, resume, failures --------------------------------------------------------

def test_failures_are_recorded_and_the_sweep_goes_on_then_retried(tmp_path: Path) -> None:
    oom = _model_file(tmp_path / "oom.py", OOM)
    out = tmp_path / "results"
    lines, report = _sweep(["example:constant", "nosuchnet", oom, "example:circular_gap"], out)
    status = {o.model: o.status for o in report.outcomes}
    assert status == {"example:constant": DONE, "nosuchnet": FAILED, oom: FAILED, "example:circular_gap": DONE}
    reason = read_record(out / f"{file_stem(oom)}.failed.json")["sweep"]["reason"]
    assert reason == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "unknown model 'nosuchnet'" in read_record(out / "nosuchnet.failed.json")["sweep"]["reason"]
    done = read_record(out / "example_constant.json")
    assert done["sweep"]["status"] == DONE and done["summary"]["images"] == 2 and done["rows"]
    assert done["settings"]["per_model"]["example:constant"]["parameters"] == 10  # ten logits, nothing else

    _model_file(tmp_path / "oom.py", WORKS)  # the user fixes the model; the rerun retries only the failures
    lines, report = _sweep(["example:constant", "nosuchnet", oom, "example:circular_gap"], out)
    assert {o.model: o.status for o in report.outcomes} == {
        "example:constant": SKIPPED, "example:circular_gap": SKIPPED, "nosuchnet": FAILED, oom: DONE}
    assert any("failed before (OutOfMemoryError" in line and "trying again" in line for line in lines)
    assert not (out / f"{file_stem(oom)}.failed.json").exists() and (out / f"{file_stem(oom)}.json").exists()


def test_changed_settings_are_measured_again_and_run_only_options_are_not(tmp_path: Path) -> None:
    out = tmp_path / "results"
    _sweep(["example:constant"], out)
    before = (out / "example_constant.json").read_bytes()
    lines, report = _sweep(["example:constant"], out, FAST.updated(batch_size=1, workers=0, cuda_graphs=False))
    assert report.outcomes[0].status == SKIPPED and (out / "example_constant.json").read_bytes() == before
    lines, report = _sweep(["example:constant"], out, FAST.updated(shift="0..3"))
    assert report.outcomes[0].status == DONE
    assert any("settings differ from its file (shift: 0..2 -> 0..3)" in line for line in lines)
    shifts = {r["shift_x"] for r in read_record(out / "example_constant.json")["rows"]}
    assert shifts == {0, 1, 2, 3, None}


def test_merged_shards_are_one_run(tmp_path: Path) -> None:
    models = EXAMPLE_SPECS + ["nosuchnet"]
    for shard in ("0/2", "1/2"):
        _sweep(models, tmp_path / f"shard{shard[0]}", shard=shard)
    merged = tmp_path / "merged"
    merged.mkdir()
    for shard in ("shard0", "shard1"):
        for path in result_files(tmp_path / shard):
            shutil.copy(path, merged)
    _sweep(models, tmp_path / "whole")
    a, _ = leaderboard(merged)
    b, _ = leaderboard(tmp_path / "whole")
    assert len(a) == len(models)
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))


def test_label_is_refused_in_a_sweep(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="label"):
        _sweep(["example:constant"], tmp_path, FAST.updated(label=("x",)))


def test_killed_sweep_resumes_losing_only_the_model_in_progress(tmp_path: Path) -> None:
    slow = _model_file(tmp_path / "slow.py", SLOW)
    models = ["example:constant", slow, "example:circular_gap", "squeezenet1_1", "example:strided_circular"]
    out = tmp_path / "results"
    command = [sys.executable, "-m", "transinv", "sweep", *models, "-o", str(out), "--weights", "none", "--size", "32",
               "--resize", "40", "--shift", "0..2", "--num-images", "2", "--mode", "circular", "--layers", "none"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "example_constant.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)  # while the slow model (0.4 s per forward pass) is in progress
    first.wait()
    survived = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in result_files(out)}
    assert all(json.loads(data)["sweep"]["status"] == DONE for _, data in survived.values())  # no half files
    assert 1 <= len(survived) < len(models)

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in result_files(out) if p.name in survived} == survived
    assert {file_stem(m) + ".json" for m in models} == {p.name for p in result_files(out)}
    measured_again = re.findall(r"\] (\S+): done in", second.stderr)
    assert sorted(measured_again) == sorted(m for m in models if file_stem(m) + ".json" not in survived)
    assert f"{len(survived)} done already" in second.stderr


# -- leaderboard ----------------------------------------------------------------------------------

def _labelled_images(folder: Path, label: int, other: int) -> Path:
    """Two built-in photographs named as ImageNet files of class ``label`` and ``other``."""
    wnids = imagenet_classes()[0]
    folder.mkdir()
    for name, cls in (("chelsea.jpg", label), ("coffee.jpg", other)):
        shutil.copy(builtin_images_dir() / name, folder / f"{wnids[cls]}_{name}")
    return folder


def test_leaderboard_ranks_by_the_preset_headline_with_known_answers(tmp_path: Path) -> None:
    torch.manual_seed(0)  # as load_model builds example:constant: its one prediction is known
    predicted = int(EXAMPLES["constant"]().logits.argmax())
    images = _labelled_images(tmp_path / "images", predicted, (predicted + 1) % 10)
    options = FAST.updated(shift="0", consistency="-4..3", layers="none", data=(str(images),))
    out = tmp_path / "results"
    _sweep(["example:constant", "example:valid_conv", "nosuchnet"], out, options, config="chaman2021-circular")
    frame, headline = leaderboard(out)
    assert headline == R.CONSISTENCY  # the preset's headline
    top = frame.iloc[0]
    assert top["model"] == "example:constant" and top["rank"] == 1 and top[R.CONSISTENCY] == 1.0
    assert top["accuracy"] == 0.5 and top["parameters"] == 10 and top["n"] == 2  # one image of its class, one not
    assert top[f"{R.CONSISTENCY}_low"] < 1.0 == top[f"{R.CONSISTENCY}_high"]
    last = frame.iloc[-1]
    assert last["model"] == "nosuchnet" and last["status"] == FAILED and pd.isna(last["rank"])
    assert "unknown model" in last["reason"]
    assert list(frame.columns[:6]) == ["rank", "model", "variant", "weights", "parameters", "accuracy"]


def test_leaderboard_direction_born_at_plot_and_bad_columns(tmp_path: Path) -> None:
    out = tmp_path / "results"
    _sweep(["example:constant", "example:valid_conv"], out, FAST.updated(mode="crop", resize=48, shift="0..4"))
    frame, headline = leaderboard(out, metric=R.JAGGEDNESS)  # lower is better: the constant model first
    assert headline == R.JAGGEDNESS and frame["model"].tolist() == ["example:constant", "example:valid_conv"]
    assert frame.loc[0, R.JAGGEDNESS] == 0.0 and frame.loc[0, "rank"] == 1
    valid = frame.set_index("model").loc["example:valid_conv"]
    born = read_record(out / "example_valid_conv.json")["summary"]["born_at"]
    assert valid["born_at"] in {b["layer"] for b in born}
    frame, headline = leaderboard(out)  # no preset: the first whole-set metric
    assert headline == R.WORST_CASE_AGREEMENT
    described = plot_leaderboard(frame, tmp_path / "lb.png", headline=headline)
    assert described == "worst_case_agreement against parameters, 2 models"
    assert (tmp_path / "lb.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="not a numeric column"):
        plot_leaderboard(frame, tmp_path / "x.png", x="model")
    with pytest.raises(UserError, match="rank by an output or whole-set metric"):
        leaderboard(out, metric="equivariance_error")


def test_leaderboard_warns_about_mixed_settings(tmp_path: Path) -> None:
    out = tmp_path / "results"
    _sweep(["example:constant"], out)
    _sweep(["example:circular_gap"], out, FAST.updated(shift="0..1"))
    warnings: list[str] = []
    leaderboard(out, warn=warnings.append)
    assert any("2 different settings" in w for w in warnings)


def test_time_left_is_the_mean_time_per_model_times_the_models_left() -> None:
    assert time_left(10.0, 2, 5) == "15 s" and time_left(100.0, 1, 3) == "3 min 20 s" and time_left(0.0, 0, 5) == ""


def test_sweep_progress_has_a_models_bar_and_one_images_bar_at_a_time() -> None:
    from io import StringIO

    from rich.console import Console

    from transinv.progress import SweepProgress

    with SweepProgress(Console(file=StringIO(), force_terminal=True, width=100)) as progress:
        progress.start(3)
        progress.started -= 30.0  # as if the first model took half a minute
        progress.model("resnet18")
        progress(10, 0)(10)
        progress.model_done()
        progress.model("vgg11")
        progress(10, 0)(4)
        tasks = progress.bar.tasks
        assert [t.description for t in tasks] == ["models: vgg11", "measuring"]
        assert tasks[0].completed == 1 and tasks[0].fields["rate"].startswith("about ") and tasks[1].completed == 4
