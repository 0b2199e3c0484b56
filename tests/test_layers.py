"""Layer discovery: names per call, strides from shapes, default selection, channels-last maps."""

from __future__ import annotations

import pytest
import torch

import transinv
from transinv.errors import UserError
from transinv.layers import FeatureTap, probe_layers, select_layers
from transinv.models import load_model


@pytest.fixture(scope="module")
def resnet18_probe():
    return probe_layers(load_model("resnet18", "none").module, 224)


def test_resnet18_stage_strides(resnet18_probe) -> None:
    strides = {layer.name: layer.stride for layer in resnet18_probe.layers}
    assert [strides[n][0] for n in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")] == [2, 4, 4, 8, 16, 32]
    frame = transinv.list_layers("resnet18")
    stage = frame.set_index("layer").loc[["conv1", "maxpool", "layer2", "layer3", "layer4"], "stride"]
    assert stage.tolist() == [2, 4, 8, 16, 32]


def test_reused_module_gets_one_layer_per_call(resnet18_probe) -> None:
    names = [layer.name for layer in resnet18_probe.layers]
    assert "layer1.0.relu" in names and "layer1.0.relu#2" in names
    assert len(names) == len(set(names))


def test_default_selection_is_readable(resnet18_probe) -> None:
    default = [layer.name for layer in select_layers(resnet18_probe, "default")]
    assert 5 <= len(default) <= 15
    assert {"conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"} <= set(default)
    assert "bn1" not in default  # its output is changed in place by relu, which is kept instead


def test_selection_by_glob_list_and_errors(resnet18_probe) -> None:
    chosen = [layer.name for layer in select_layers(resnet18_probe, "layer3.*.conv1,conv1")]
    assert chosen == ["conv1", "layer3.0.conv1", "layer3.1.conv1"]
    assert select_layers(resnet18_probe, "none") == []
    assert len(select_layers(resnet18_probe, "all")) == len(resnet18_probe.layers)
    with pytest.raises(UserError, match="layer3"):
        select_layers(resnet18_probe, "layer33")


def test_channels_last_maps_are_recognised() -> None:
    probe = probe_layers(load_model("swin_t", "none").module, 224)
    stage = {layer.name: layer for layer in probe.layers}["features.1"]
    assert stage.channels_last and stage.stride == (4, 4) and stage.channels == 96


def test_hooks_are_removed_and_in_place_ops_do_not_corrupt_captures() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(inplace=True))
    captured = {}
    with FeatureTap(model, ["0"], lambda name, t: captured.setdefault(name, t.clone())):
        model(torch.randn(1, 3, 8, 8))
    assert (captured["0"] < 0).any()  # the conv output before the in-place ReLU
    assert all(not m._forward_hooks for m in model.modules())


def test_too_small_input_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="--size"):
        transinv.list_layers("inception_v3", size=32)


def test_strides_are_measured_from_two_sizes_not_guessed() -> None:
    """Unpadded layers (inception at 299 px) and adaptive pooling must not skew strides."""
    inception = {layer.name: layer for layer in probe_layers(load_model("inception_v3", "none").module, 299).layers}
    assert [inception[n].stride[0] for n in ("Conv2d_1a_3x3", "maxpool1", "maxpool2", "Mixed_6a", "Mixed_7c")] == [
        2, 4, 8, 16, 32]
    vgg = {layer.name: layer for layer in probe_layers(load_model("vgg11_bn", "none").module, 64).layers}
    assert vgg["avgpool"].fixed and not vgg["avgpool"].default and not vgg["avgpool"].aligned((32, 0))


def test_every_stage_of_a_sequential_network_is_in_the_default() -> None:
    for name in ("densenet121", "convnext_tiny", "mobilenet_v3_small"):
        default = [layer for layer in probe_layers(load_model(name, "none").module, 64).layers if layer.default]
        assert {layer.stride[0] for layer in default} >= {4, 8, 16, 32}, name
        assert not any(layer.height == 1 for layer in default), name  # squeeze-excitation vectors are not maps


def test_channels_last_is_found_even_when_channels_equal_height() -> None:
    probe = probe_layers(load_model("swin_t", "none").module, 384)  # stage 1 is (N, 96, 96, 96)
    stage = {layer.name: layer for layer in probe.layers}["features.1"]
    assert stage.channels_last and stage.stride == (4, 4)
