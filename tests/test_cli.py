"""The CLI as a user runs it: stdout as data, one-line errors, Ctrl-C after finished batches.

Commands run in-process through ``cli.main`` (the console-script entry) with ``sys.argv`` set, so
the suite stays fast; one bad-input case and the real SIGINT run as subprocesses.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import transinv
from transinv import cli
from transinv.reports.results import COLUMNS

TRANSINV = [sys.executable, "-m", "transinv"]
OUTPUT_METRICS = {"top1_agreement", "kl_divergence", "prob_change", "accuracy", "worst_case_accuracy", "jaggedness", "path_prob_change",
                  "worst_case_agreement"}


@pytest.fixture
def cli_run(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """Run ``transinv ARGS...`` in this process: (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["transinv", *args])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_measure_on_labelled_photos_writes_clean_csv(cli_run, imagenet_sample: Path) -> None:
    code, out, err = cli_run("measure", "resnet18", "--weights", "none", "--shift", "0..8", "--data",
                             str(imagenet_sample), "--num-images", "8", "--size", "64", "--resize", "80")
    assert code == 0, err
    frame = pd.read_csv(io.StringIO(out))
    assert list(frame.columns) == COLUMNS
    out_rows = frame[frame["layer"] == "output"]
    assert set(out_rows["metric"]) == OUTPUT_METRICS
    assert (out_rows["n"] == 8).all() and sorted(out_rows["shift_x"].dropna().unique()) == list(range(9))
    assert {"conv1", "layer4"} <= set(frame["layer"])
    assert all(line.startswith("warning: ") for line in err.splitlines())  # warnings only, on stderr


def test_json_and_output_file(cli_run, tmp_path: Path, few_images: Path) -> None:
    common = ["example:circular_gap", "--weights", "none", "--data", str(few_images), "--size", "32", "--resize", "40",
              "--shift", "0..2", "--mode", "circular"]
    target = tmp_path / "out" / "run.json"
    code, out, err = cli_run("measure", *common, "-o", str(target))
    assert code == 0, err
    assert out == ""  # the file got the data; a non-terminal stdout gets nothing more
    doc = json.loads(target.read_text())
    assert doc["settings"]["mode"] == "circular" and doc["summary"]["images"] == 6
    assert {"torch", "torchvision", "transinv"} <= set(doc["versions"])
    assert len(doc["rows"]) > 0 and set(doc["rows"][0]) == set(COLUMNS)
    code, out, err = cli_run("measure", *common, "--format", "json")
    assert code == 0 and json.loads(out)["rows"] == doc["rows"]


def test_yes_no_options_turn_off_with_their_no_flag(cli_run, few_images: Path) -> None:
    """An option on by default (--cuda-graphs) has a --no- flag; one decided by the machine by
    default (--prefetch: None) takes either flag; the settings record what was asked."""
    common = ["example:circular_gap", "--weights", "none", "--data", str(few_images), "--size", "32", "--resize", "40",
              "--shift", "0..1", "--layers", "none", "--format", "json"]
    code, out, err = cli_run("measure", *common)
    assert code == 0, err
    assert (json.loads(out)["settings"]["prefetch"], json.loads(out)["settings"]["cuda_graphs"]) == (None, True)
    code, out, err = cli_run("measure", *common, "--prefetch")
    assert code == 0, err
    assert json.loads(out)["settings"]["prefetch"] is True
    code, out, err = cli_run("measure", *common, "--no-prefetch", "--no-cuda-graphs")
    assert code == 0, err
    assert (json.loads(out)["settings"]["prefetch"], json.loads(out)["settings"]["cuda_graphs"]) == (False, False)


