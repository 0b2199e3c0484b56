"""Model and weight loading: the source registry (torchvision names, examples, user factories,
TorchScript), labels, preprocessing notes, checkpoints, the hub cache, and output kinds."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import transinv
from transinv.engine import metrics as M
from transinv.models import outputs
from transinv.options import MeasureOptions
from transinv.plan import prepare_model
from transinv.errors import UserError
from transinv.examples import circular_gap
from transinv.models import LoadedModel, default_preprocess, find_source, load_model, register_source, registry, unique_labels

ROOT = Path(__file__).resolve().parent.parent

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
    assert "net (torchscript) takes no forward hooks: measuring output metrics only" in messages


# -- the source registry ----------------------------------------------------------------------

BUILD = "import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))\n"


@pytest.fixture
def user_files(tmp_path: Path) -> Path:
    """A factory file and a TorchScript archive, the two kinds of user model file."""
    (tmp_path / "mynet.py").write_text(BUILD)
    torch.jit.script(circular_gap()).save(str(tmp_path / "net.pt"))
    return tmp_path


@pytest.mark.parametrize(
    "spec, source, local, label, weights",
    [
        ("resnet18", "torchvision", "resnet18", "resnet18", "none"),
        ("torchvision:resnet18", "torchvision", "resnet18", "resnet18", "none"),
        ("example:valid_conv", "example", "valid_conv", "example:valid_conv", "as-built"),
        ("{dir}/mynet.py:build", "factory", "{dir}/mynet.py:build", "build", "as-built"),
        ("transinv.examples:valid_conv", "factory", "transinv.examples:valid_conv", "valid_conv", "as-built"),
        ("{dir}/net.pt", "torchscript", "{dir}/net.pt", "net", "scripted"),
    ],
)
def test_each_source_resolves_loads_and_labels(user_files: Path, spec, source, local, label, weights) -> None:
    spec, local = spec.format(dir=user_files), local.format(dir=user_files)
    found, as_named = find_source(spec)
    assert (found.name, as_named) == (source, local)
    loaded = load_model(spec, "none")
    assert (loaded.name, loaded.source, loaded.label, loaded.weights) == (spec, source, label, weights)
    assert loaded.output == "classification" and not loaded.module.training
    assert loaded.hooks == (source != "torchscript")
    assert loaded.preprocess == default_preprocess()


def test_random_weights_follow_the_seed() -> None:
    first, again, other = (load_model("example:circular_gap", "none", seed).module for seed in (3, 3, 4))
    assert torch.equal(first[0].weight, again[0].weight) and not torch.equal(first[0].weight, other[0].weight)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet81", "unknown model 'resnet81' (did you mean resnet18"),  # bare: over every source's names
        ("circular_gap", "(did you mean example:circular_gap?)"),
        ("torchvision:resnet81", "unknown torchvision model 'resnet81' (did you mean resnet18"),
        ("example:circular_gapp", "unknown example 'circular_gapp' (did you mean circular_gap"),
        ("transinv.examples:valid_cnv", "transinv.examples has no callable 'valid_cnv' (did you mean valid_conv?)"),
        ("{dir}/mynet.py:biuld", "has no callable 'biuld' (did you mean build?)"),
        ("{dir}/mynet.py", "mynet.py: name the function that builds the model, as {dir}/mynet.py:FACTORY (it defines build)"),
        ("{dir}/mynett.py:build", "model file {dir}/mynett.py not found (did you mean {dir}/mynet.py?)"),
        ("{dir}/mynett.py", "model file {dir}/mynett.py not found (did you mean {dir}/mynet.py?)"),
        ("{dir}/nett.pt", "TorchScript file {dir}/nett.pt not found (did you mean {dir}/net.pt?)"),
        ("no such thing", "use a torchvision classification or segmentation model (resnet18, fcn_resnet50, or torchvision:NAME); example:NAME"),
    ],
)
def test_each_source_says_did_you_mean(user_files: Path, spec: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        load_model(spec.format(dir=user_files), "none")
    assert message.format(dir=user_files) in str(info.value) and "\n" not in str(info.value)


def test_a_state_dict_named_as_the_model_says_to_pass_it_as_weights(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(circular_gap().state_dict(), path)
    with pytest.raises(UserError, match="pass the architecture as MODEL and the file as --weights"):
        load_model(str(path))


def test_a_mistyped_checkpoint_path_says_did_you_mean(tmp_path: Path) -> None:
    torch.save(circular_gap().state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=r"ckpt\.ptt not found \(did you mean .*ckpt\.pt\?\)"):
        load_model("example:circular_gap", str(tmp_path / "ckpt.ptt"))


def test_sources_and_output_kinds_import_without_torch() -> None:
    """Listing sources and resolving specs must not import torch (``transinv --help`` stays fast);
    the package's own ``__init__`` is bypassed, as a lazy one would be."""
    script = textwrap.dedent(
        f"""
        import sys, types
        package = types.ModuleType("transinv")
        package.__path__ = [{str(ROOT / "transinv")!r}]
        sys.modules["transinv"] = package
        from transinv import models
        from transinv.models import outputs
        assert [s.name for s in models.sources()] == ["torchvision", "example", "factory", "torchscript", "timm", "hf", "onnx"]
        specs = ("example:x", "torchvision:x", "a.py:f", "m.n:f", "x.pt", "timm:x", "hf-hub:o/n", "hf:o/n", "transformers:o/n", "x.onnx")
        assert [models.find_source(s)[0].name for s in specs] == [
            "example", "torchvision", "factory", "factory", "torchscript", "timm", "timm", "hf", "hf", "onnx"]
        assert outputs.output_kinds() == ["classification", "embedding", "segmentation"]
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


class ZooSource:
    """A tiny source: ``zoo:NAME`` or a bare ``NAME.zoo``, building constructed networks."""

    name, prefix, hint = "zoo", "zoo", "zoo:NAME"
    models = {"gap": circular_gap}

    def claims(self, spec: str) -> bool:
        return spec.endswith(".zoo")

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        return [f"zoo:{name}" for name in self.models]

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        name = spec.removesuffix(".zoo")
        if name not in self.models:
            raise UserError(f"no zoo model {name!r}")
        torch.manual_seed(seed)
        return LoadedModel(spec, "zoo-weights", self.models[name](), default_preprocess(), label=f"zoo-{name}")


def test_a_new_source_is_one_register_call(monkeypatch: pytest.MonkeyPatch, few_images: Path) -> None:
    monkeypatch.setattr(registry, "_SOURCES", registry.sources())
    register_source(ZooSource())
    loaded = load_model("zoo:gap")
    assert (loaded.name, loaded.source, loaded.label, loaded.weights) == ("zoo:gap", "zoo", "zoo-gap", "zoo-weights")
    assert find_source("gap.zoo")[0].name == "zoo"
    with pytest.raises(UserError, match=r"did you mean zoo:gap\?\); `transinv models` lists them$"):
        load_model("zoo_gap")
    with pytest.raises(UserError, match=r"unknown model 'qqqq': use .*; zoo:NAME$"):  # no near miss: every source
        load_model("qqqq")
    with pytest.raises(ValueError, match="already registered"):
        register_source(ZooSource())
    result = transinv.measure("zoo:gap", data=str(few_images), **TINY)
    assert set(result.rows["weights"]) == {"zoo-weights"} and not result.rows.empty


# -- labels and preprocessing notes -----------------------------------------------------------

NOTE = "build: no preprocessing known for a user model: using {}; pass {} if it was trained otherwise"


@pytest.mark.parametrize(
    "overrides, note",
    [
        (dict(), NOTE.format("ImageNet mean/std, 256 -> 224 bilinear", "--mean/--std/--size")),
        (dict(size=64), ["build: --size 64 views the centre 64 px of each image resized to 256 px; "
                         "--resize 73 keeps the weights' framing (256 -> 224)", NOTE.format("ImageNet mean/std", "--mean/--std")]),
        (dict(mean=(0.5, 0.5, 0.5)), NOTE.format("mean 0.5,0.5,0.5, std 0.229,0.224,0.225, 256 -> 224 bilinear",
                                                      "--mean/--std/--size")),
        (dict(mean=(0.5,) * 3, std=(0.25,) * 3), NOTE.format("256 -> 224 bilinear", "--size")),
        (dict(mean=(0.5,) * 3, std=(0.25,) * 3, resize=300), None),
    ],
)
def test_a_user_model_with_guessed_preprocessing_gets_one_note(user_files: Path, overrides: dict, note) -> None:
    loaded = prepare_model(f"{user_files}/mynet.py:build", MeasureOptions(weights="none", **overrides))
    assert loaded.notes == (note if isinstance(note, list) else [note] if note else [])


def test_only_user_models_and_checkpoints_get_the_note(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(circular_gap().state_dict(), path)
    assert prepare_model("example:circular_gap", MeasureOptions(weights="none")).notes == []
    assert prepare_model("resnet18", MeasureOptions(weights="none")).notes == []
    assert prepare_model("example:circular_gap", MeasureOptions(weights=str(path))).notes[0].startswith("example:circular_gap: no preprocessing known")
    assert prepare_model(nn.Sequential(nn.Flatten()), MeasureOptions()).notes[0].startswith("Sequential: no preprocessing known")


def test_the_note_is_printed_once_per_model_not_per_variant(user_files: Path, few_images: Path) -> None:
    messages: list[str] = []
    transinv.measure(f"{user_files}/mynet.py:build", data=str(few_images), variants="base,padding:circular",
                     warn=messages.append, layers="none", **TINY)
    assert [m for m in messages if "no preprocessing known" in m] == [
        NOTE.format("ImageNet mean/std", "--mean/--std")  # TINY sets the size
    ]


def test_labels_are_short_and_unique(tmp_path: Path) -> None:
    def loaded(spec: str, label: str) -> LoadedModel:
        return LoadedModel(spec, "none", nn.Identity(), default_preprocess(), label=label)

    models = [loaded("a/net.py:build", "build"), loaded("b/net.py:build", "build"), loaded("resnet18", "resnet18"),
              loaded("resnet18", "resnet18")]
    assert unique_labels(models) == ["a/net.py:build", "b/net.py:build", "resnet18", "resnet18#2"]
    assert unique_labels(models[1:3]) == ["build", "resnet18"]


# -- output kinds -----------------------------------------------------------------------------


class Named:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


def test_classification_reads_logits_from_every_common_output() -> None:
    kind = outputs.output_kind("classification")
    z = torch.randn(2, 5)
    for output in (z, Named(z), (z, torch.zeros(1)), [z]):
        assert kind.extract(output) is z
    with pytest.raises(UserError, match=r"shape \(2, 5, 3, 3\); transinv needs logits of shape \(N, classes\)"):
        kind.extract(torch.zeros(2, 5, 3, 3))
    assert kind.extract({"out": z}) is z  # torchvision's dict output, as segmentation models give
    with pytest.raises(UserError, match="returned dict"):
        kind.extract({"features": z})


def test_an_output_kind_is_one_register_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outputs, "_KINDS", dict(outputs._KINDS))
    outputs.register_output_kind(outputs.OutputKind("pooled", "mean over channels", lambda out: out.mean(dim=1)))
    assert outputs.output_kinds() == ["classification", "embedding", "segmentation", "pooled"]
    assert outputs.output_kind("pooled").extract(torch.ones(2, 3)).tolist() == [1.0, 1.0]
    with pytest.raises(UserError, match="did you mean classification"):
        outputs.output_kind("clasification")
