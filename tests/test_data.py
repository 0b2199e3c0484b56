"""Finding images and labels, decoding odd formats, and skipping unreadable files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import transinv
from transinv.engine.data import Preprocess, _decode_rgb, builtin_images_dir, find_images, load_canvas, select_images
from transinv.errors import UserError

PRE = Preprocess(resize=40, size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _save(path: Path, mode: str, size=(60, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"L": 128, "RGB": (200, 10, 10), "RGBA": (200, 10, 10, 50), "CMYK": (0, 255, 255, 0)}[mode]
    image = Image.new(mode, size, color)
    image.save(path)
    return path


@pytest.mark.parametrize("mode, suffix", [("L", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("RGB", ".jpg")])
def test_every_image_mode_becomes_a_normalised_rgb_canvas(tmp_path: Path, mode: str, suffix: str) -> None:
    canvas = load_canvas(_save(tmp_path / f"x{suffix}", mode), PRE, 36)
    assert canvas.shape == (3, 36, 36) and canvas.dtype == torch.float32
    assert canvas.abs().max() <= 2.0 + 1e-6  # (v - 0.5) / 0.25 with v in [0, 1]


def test_decoding_gives_pillows_rgb_conversion_for_every_mode(tmp_path: Path) -> None:
    """RGB files skip Pillow's ``convert("RGB")`` copy; every mode still gives exactly the pixels
    that conversion gives (photos, grey, CMYK, palette, alpha), and a truncated file is refused."""
    photo = builtin_images_dir() / "chelsea.jpg"
    with Image.open(photo) as source:
        for mode, suffix in (("RGB", ".jpg"), ("L", ".jpg"), ("CMYK", ".jpg"), ("P", ".png"), ("RGBA", ".png")):
            source.convert(mode).save(tmp_path / f"{mode}{suffix}")
    for path in [photo, *sorted(tmp_path.iterdir())]:
        with Image.open(path) as opened:
            expected = TF.pil_to_tensor(opened.convert("RGB"))
        assert torch.equal(_decode_rgb(path), expected), path.name
    (tmp_path / "truncated.jpg").write_bytes(photo.read_bytes()[:2000])
    with pytest.raises(OSError):
        _decode_rgb(tmp_path / "truncated.jpg")


def test_imagenet_names_give_labels_in_torchvision_order(tmp_path: Path) -> None:
    _save(tmp_path / "n01440764_tench.JPEG", "RGB")
    _save(tmp_path / "n15075141_toilet_tissue.JPEG", "RGB")
    _save(tmp_path / "holiday.jpg", "RGB")
    labels = {item.path.name: item.label for item in find_images(str(tmp_path))}
    assert labels == {"n01440764_tench.JPEG": 0, "n15075141_toilet_tissue.JPEG": 999, "holiday.jpg": -1}


def test_imagefolder_tree_gives_class_labels(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for i in range(2):
            _save(tmp_path / cls / f"{i}.png", "RGB")
    labels = sorted((item.path.parent.name, item.label) for item in find_images(str(tmp_path)))
    assert labels == [("cat", 0), ("cat", 0), ("dog", 1), ("dog", 1)]
    wnids = tmp_path / "wnid"
    _save(wnids / "n01443537" / "a.png", "RGB")
    assert [i.label for i in find_images(str(wnids))] == [1]


def test_builtin_images_and_errors(tmp_path: Path) -> None:
    builtin = find_images(None)
    assert len(builtin) >= 9 and (builtin_images_dir() / "LICENSE.md").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        find_images(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such file"):
        find_images(str(tmp_path / "missing"))


@pytest.mark.parametrize("size, resize", [(32, 41), (31, 40), (32, 44)])
def test_the_view_at_shift_zero_is_torchvisions_centre_crop_whatever_the_margin(tmp_path: Path, size: int, resize: int) -> None:
    """Odd and even sides, odd and even margins: the canvas centre is always ``center_crop`` at ``size``."""
    source = Image.open(builtin_images_dir() / "chelsea.jpg").convert("RGB").resize((57, 43))
    source.save(tmp_path / "odd.png")
    pre = Preprocess(resize=resize, size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    image = TF.resize(TF.pil_to_tensor(source), [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
    expected = TF.normalize(TF.to_dtype(TF.center_crop(image, [size, size]), torch.float32, scale=True),
                            list(pre.mean), list(pre.std))
    for margin in range(0, (resize - size) // 2 + 1):
        canvas = load_canvas(tmp_path / "odd.png", pre, size + 2 * margin)
        assert canvas.shape[-1] == size + 2 * margin
        assert torch.equal(canvas[:, margin : margin + size, margin : margin + size], expected), margin


def test_subset_is_seeded_and_stable() -> None:
    items = find_images(None)
    assert select_images(items, 4, seed=1) == select_images(items, 4, seed=1)
    assert len({tuple(select_images(items, 4, seed=s)) for s in range(6)}) > 1
    assert select_images(items, 100, seed=1) == items


def test_unreadable_file_is_skipped_with_a_warning_and_counted(tmp_path: Path) -> None:
    _save(tmp_path / "good.png", "RGB")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    warnings: list[str] = []
    result = transinv.measure(
        "example:constant", weights="none", data=str(tmp_path), size=32, resize=40, shift="0..1", warn=warnings.append
    )
    assert result.summary["images"] == 1 and result.summary["skipped"] == 1
    assert any("broken.jpg" in w for w in warnings)


def test_sample_seed_picks_the_images_and_seed_does_not(tmp_path: Path) -> None:
    """A new --seed (new random offsets) keeps the --num-images subset; --sample-seed changes it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 5))
    common = dict(shift="0..1", size=32, resize=40, layers="none", num_images=3)

    def kl(**seeds: int) -> float:
        rows = transinv.measure(model, **common, **seeds).rows
        return float(rows[(rows["metric"] == "kl_divergence") & (rows["shift_x"] == 1)]["value"].iloc[0])

    assert kl(seed=1) == kl(seed=2) == kl(seed=2, sample_seed=0)
    assert len({kl(sample_seed=s) for s in range(4)}) > 1
