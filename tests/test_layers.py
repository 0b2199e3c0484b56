"""Layer discovery: names per call, strides from shapes, main path, default selection, channels-last maps."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import transinv
from transinv.engine.data import builtin_images_dir
from transinv.errors import UserError
from transinv.engine.layers import FeatureTap, _repeats, probe_layers, select_layers
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
    assert default == ["conv1", "relu", "maxpool", "layer1", "layer2.0.conv1", "layer2", "layer3.0.conv1", "layer3",
                       "layer4.0.conv1", "layer4"]  # bn1's output is changed in place by relu, kept instead


class _Block(nn.Module):
    """An inverted-residual block as in timm's EfficientNet-Lite (a residual add when shapes allow)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = 2 * cin
        self.conv_pw, self.bn1, self.act1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(True)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(mid), nn.ReLU6(True)
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.act2(self.bn2(self.conv_dw(self.act1(self.bn1(self.conv_pw(x))))))))
        return out + x if self.residual else out


class Lite0Like(nn.Module):
    """timm's efficientnet_lite0 layout, small: a stem with a padding module ('same' padding of a
    stride-2 convolution) and every stage inside one ``blocks`` container."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(OrderedDict(pad=nn.ZeroPad2d((0, 1, 0, 1)), conv=nn.Conv2d(3, 8, 3, 2, bias=False),
                                              bn=nn.BatchNorm2d(8), act=nn.ReLU6(inplace=True)))
        widths = [(8, 8, 1), (8, 12, 2), (12, 16, 2), (16, 24, 2), (24, 32, 2)]
        self.blocks = nn.Sequential(*[nn.Sequential(_Block(a, b, s), _Block(b, b, 1)) for a, b, s in widths])
        self.conv_head = nn.Conv2d(32, 64, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.conv_head(self.blocks(self.stem(x)))).flatten(1))


def _strided(stages: str, first: str) -> list[str]:
    """Stages 1-4 (``stages`` formatted with i), each after its strided layer (``first`` formatted with i)."""
    return [name.format(i=i) for i in range(1, 5) for name in (f"{stages}.{first}", stages)]


DEFAULTS = {
    "resnet50": ["conv1", "relu", "maxpool", "layer1", *_strided("layer{i}", "0.conv2")[2:]],
    "regnet_y_400mf": ["stem.0", "stem", *_strided("trunk_output.block{i}", "block{i}-0.f.b.0")],
    "efficientnet_b0": ["features.0.0", "features.0", "features.1", "features.2.0.block.1.0", "features.2",
                        "features.3.0.block.1.0", "features.3", "features.4.0.block.1.0", "features.4", "features.5",
                        "features.6.0.block.1.0", "features.6", "features.7", "features.8"],
    "mobilenet_v3_small": ["features.0.0", "features.0", "features.1.block.0.0", "features.1", "features.2.block.1.0",
                           "features.2", "features.3", "features.4.block.1.0", *[f"features.{i}" for i in range(4, 9)],
                           "features.9.block.1.0", *[f"features.{i}" for i in range(9, 13)]],
    "convnext_tiny": ["features.0.0", *[f"features.{i}" for i in range(8)]],
    "lite0": ["stem.conv", "stem", "blocks.0", *_strided("blocks.{i}", "0.conv_dw"), "conv_head"],
}
BRANCHES = {"resnet50": "layer{}.0.downsample", "regnet_y_400mf": "trunk_output.block{0}.block{0}-0.proj"}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_default_is_stage_outputs_and_strided_main_path_layers(name: str) -> None:
    """Stages and the first main-path layer at each new stride (the stem's convolution included);
    never a padding module, a container of stages, a shortcut or a fixed-size map."""
    module = Lite0Like().eval() if name == "lite0" else load_model(name, "none").module
    probe = probe_layers(module, 64)
    assert probe.path_note is None
    assert [layer.name for layer in probe.layers if layer.default] == DEFAULTS[name]
    by_name = {layer.name: layer for layer in probe.layers}
    strides = [max(by_name[n].stride) for n in DEFAULTS[name]]
    assert strides == sorted(strides) and strides[-1] == 32
    for stage in (2, 3, 4) if name in BRANCHES else ():  # the shortcut's projection runs beside the main path
        branch = BRANCHES[name].format(stage)
        assert not by_name[branch].main and not by_name[f"{branch}.0"].main
        assert by_name[f"{branch}.0"].stride == (2 ** (stage + 1),) * 2  # strided, yet never a default layer
    if name == "lite0":
        assert by_name["stem.pad"].main and not by_name["stem.pad"].default  # padding: never a default layer
        assert by_name["blocks"].main and not by_name["blocks"].default  # the same map as blocks.4


class _ThroughNumpy(nn.Module):
    """A forward pass that leaves torch (through numpy), so its dataflow cannot be followed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, 2, 1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(self.conv(x).numpy())
        return self.head(x.mean(dim=(2, 3)))


def test_an_untraceable_forward_pass_says_so_and_keeps_every_layer_on_the_main_path() -> None:
    probe = probe_layers(_ThroughNumpy(), 32)
    assert probe.path_note and "main path" in probe.path_note
    assert [(layer.name, layer.main, layer.default) for layer in probe.layers] == [("conv", True, True)]
    notes: list[str] = []
    transinv.measure(_ThroughNumpy(), weights="none", data=str(builtin_images_dir()), num_images=1,
                     size=32, resize=40, shift="0..1", warn=notes.append)
    followed = [note for note in notes if "could not be followed" in note]
    assert len(followed) == 1  # one note for the model (the others: guessed preprocessing, small-n intervals)


def test_selection_by_glob_list_and_errors(resnet18_probe) -> None:
    chosen = [layer.name for layer in select_layers(resnet18_probe, "layer3.*.conv1,conv1")]
    assert chosen == ["conv1", "layer3.0.conv1", "layer3.1.conv1"]
    assert select_layers(resnet18_probe, "none") == []
    everything = {layer.name for layer in select_layers(resnet18_probe, "all")}
    assert everything | resnet18_probe.repeats == {layer.name for layer in resnet18_probe.layers}
    assert "layer1" in everything and not {"layer1.1", "layer1.1.relu#2"} & everything  # one map, one name
    with pytest.raises(UserError, match="layer3"):
        select_layers(resnet18_probe, "layer33")


def test_all_lists_each_map_once_leaving_out_identities_and_containers_that_repeat_a_child() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(), nn.Identity(),
                        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()), nn.AdaptiveAvgPool2d(1)).eval()
    probe = probe_layers(net, 32)
    # "1", "2", "3" return one tensor (eval-mode Dropout and Identity pass it on): one name, the one the
    # default selection gives it (the last stage returning it); "4" returns its child "4.1"'s map
    assert probe.repeats == {"1", "2", "4.1"}
    assert [layer.name for layer in select_layers(probe, "all")] == ["0", "3", "4.0", "4", "5"]
    assert [layer.name for layer in select_layers(probe, "1,2")] == ["1", "2"]  # still there by name
    # not a default layer: the outermost container returning the map, else the module that made it
    same, other = (1, 0), (2, 0)
    assert _repeats([("a.0", same), ("a.1", same), ("a", same), ("b", other), ("c", other)], set()) == {"a.0", "a.1", "c"}


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
