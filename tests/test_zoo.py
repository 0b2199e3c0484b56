"""Model sources from optional extras (timm, Hugging Face transformers, ONNX Runtime), detection
models, and ``transinv models``. Each extra's tests skip only when that extra is not installed;
none needs the network (hub caches are built in temporary folders)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import transinv
from transinv.engine import metrics as M
from transinv.engine.data import builtin_images_dir, load_canvas
from transinv.engine.layers import probe_layers
from transinv.errors import UserError
from transinv.models import list_models, load_model
from transinv.models.loaded import resizer

TINY = dict(size=32, resize=36, shift="0..2", num_images=3, batch_size=4)  # on 3 of the built-in photos
ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def transinv_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transinv", *args], capture_output=True, text=True, timeout=300)


def output_values(result: transinv.Result) -> pd.Series:
    """The output rows' values, indexed by what identifies a row apart from the model."""
    out = result.output()
    return out.set_index(["metric", "shift_x", "shift_y"])["value"].sort_index()


# --- without the extras -------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, spec, extra",
    [("timm", "timm:resnet18", "timm"), ("timm", "hf-hub:timm/resnet18.a1_in1k", "timm"),
     ("transformers", "hf:org/name", "hf"), ("transformers", "transformers:org/name", "hf"), ("onnxruntime", "ONNX", "onnx")],
)
def test_a_missing_extra_is_one_line_saying_how_to_install_it(tmp_path: Path, monkeypatch, module: str, spec: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    if spec == "ONNX":
        spec = str(tmp_path / "net.onnx")
        Path(spec).write_bytes(b"not read before the import")
    with pytest.raises(UserError) as info:
        load_model(spec, "none")
    assert str(info.value) == str(info.value).strip() and "\n" not in str(info.value)
    assert f"{module} is not installed" in str(info.value) and f"pip install 'transinv[{extra}]'" in str(info.value)


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
                                  "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "torchvision:ssd300_vgg16"])
def test_torchvision_detection_models_are_not_supported_yet(name: str) -> None:
    with pytest.raises(UserError, match=r"detection models are not supported yet"):
        load_model(name, "none")


def test_models_lists_torchvision_names_with_their_weights() -> None:
    proc = transinv_cli("models", "resnet*", "--source", "torchvision", "-f", "csv")
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(io.StringIO(proc.stdout))
    expected = [n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("resnet")]
    assert list(frame.columns) == ["source", "name", "pretrained"]
    assert sorted(frame["name"]) == sorted(expected) and set(frame["source"]) == {"torchvision"}
    assert frame["pretrained"].all()  # every torchvision ResNet has weights


def test_models_leave_out_a_source_whose_extra_is_missing_with_one_note(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    notes: list[str] = []
    rows = list_models("resnet18", skipped=notes.append)
    assert ("torchvision", "resnet18", True) in rows and all(source != "timm" for source, _, _ in rows)
    assert any("pip install 'transinv[timm]'" in note for note in notes)
    with pytest.raises(UserError, match=r"transinv\[timm\]"):
        list_models("resnet18", "timm")


def test_models_pretrained_filter_and_errors() -> None:
    rows = list_models("example:*", "example")
    assert rows and all(not pretrained for _, _, pretrained in rows)
    assert list_models("example:*", "example", pretrained=True) == []
    with pytest.raises(UserError, match="did you mean timm"):
        list_models("*", "timn")
    proc = transinv_cli("models", "no_such_model_*", "--source", "torchvision")
    assert proc.returncode == 2 and "no model names match" in proc.stderr


def test_each_extra_installs_with_one_command() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, module in (("timm", "timm"), ("hf", "transformers"), ("onnx", "onnxruntime")):
        assert any(req.startswith(module) for req in extras[extra])  # what the missing-extra line names
    assert extras["all"] == ["transinv[timm,hf,onnx]"]
    recipe = (ROOT / "Makefile").read_text().split("\ntest-all:")[1].split("\n\n")[0]
    assert "pip install --quiet -e '.[test,all]'" in recipe and recipe.index("pip install") < recipe.index("pytest")


# --- timm -----------------------------------------------------------------------------------


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache of this test's own."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


def cache_files(hub: Path, repo: str, files: dict[str, bytes]) -> None:
    """Put ``files`` in the hub cache as a download of ``repo``'s main branch leaves them."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        (root / "snapshots" / COMMIT / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / COMMIT / name).write_bytes(data)


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


@pytest.mark.parametrize("name", ["test_convnext.r160_in1k", "resnet18.tv_in1k", "test_vit.r160_in1k"])
def test_timm_preprocessing_is_timms_eval_transform(timm, name: str) -> None:
    loaded = load_model(f"timm:{name}", "none")
    config = timm.data.resolve_data_config({}, model=loaded.module)
    resize, crop, _, normalize = timm.data.create_transform(**config).transforms
    pre = loaded.preprocess
    assert resize.size == pre.resize and tuple(crop.size) == (pre.size, pre.size)  # floor(size / crop_pct), size
    assert resize.interpolation == pre.interpolation
    assert normalize.mean.tolist() == pytest.approx(list(pre.mean)) and normalize.std.tolist() == pytest.approx(list(pre.std))
    assert loaded.label == name and loaded.weights == "none" and loaded.source == "timm"
    image = builtin_images_dir() / "chelsea.jpg"
    theirs = timm.data.create_transform(**config)(Image.open(image).convert("RGB"))
    ours = load_canvas(image, pre, pre.size)  # the reference view: timm's eval image up to one grey level
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1.01 / 255 / min(pre.std)


def test_timm_crop_pct_gives_the_resize(timm) -> None:
    pre = load_model("timm:test_convnext", "none").preprocess  # crop_pct 0.95 at 160 px: floor(168.42)
    assert (pre.resize, pre.size) == (168, 160) and pre.mean == (0.5, 0.5, 0.5)
    pre = load_model("timm:resnet18.tv_in1k", "none").preprocess  # 0.875 at 224: torchvision's 256
    assert (pre.resize, pre.size, pre.interpolation.value) == (256, 224, "bilinear")


def test_timm_random_weights_are_timms_own_seeded_build(timm) -> None:
    loaded = load_model("timm:test_convnext", "none", seed=3)
    torch.manual_seed(3)
    own = timm.create_model("test_convnext", pretrained=False).state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.module.state_dict().items())
    other = load_model("timm:test_convnext", "none", seed=4).module.state_dict()
    assert not torch.equal(other["stem.0.weight"], own["stem.0.weight"])


def test_timm_pretrained_weights_come_from_the_hub_cache_offline(timm, hf_home: Path) -> None:
    torch.manual_seed(11)
    state = timm.create_model("test_convnext").state_dict()
    with pytest.raises(UserError) as info:
        load_model("timm:test_convnext.r160_in1k", "DEFAULT")
    message = str(info.value)
    assert str(hf_home / "models--timm--test_convnext.r160_in1k") in message and "--weights none" in message
    assert "\n" not in message
    cache_files(hf_home, "timm/test_convnext.r160_in1k", {"model.safetensors": safetensors_bytes(state)})
    for spec in ("timm:test_convnext.r160_in1k", "timm:test_convnext"):  # the default tag is r160_in1k
        loaded = load_model(spec, "DEFAULT")
        assert loaded.weights == "r160_in1k"
        assert all(torch.equal(v, state[k]) for k, v in loaded.module.state_dict().items())


def test_timm_hf_hub_ids_read_config_and_weights_from_the_cache(timm, hf_home: Path) -> None:
    repo = "someone/tiny-convnext"
    with pytest.raises(UserError, match=r"its config is not in the local cache \(.*models--someone--tiny-convnext\)"):
        load_model(f"hf-hub:{repo}", "none")
    torch.manual_seed(5)
    state = timm.create_model("test_convnext", num_classes=7).state_dict()
    config = {"architecture": "test_convnext", "num_classes": 7,
              "pretrained_cfg": {"input_size": [3, 64, 64], "crop_pct": 0.8, "interpolation": "bilinear",
                                 "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "num_classes": 7}}
    cache_files(hf_home, repo, {"config.json": json.dumps(config).encode(), "model.safetensors": safetensors_bytes(state)})
    for spec in (f"hf-hub:{repo}", f"timm:hf-hub:{repo}"):
        loaded = load_model(spec, "DEFAULT")
        assert loaded.label == "tiny-convnext" and loaded.module(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
        assert all(torch.equal(v, state[k]) for k, v in loaded.module.state_dict().items())
        pre = loaded.preprocess
        assert (pre.resize, pre.size, pre.interpolation.value) == (80, 64, "bilinear")
        assert pre.mean == (0.1, 0.2, 0.3) and pre.std == (0.4, 0.5, 0.6)


def test_timm_checkpoint_and_bad_names(timm, tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = timm.create_model("test_convnext").state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state}, path)
    loaded = load_model("timm:test_convnext", str(path))
    assert torch.equal(loaded.module.state_dict()["stem.0.weight"], state["stem.0.weight"])
    assert loaded.weights == str(path) and loaded.preprocess_guessed
    with pytest.raises(UserError, match="did you mean test_convnext"):
        load_model("timm:test_convnxt", "none")
    with pytest.raises(UserError, match="did you mean test_convnext.r160_in1k"):
        load_model("timm:test_convnext.r160_in1kk", "none")
    with pytest.raises(UserError, match="no pretrained weights"):
        load_model("timm:test_vit4", "DEFAULT")
    with pytest.raises(UserError, match="choose pretrained weights by tag"):
        load_model("timm:test_convnext", "IMAGENET1K_V1")


def test_timm_measures_like_the_same_module_given_directly(timm) -> None:
    messages: list[str] = []
    result = transinv.measure("timm:resnet18.tv_in1k", weights="none", seed=1, warn=messages.append, **TINY)
    assert set(result.rows["model"]) == {"resnet18.tv_in1k"} and set(result.rows["weights"]) == {"none"}
    assert len(set(result.rows["layer"])) > 2  # timm modules take hooks: layers are measured
    assert result.settings["per_model"]["resnet18.tv_in1k"]["preprocess"]["interpolation"] == "bilinear"
    torch.manual_seed(1)
    module = timm.create_model("resnet18.tv_in1k")  # given directly: ImageNet mean/std, bilinear, as timm's config
    given = transinv.measure(module, **TINY)
    pd.testing.assert_series_equal(output_values(result), output_values(given))


def test_timm_models_listing(timm) -> None:
    rows = list_models("*test_convnext*", "timm")
    names = {name: pretrained for _, name, pretrained in rows}
    assert names["timm:test_convnext"] and names["timm:test_convnext.r160_in1k"]
    assert set(timm.list_models("test_convnext*")) == {n.removeprefix("timm:") for n in names if "." not in n}
    assert any("dinov3" in name for _, name, _ in list_models("convnext_tiny*", "timm"))  # encoders too
    assert "timm:test_vit4" not in {name for _, name, _ in list_models("test_vit*", "timm", pretrained=True)}
    assert load_model("timm:convnext_tiny.dinov3_lvd1689m", "none").output == "embedding"  # num_classes=0
    assert load_model("timm:test_convnext", "none").output == "classification"


def _blocks(pattern: str, strides: list[int], depth: int = 2) -> dict[str, int]:
    """Block name -> stride, for ``depth`` blocks in each stage (``pattern`` takes the stage and the block)."""
    return {pattern.format(i, j): stride for i, stride in enumerate(strides) for j in range(depth)}


# tiny configs of each family (two blocks a stage), built for the size measured
TRANSFORMERS = [
    pytest.param("swin_tiny_patch4_window7_224", dict(embed_dim=16, num_heads=(1, 1, 1, 1)), 64,
                 _blocks("layers.{}.blocks.{}", [4, 8, 16, 32]), "NHWC", id="swin"),
    pytest.param("maxvit_pico_rw_256", dict(depths=(2, 2, 2, 2), embed_dim=(32, 32, 32, 32)), 64,
                 _blocks("stages.{}.blocks.{}", [4, 8, 16, 32]), "NCHW", id="maxvit"),
    pytest.param("beit_base_patch16_224", dict(depth=2, embed_dim=32, num_heads=2), 64,
                 _blocks("blocks.{1}", [16]), "1 token (class)", id="beit"),
    pytest.param("eva02_tiny_patch14_224", dict(depth=2), 56, _blocks("blocks.{1}", [14]), "1 token (class)", id="eva02"),
    pytest.param("deit_tiny_distilled_patch16_224", dict(depth=2), 64, _blocks("blocks.{1}", [16]),
                 "2 tokens (class, distillation)", id="deit"),
    pytest.param("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=32, num_heads=2), 56,
                 _blocks("blocks.{1}", [14]), "5 tokens (class, 4 register)", id="dinov2-registers"),
    pytest.param("vit_base_patch16_clip_224", dict(depth=2, embed_dim=32, num_heads=2), 64,
                 _blocks("blocks.{1}", [16]), "1 token (class)", id="clip"),
]


@pytest.mark.parametrize("arch, config, size, blocks, dropped", TRANSFORMERS)
def test_timm_transformer_blocks_are_measured_on_their_grid_at_their_stride(
        timm, arch: str, config: dict, size: int, blocks: dict[str, int], dropped: str) -> None:
    """``dropped``: the leading tokens dropped, or the layout of a hierarchical model's blocks."""
    torch.manual_seed(0)
    module = timm.create_model(arch, img_size=size, **config).eval()
    probe = probe_layers(module, size, resize=resizer(module))  # as measure does: probed at a second size too
    assert not [layer.name for layer in probe.layers if "softmax" in layer.name or "attn_drop" in layer.name]
    found = {layer.name: layer.stride for layer in probe.layers if layer.default and layer.name in blocks}
    assert found == {name: (stride, stride) for name, stride in blocks.items()}  # every block, by default
    if dropped in ("NHWC", "NCHW"):  # hierarchical: maps, no tokens (Swin's blocks are channels-last, MaxViT's not)
        assert {(layer.channels_last, layer.tokens) for layer in probe.layers if layer.name in blocks} == {
            (dropped == "NHWC", None)}
    else:
        assert f"the leading {dropped} dropped" in probe.token_note
    shift = max(blocks.values())
    result = transinv.measure(module, shift=f"0,{shift}", layers=",".join(blocks), mode="circular", size=size,
                              resize=size + 8, num_images=2, batch_size=2)
    rows = result.rows[(result.rows["shift_x"] == shift) & result.rows["layer"].isin(blocks)]
    for metric in (M.EQUIVARIANCE_ERROR, M.POOLED_INVARIANCE_ERROR):
        measured = rows[rows["metric"] == metric].set_index("layer")
        assert dict(measured["stride"]) == blocks and (measured["n"] == 2).all()
        assert measured["value"].notna().all()


def test_timm_models_built_for_one_size_are_rebuilt_for_the_size_asked(timm) -> None:
    from transinv.options import MeasureOptions
    from transinv.plan import prepare_model

    loaded = prepare_model("timm:vit_tiny_patch16_224", MeasureOptions(weights="none", size=64).validate())
    assert loaded.preprocess.size == 64 and loaded.module.patch_embed.img_size == (64, 64)
    assert any("built for 224 px inputs, rebuilt for 64 px" in note for note in loaded.notes)
    layers = transinv.list_layers("timm:vit_tiny_patch16_224", size=64).set_index("layer")
    assert layers.loc["blocks.11", "shape"] == "192x4x4" and layers.loc["blocks.11", "stride"] == 16
    native = prepare_model("timm:vit_tiny_patch16_224", MeasureOptions(weights="none").validate())
    assert native.module.patch_embed.img_size == (224, 224) and not any("rebuilt" in note for note in native.notes)
    cnn = prepare_model("timm:test_convnext", MeasureOptions(weights="none", size=64).validate())
    assert cnn.set_size is None and not any("rebuilt" in note for note in cnn.notes)  # takes any size as it is


# --- Hugging Face transformers --------------------------------------------------------------


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture
def tiny_convnext(transformers, tmp_path: Path) -> tuple[Path, nn.Module]:
    """A tiny ConvNeXt classifier with its image processor, saved as save_pretrained writes them."""
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(config).eval()
    folder = tmp_path / "tiny-convnext"
    model.save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875, image_mean=[0.4, 0.5, 0.6],
                                        image_std=[0.2, 0.3, 0.4], resample=2).save_pretrained(folder)  # PIL's bilinear
    return folder, model


def test_hf_folder_loads_the_saved_classifier_and_its_processor(tiny_convnext, transformers) -> None:
    folder, model = tiny_convnext
    for spec in (f"hf:{folder}", f"transformers:{folder}"):
        loaded = load_model(spec, "DEFAULT")
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(loaded.module(x).logits, model(x).logits)
        assert loaded.label == "tiny-convnext" and loaded.source == "hf" and not loaded.preprocess_guessed
    pre = loaded.preprocess  # ConvNeXt's rule: shorter side to int(32 / 0.875) = 36, centre 32
    assert (pre.resize, pre.size, pre.interpolation.value) == (36, 32, "bilinear")
    assert pre.mean == (0.4, 0.5, 0.6) and pre.std == (0.2, 0.3, 0.4)
    image = builtin_images_dir() / "chelsea.jpg"
    theirs = transformers.AutoImageProcessor.from_pretrained(folder)(Image.open(image), return_tensors="pt")["pixel_values"][0]
    ours = load_canvas(image, pre, pre.size)
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5  # transformers' own pipeline, to rounding


def test_hf_random_weights_and_kinds_it_refuses(tiny_convnext, transformers, tmp_path: Path) -> None:
    folder, model = tiny_convnext
    first = load_model(f"hf:{folder}", "none", seed=1).module.state_dict()
    torch.manual_seed(1)
    own = transformers.ConvNextForImageClassification(model.config).state_dict()
    assert all(torch.equal(v, own[k]) for k, v in first.items())
    detector = tmp_path / "detector"
    transformers.YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(detector)
    with pytest.raises(UserError, match="detection models are not supported yet"):
        load_model(f"hf:{detector}", "none")
    text = tmp_path / "text"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(text)
    with pytest.raises(UserError, match="neither an image classifier nor an image encoder"):
        load_model(f"hf:{text}", "none")
    with pytest.raises(UserError, match="has no config.json"):
        load_model(f"hf:{tmp_path}", "none")


def test_hf_image_encoders_give_their_embedding(transformers, tmp_path: Path) -> None:
    """A DINOv2 encoder gives its pooler output (the normalised class token), a CLIP model its image
    tower's projected embedding (CLIP's own ``get_image_features``), both as embedding models;
    a text model is refused."""
    dino = tmp_path / "tiny-dinov2"
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                       patch_size=4, image_size=32)
    encoder = transformers.Dinov2Model(config).eval()
    encoder.save_pretrained(dino)
    clip = tmp_path / "tiny-clip"
    clip_config = transformers.CLIPConfig(
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=8,
                           image_size=32),
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        projection_dim=12)
    both = transformers.CLIPModel(clip_config).eval()
    both.save_pretrained(clip)
    x = torch.randn(2, 3, 32, 32)
    for folder, expected in ((dino, encoder(pixel_values=x).pooler_output),
                             (clip, both.get_image_features(pixel_values=x))):
        loaded = load_model(f"hf:{folder}", "DEFAULT")
        assert loaded.output == "embedding" and loaded.preprocess_guessed
        assert (loaded.preprocess.size, loaded.preprocess.resize) == (32, 36)  # no processor: the config's size
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
        assert torch.allclose(loaded.module(x), expected, atol=1e-6)
        random = load_model(f"hf:{folder}", "none", seed=1)
        assert random.output == "embedding" and random.module(x).shape == expected.shape
    rows = transinv.measure(f"hf:{dino}", weights="none", layers="none", **TINY).rows
    assert set(rows["metric"]) == {M.COSINE_DISTANCE, M.EMBEDDING_CHANGE, M.NN_AGREEMENT}
    layers = transinv.measure(f"hf:{dino}", weights="none", **TINY).rows
    blocks = layers[layers["layer"].str.fullmatch(r"encoder\.encoder\.layer\.\d")]
    assert set(blocks["layer"]) == {"encoder.encoder.layer.0", "encoder.encoder.layer.1"}  # tokens on the patch grid
    text = tmp_path / "text"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(text)
    with pytest.raises(UserError, match="neither an image classifier nor an image encoder"):
        load_model(f"hf:{text}", "none")


