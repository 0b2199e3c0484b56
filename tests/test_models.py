"""Model and weight loading: torchvision names, user factories, TorchScript, checkpoints, cache."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision

import transinv
from transinv import metrics as M
from transinv.errors import UserError
from transinv.examples import circular_gap
from transinv.models import load_model

TINY = dict(size=32, resize=40, shift="0..1", num_images=2)


@pytest.mark.parametrize(
    "name, size",
    [
        ("resnet18", 64),
        ("vgg11_bn", 64),
        ("mobilenet_v3_small", 64),
        ("efficientnet_b0", 64),
        ("convnext_tiny", 64),
        ("densenet121", 64),
        ("regnet_y_400mf", 64),
        ("shufflenet_v2_x0_5", 64),
        ("squeezenet1_1", 64),
        ("vit_b_16", 224),
    ],
)
def test_torchvision_models_measure(few_images: Path, name: str, size: int) -> None:
    messages: list[str] = []
    result = transinv.measure(
        name, weights="none", data=str(few_images), size=size, resize=size + 8, shift="0..2", num_images=2,
        batch_size=2, warn=messages.append,
    )
    out = result.output()
    assert (out[out["metric"] == M.TOP1_AGREEMENT]["n"] == 2).all()
    layers = result.rows[result.rows["layer"] != M.OUTPUT_LAYER]
    assert len(set(layers["layer"])) >= 1  # every model has at least one spatial map (vit: conv_proj)
    if name == "vit_b_16":
        assert any("token" in m for m in messages)


def test_typo_suggests_the_name() -> None:
    with pytest.raises(UserError, match="did you mean resnet18"):
        load_model("resnet81", "none")


def test_unknown_weights_name_lists_the_choices() -> None:
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        load_model("resnet18", "IMAGENET9K")


def test_missing_pretrained_weights_say_where_torchvision_looks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as info:
        load_model("resnet18", "DEFAULT")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights none" in message and "\n" not in message


def test_cached_pretrained_weights_load_offline_with_their_preprocessing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, cache / "mobilenet_v3_small-047dcff4.pth")
    loaded = load_model("mobilenet_v3_small", "DEFAULT")
    assert loaded.weights == "IMAGENET1K_V1"
    assert loaded.preprocess.size == 224 and loaded.preprocess.resize == 256
    assert torch.equal(loaded.module.state_dict()["classifier.3.weight"], state["classifier.3.weight"])


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "ddp"])
def test_checkpoints_load_in_every_common_layout(tmp_path: Path, wrap: str) -> None:
    state = circular_gap().state_dict()
    obj = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    loaded = load_model("example:circular_gap", str(path))
    assert torch.equal(loaded.module.state_dict()["0.weight"], state["0.weight"])


def test_mismatched_checkpoint_is_one_line_naming_keys(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError) as info:
        load_model("resnet34", str(path))
    assert "unexpected" in str(info.value) or "missing" in str(info.value)
    assert "\n" not in str(info.value)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Evil()}, handle)
    with pytest.raises(UserError, match="weights_only"):
        load_model("example:circular_gap", str(path))


def test_user_model_file_and_module_factories(tmp_path: Path, few_images: Path) -> None:
    source = tmp_path / "mynet.py"
    source.write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),"
        " torch.nn.Flatten(), torch.nn.Linear(4, 5))\n"
    )
    result = transinv.measure(f"{source}:build", data=str(few_images), layers="0", **TINY)
    assert set(result.rows["layer"]) == {"0", M.OUTPUT_LAYER}
    assert set(result.rows["weights"]) == {"as-built"}
    result = transinv.measure("transinv.examples:valid_conv", data=str(few_images), **TINY)
    assert not result.rows.empty
    with pytest.raises(UserError, match="no callable"):
        load_model(f"{source}:missing")


def test_torchscript_file_measures_output(tmp_path: Path, few_images: Path) -> None:
    path = tmp_path / "net.pt"
    torch.jit.script(circular_gap()).save(str(path))
    messages: list[str] = []
    result = transinv.measure(str(path), data=str(few_images), warn=messages.append, **TINY)
    assert set(result.rows["layer"]) == {M.OUTPUT_LAYER}
    assert any("TorchScript" in m for m in messages)
