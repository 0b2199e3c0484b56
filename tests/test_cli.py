"""The CLI as a user runs it: a real subprocess, stdout as data, one-line errors, Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from transinv.results import COLUMNS

TRANSINV = [sys.executable, "-m", "transinv"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TRANSINV, *args], capture_output=True, text=True, timeout=timeout)


def test_measure_on_imagenet_sample_writes_clean_csv(imagenet_sample: Path) -> None:
    proc = run("measure", "resnet18", "--weights", "none", "--shift", "0..8", "--data", str(imagenet_sample),
               "--num-images", "8")
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(io.StringIO(proc.stdout))
    assert list(frame.columns) == COLUMNS
    out = frame[frame["layer"] == "output"]
    assert set(out["metric"]) == {"top1_agreement", "kl_divergence", "prob_change", "accuracy", "worst_case_accuracy",
                                  "jaggedness", "worst_case_agreement"}
    assert (out["n"] == 8).all() and sorted(out["shift_x"].dropna().unique()) == list(range(9))
    assert {"conv1", "layer4"} <= set(frame["layer"])
    assert "Traceback" not in proc.stderr


def test_json_and_output_file(tmp_path: Path, few_images: Path) -> None:
    target = tmp_path / "out" / "run.json"
    proc = run("measure", "example:circular_gap", "--weights", "none", "--data", str(few_images), "--size", "32",
               "--resize", "40", "--shift", "0..2", "--mode", "circular", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # the file got the data; a non-terminal stdout gets nothing more
    doc = json.loads(target.read_text())
    assert doc["settings"]["mode"] == "circular" and doc["summary"]["images"] == 6
    assert {"torch", "torchvision", "transinv"} <= set(doc["versions"])
    assert len(doc["rows"]) > 0 and set(doc["rows"][0]) == set(COLUMNS)
    proc = run("measure", "example:circular_gap", "--weights", "none", "--data", str(few_images), "--size", "32",
               "--resize", "40", "--shift", "0..2", "--format", "json")
    assert json.loads(proc.stdout)["rows"]


def test_layers_command_lists_strides() -> None:
    proc = run("layers", "resnet18", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(io.StringIO(proc.stdout)).set_index("layer")
    assert frame.loc[["conv1", "maxpool", "layer2", "layer3", "layer4"], "stride"].tolist() == [2, 4, 8, 16, 32]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    return {"empty": root / "empty", "garbage": root / "garbage.pt"}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["measure", "resnet81", "--weights", "none"], "did you mean resnet18"),
        (["measure", "resnet18", "--weights", "none", "--shift", "0..x"], "--shift"),
        (["measure", "resnet18", "--weights", "none", "--shift", "0..64"], "--resize"),
        (["measure", "resnet18", "--weights", "none", "--data", "/no/such/folder"], "no such file"),
        (["measure", "resnet18", "--weights", "none", "--data", "{empty}"], "no images"),
        (["measure", "resnet18", "--weights", "{garbage}"], "cannot load checkpoint"),
        (["measure", "resnet18", "--weights", "IMAGENET1K_V1", "--mean", "0.5,0.5"], "three numbers"),
        (["measure", "example:valid_conv", "--weights", "IMAGENET1K_V1"], "factory"),
        (["measure", "resnet18", "--weights", "none", "--direction", "up"], "--direction"),
        (["measure", "resnet18", "--weights", "none", "--layers", "layer9"], "no layer matches"),
        (["measure", "resnet18", "--weights", "none", "--shfit", "3"], "No such option"),
        (["measure", "resnet18", "--weights", "none", "--device", "cuda:7"], "device"),
        (["measure", "resnet18"], "--weights none"),
        (["layers", "inception_v3", "--size", "32"], "--size"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], needle: str, bad_files: dict[str, Path]) -> None:
    args = [a.format(**bad_files) for a in args]
    env = {**os.environ, "TRANSINV_OFFLINE": "1"}
    proc = subprocess.run([*TRANSINV, *args], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle.lower() in lines[0].lower()
    assert proc.stdout == ""


def test_debug_shows_the_traceback() -> None:
    proc = run("measure", "resnet81", "--weights", "none", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_ctrl_c_writes_finished_batches_marked_partial(tmp_path: Path, few_images: Path) -> None:
    marker = tmp_path / "second-batch-started"
    model_file = tmp_path / "slow.py"
    model_file.write_text(
        "import time, torch\n"
        "from pathlib import Path\n"
        "class Slow(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.calls = 0; self.head = torch.nn.Linear(3, 4)\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        f"        if self.calls == 4:  # batch 1 = reference + 2 shifts; this is batch 2\n"
        f"            Path({str(marker)!r}).touch(); time.sleep(60)\n"
        "        return self.head(x.mean(dim=(2, 3)))\n"
        "def build():\n"
        "    return Slow()\n"
    )
    out = tmp_path / "partial.csv"
    proc = subprocess.Popen(
        [*TRANSINV, "measure", f"{model_file}:build", "--data", str(few_images), "--size", "32", "--resize", "40",
         "--shift", "0..2", "--batch-size", "2", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    frame = pd.read_csv(out)
    assert frame["partial"].all()
    assert (frame["n"] == 2).all()  # only the first, finished batch of 2 images
    assert "interrupted" in stderr and "Traceback" not in stderr


def test_plot_compare_and_several_models(tmp_path: Path, few_images: Path) -> None:
    common = ["--weights", "none", "--data", str(few_images), "--size", "32", "--resize", "40", "--shift", "0..2"]
    a, b, figure = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "run.png"
    proc = run("measure", "resnet18", "example:circular_gap", *common, "-o", str(a), "--plot", str(figure))
    assert proc.returncode == 0, proc.stderr
    assert set(pd.read_csv(a)["model"]) == {"resnet18", "example:circular_gap"}
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run("measure", "resnet18", "example:circular_gap", *common, "--antialias", "blurpool", "-o", str(b))
    assert proc.returncode == 0, proc.stderr
    proc = run("compare", str(a), str(b), "-f", "csv")
    assert proc.returncode == 0, proc.stderr
    diff = pd.read_csv(io.StringIO(proc.stdout))
    # BlurPool's blurs become the first layers at strides 8-32 (measured by default) instead of
    # layerN.0.conv1: those rows are only in one file; the outputs and top-level layers are in both
    both = diff[diff["status"] == "both"]
    assert {"output", "layer4"} <= set(both["layer"]) and both["difference"].abs().max() > 0
    replot = tmp_path / "again.png"
    proc = run("plot", str(a), "-o", str(replot), "--layer", "conv1")
    assert proc.returncode == 0 and replot.exists(), proc.stderr
    proc = run("plot", str(a), "-o", str(replot), "--metric", "nonsense")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