def test_hf_processor_sizes_that_transinv_cannot_follow_exactly_are_named(tiny_convnext, transformers) -> None:
    folder, _ = tiny_convnext
    transformers.ViTImageProcessor(size={"height": 40, "width": 40}, resample=3).save_pretrained(folder)
    loaded = load_model(f"hf:{folder}", "none")
    assert (loaded.preprocess.resize, loaded.preprocess.size, loaded.preprocess.interpolation.value) == (40, 40, "bicubic")
    assert any("squashing them" in note for note in loaded.notes)
    (folder / "preprocessor_config.json").unlink()
    loaded = load_model(f"hf:{folder}", "none")
    assert loaded.preprocess_guessed and (loaded.preprocess.resize, loaded.preprocess.size) == (256, 224)


def test_hf_hub_ids_use_the_cache_offline(tiny_convnext, hf_home: Path) -> None:
    folder, model = tiny_convnext
    with pytest.raises(UserError) as info:
        load_model("hf:someone/tiny-convnext", "DEFAULT")
    assert str(hf_home / "models--someone--tiny-convnext") in str(info.value) and "\n" not in str(info.value)
    cache_files(hf_home, "someone/tiny-convnext", {f.name: f.read_bytes() for f in folder.iterdir()})
    loaded = load_model("hf:someone/tiny-convnext", "DEFAULT")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.module(x).logits, model(x).logits) and loaded.preprocess.resize == 36
    assert ("hf", "hf:someone/tiny-convnext", True) in list_models("*", "hf")