def test_layers_command_lists_strides_default_and_main_path(cli_run) -> None:
    code, out, err = cli_run("layers", "resnet18", "--size", "64", "--format", "csv")
    assert code == 0, err
    frame = pd.read_csv(io.StringIO(out)).set_index("layer")
    assert list(frame.columns) == ["shape", "stride", "channels_last", "default", "main_path"]
    assert frame.loc[["conv1", "maxpool", "layer2", "layer3", "layer4"], "stride"].tolist() == [2, 4, 8, 16, 32]
    assert frame.index[frame["default"]].tolist() == ["conv1", "relu", "maxpool", "layer1", "layer2.0.conv1", "layer2",
                                                      "layer3.0.conv1", "layer3", "layer4.0.conv1", "layer4"]
    branches = frame.index[~frame["main_path"]].tolist()
    assert branches == [f"layer{i}.0.downsample{part}" for i in (2, 3, 4) for part in (".0", ".1", "")] + ["avgpool"]


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
        (["measure", "resnet18", "--weights", "none", "--precision", "fp61"], "--precision must be one of fp32, bf16, fp16 (got 'fp61') (did you mean fp16?)"),
        (["measure", "resnet18", "--weights", "none", "--shift", "0..64"], "--resize"),
        (["measure", "resnet18", "--weights", "none", "--data", "/no/such/folder"], "no such file"),
        (["measure", "resnet18", "--weights", "none", "--data", "{empty}"], "no images"),
        (["measure", "resnet18", "--weights", "{garbage}"], "cannot load checkpoint"),
        (["measure", "resnet18", "--weights", "IMAGENET1K_V1", "--mean", "0.5,0.5"], "three numbers"),
        (["measure", "example:valid_conv", "--weights", "IMAGENET1K_V1"], "factory"),
        (["measure", "resnet18", "--weights", "none", "--direction", "up"], "--direction"),
        (["measure", "resnet18", "--weights", "none", "--layer-metrics", "inplace"],
         "--layer-metrics takes equivariance_error"),
        (["measure", "resnet18", "--weights", "none", "--layers", "layer9"], "no layer matches"),
        (["measure", "resnet18", "--weights", "none", "--shfit", "3"], "No such option"),
        (["measure", "resnet18", "--weights", "none", "--device", "tpu"], "--device"),
        (["measure", "resnet18"], "--weights none"),
        (["layers", "inception_v3", "--size", "32"], "--size"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(cli_run, args: list[str], needle: str, bad_files: dict[str, Path]) -> None:
    code, out, err = cli_run(*[a.format(**bad_files) for a in args])
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert needle.lower() in lines[0].lower() and "Traceback" not in err
    assert out == ""


def test_bad_input_in_a_real_process_is_one_line_and_exit_code_2() -> None:
    proc = subprocess.run([*TRANSINV, "measure", "resnet81", "--weights", "none"], capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(lines) == 1 and "did you mean resnet18" in lines[0], proc.stderr


def test_debug_shows_the_traceback(cli_run) -> None:
    code, _, err = cli_run("measure", "resnet81", "--weights", "none", "--debug")
    assert code == 2 and "Traceback" in err and "UserError" in err


SMALL = dict(weights="none", size=32, resize=40, shift="0..2", seed=0)


def test_library_interrupt_keeps_exactly_the_finished_batches(few_images: Path) -> None:
    """Ctrl-C (here raised by the progress callback once the first batch of 2 is done) leaves that
    batch: the rows are those of a clean run on its 2 images, marked partial."""

    def start(total: int, done: int):
        def advance(images: int) -> None:
            raise KeyboardInterrupt

        return advance

    result = transinv.measure("resnet18", data=str(few_images), batch_size=2, progress=start, **SMALL)
    assert result.partial and result.summary["images"] == 2
    assert result.rows["partial"].all() and (result.rows["n"] == 2).all()
    first_two = [str(p) for p in sorted(few_images.iterdir())[:2]]
    clean = transinv.measure("resnet18", data=first_two, batch_size=2, **SMALL)
    assert not clean.partial and len(clean.rows) == len(result.rows) > 50
    pd.testing.assert_frame_equal(result.rows.drop(columns="partial"), clean.rows.drop(columns="partial"))


SLOW_MODEL = """
import time, torch
from pathlib import Path

class Slow(torch.nn.Module):
    '''Sleeps at the first forward pass of the second batch (batches of 2 images; the layer probe's
    passes hold 1 image and are not counted), after touching a marker file.'''

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.Linear(4, 5)

    def forward(self, x):
        if x.shape[0] >= 2:
            self.calls += 1
            if self.calls == 4:  # batch 1 = passes 1-3 (shifts 0, 1, 2)
                Path({marker!r}).touch()
                time.sleep(60)
        return self.head(self.conv(x).mean(dim=(2, 3)))

def build():
    torch.manual_seed(0)
    return Slow()
"""


def test_ctrl_c_writes_the_finished_batches_marked_partial(tmp_path: Path, few_images: Path) -> None:
    marker = tmp_path / "second-batch-started"
    model_file = tmp_path / "slow.py"
    model_file.write_text(SLOW_MODEL.format(marker=str(marker)))
    out = tmp_path / "partial.csv"
    proc = subprocess.Popen(
        [*TRANSINV, "measure", f"{model_file}:build", "--data", str(few_images), "--size", "32", "--resize", "40",
         "--shift", "0..2", "--batch-size", "2", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stdout == "" and "interrupted" in stderr and "Traceback" not in stderr
    frame = pd.read_csv(out)
    assert frame["partial"].all() and (frame["n"] == 2).all()
    first_two = [str(p) for p in sorted(few_images.iterdir())[:2]]
    clean = transinv.measure(f"{model_file}:build", data=first_two, size=32, resize=40, shift="0..2").rows
    clean = pd.read_csv(io.StringIO(clean.to_csv(index=False)))
    assert len(frame) == len(clean) > 10
    pd.testing.assert_frame_equal(frame.drop(columns="partial"), clean.drop(columns="partial"))


def test_plot_compare_and_several_models(cli_run, tmp_path: Path, few_images: Path) -> None:
    common = ["--weights", "none", "--data", str(few_images), "--size", "32", "--resize", "40", "--shift", "0..2"]
    a, b, figure = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "run.png"
    code, _, err = cli_run("measure", "resnet18", "example:circular_gap", *common, "-o", str(a), "--plot", str(figure))
    assert code == 0, err
    assert set(pd.read_csv(a)["model"]) == {"resnet18", "example:circular_gap"}
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = cli_run("measure", "resnet18", "example:circular_gap", *common, "--antialias", "blurpool",
                           "-o", str(b))
    assert code == 0, err
    code, out, err = cli_run("compare", str(a), str(b), "-f", "csv")
    assert code == 0, err
    diff = pd.read_csv(io.StringIO(out))
    # BlurPool's blurs become the first layers at strides 8-32 (measured by default) instead of
    # layerN.0.conv1: those rows are only in one file; the outputs and top-level layers are in both
    both = diff[diff["status"] == "both"]
    assert {"output", "layer4"} <= set(both["layer"]) and both["difference"].abs().max() > 0
    replot = tmp_path / "again.png"
    code, _, err = cli_run("plot", str(a), "-o", str(replot), "--layer", "conv1")
    assert code == 0 and replot.exists(), err
    code, _, err = cli_run("plot", str(a), "-o", str(replot), "--metric", "nonsense")
    assert code == 2 and len(err.strip().splitlines()) == 1