def test_hf_measures_like_the_same_module_given_directly(tiny_convnext) -> None:
    folder, model = tiny_convnext
    result = transinv.measure(f"hf:{folder}", **TINY)
    assert len(set(result.rows["layer"])) > 2
    given = transinv.measure(model, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), **TINY)
    pd.testing.assert_series_equal(output_values(result), output_values(given))


# --- ONNX -----------------------------------------------------------------------------------


def export(model: nn.Module, path: Path, batch: int | None) -> None:
    """Export ``model`` at 32 px (the legacy exporter: no onnxscript), with a dynamic batch axis
    unless ``batch`` fixes it."""
    pytest.importorskip("onnx")
    dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}} if batch is None else None
    with warnings.catch_warnings():  # the legacy exporter says it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(batch or 2, 3, 32, 32),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes=dynamic)


@pytest.mark.parametrize("batch", [None, 2])
def test_onnx_output_metrics_match_the_pytorch_model_it_was_exported_from(tmp_path: Path, batch: int | None) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet.onnx"
    export(model, path, batch)
    options = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **{**TINY, "batch_size": 3})
    messages: list[str] = []
    exported = transinv.measure(str(path), warn=messages.append, **options)
    assert set(exported.rows["layer"]) == {M.OUTPUT_LAYER} and set(exported.rows["weights"]) == {"onnx"}
    assert any("takes no forward hooks: measuring output metrics only" in m for m in messages)
    assert any("fixed batch size of 2" in m for m in messages) == (batch == 2)
    original = transinv.measure(model, layers="none", **options)
    pd.testing.assert_series_equal(output_values(exported), output_values(original), atol=1e-4, rtol=0)


def test_onnx_preprocessing_is_guessed_from_its_input_and_fixes_are_refused(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tmp_path / "net.onnx"
    export(torchvision.models.resnet18(num_classes=4).eval(), path, None)
    loaded = load_model(str(path), "none")
    assert (loaded.preprocess.size, loaded.preprocess.resize) == (32, 36) and loaded.preprocess_guessed
    assert loaded.label == "net" and not loaded.hooks
    with pytest.raises(UserError, match="takes 32x32 inputs"):
        transinv.measure(str(path), **{**TINY, "size": 48, "resize": 56})
    with pytest.raises(UserError, match="cannot be transformed"):
        transinv.measure(str(path), variants="base,blurpool", **TINY)
    with pytest.raises(UserError, match="carries its own weights"):
        load_model(str(path), str(path))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(UserError, match="ONNX Runtime cannot load"):
        load_model(str(bad), "none")
