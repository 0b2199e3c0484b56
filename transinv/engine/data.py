"""Images in, canvases out: finding image files, their labels, and decoding each once.

Each image is decoded and resized once into a square, normalised canvas; every shifted view is
then made from that tensor (see ``shifts.py``), never by decoding again.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BUILTIN = "builtin"
_WNID = re.compile(r"^(n\d{8})_")


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[list[str], list[str]]:
    """ImageNet wnids and class names in torchvision's class order (the shipped table)."""
    table = resources.files("transinv") / "data" / "imagenet-classes.tsv"
    with table.open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [r["wnid"] for r in rows], [r["name"] for r in rows]


def class_names(classes: int) -> list[str]:
    """Names of a classifier's ``classes`` outputs: ImageNet's (the shipped table) for 1000, else
    empty (unknown)."""
    return list(imagenet_classes()[1]) if classes == 1000 else [""] * classes


def builtin_images_dir() -> Path:
    """Folder of the photographs shipped inside the package (see its LICENSE.md)."""
    return Path(str(resources.files("transinv") / "data" / "images"))


@dataclass(frozen=True)
class ImageItem:
    """One image file, its label (-1 when unknown) and the label's name (ImageNet's class name for
    wnid labels, else the class folder's name)."""

    path: Path
    label: int = -1
    label_name: str = ""


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


@lru_cache(maxsize=1)
def _wnid_index() -> dict[str, int]:
    """wnid -> class index, for labelling 50,000 files without a list search each."""
    return {wnid: i for i, wnid in enumerate(imagenet_classes()[0])}


def _wnid_item(path: Path) -> ImageItem:
    """A file labelled by its ImageNet-style name ``<wnid>_*``, unlabelled otherwise."""
    match = _WNID.match(path.name)
    label = _wnid_index().get(match.group(1), -1) if match else -1
    return ImageItem(path, label, imagenet_classes()[1][label] if label >= 0 else "")


def _folder_items(root: Path) -> list[ImageItem]:
    """A folder: an ImageFolder tree when every image sits in a class sub-folder, else a plain tree."""
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if not files:
        raise UserError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if classes and all(len(p.relative_to(root).parts) > 1 for p in files):
        wnid_index = _wnid_index()
        if all(c in wnid_index for c in classes):
            names = imagenet_classes()[1]
            index = {c: (wnid_index[c], names[wnid_index[c]]) for c in classes}
        else:
            index = {c: (i, c) for i, c in enumerate(classes)}
        return [ImageItem(p, *index[p.relative_to(root).parts[0]]) for p in files]
    return [_wnid_item(p) for p in files]


def find_images(data: Sequence[str] | str | None = None) -> list[ImageItem]:
    """Resolve ``--data``: the built-in images, folders (recursive or ImageFolder) and/or files.

    Labels come from class sub-folders (ImageNet order when they are wnids, sorted order otherwise)
    or from ImageNet-style names ``<wnid>_*.JPEG``.
    """
    if data is None or isinstance(data, str):
        data = [data or BUILTIN]
    items: list[ImageItem] = []
    for entry in data:
        path = builtin_images_dir() if entry == BUILTIN else Path(entry).expanduser()
        if path.is_dir():
            items.extend(_folder_items(path))
        elif path.is_file():
            items.append(_wnid_item(path))
        else:
            raise UserError(f"--data {entry}: no such file or folder")
    return list(dict.fromkeys(items))


def select_images(items: list[ImageItem], num_images: int | None, seed: int) -> list[ImageItem]:
    """A seeded random subset of ``num_images`` (all of them when None), kept in file order
    (``seed`` is ``--sample-seed``, apart from ``--seed``, so new offsets keep the images)."""
    if num_images is not None and num_images < 1:
        raise UserError("--num-images must be at least 1")
    if num_images is None or num_images >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), num_images))
    return [item for i, item in enumerate(items) if i in keep]


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a canvas: resize the shorter side, centre-crop, normalise."""

    resize: int
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def describe(self) -> dict[str, object]:
        """Plain values for result files and headers."""
        return {"resize": self.resize, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": str(self.interpolation.value)}


def load_canvas(path: Path, pre: Preprocess, canvas: int) -> torch.Tensor:
    """Decode one image to RGB (grey, CMYK and alpha converted) and make its ``canvas``-px square.

    The square is centred on the model's standard view (torchvision's ``center_crop`` at
    ``pre.size``), with an equal margin on every side: so the view at shift 0 is that crop
    exactly, whatever the margin (on an odd side, centring the larger square itself would move
    the view by a pixel).
    """
    image = _decode_rgb(path)
    image = TF.resize(image, [pre.resize], interpolation=pre.interpolation, antialias=True)
    margin = (canvas - pre.size) // 2  # the plan makes canvases of size + 2 * margin
    if margin <= 0:
        image = TF.center_crop(image, [canvas, canvas])
    else:
        height, width = image.shape[-2:]
        top, left = _center_crop_anchor(height, width, pre.size)
        image = TF.crop(image, top - margin, left - margin, canvas, canvas)
    # contiguous before converting: normalising a strided crop took 3x as long
    image = TF.to_dtype(image.contiguous(), torch.float32, scale=True)
    return TF.normalize(image, list(pre.mean), list(pre.std), inplace=True)


def _decode_rgb(path: Path) -> torch.Tensor:
    """The image's RGB pixels (3 x H x W, uint8), decoded by Pillow (which refuses decompression
    bombs); an RGB file is read as is, without the copy ``convert("RGB")`` makes."""
    with Image.open(path) as opened:
        return TF.pil_to_tensor(opened if opened.mode == "RGB" else opened.convert("RGB"))


def _center_crop_anchor(height: int, width: int, size: int) -> tuple[int, int]:
    """Top and left of torchvision's ``center_crop`` of a ``size`` square (its rounding)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


class CanvasDataset(Dataset):
    """Canvases for a list of images; an unreadable file yields ``None`` so the batch skips it.

    ``ids`` are the images' positions in the whole run (they seed per-image randomness, so a
    shard under torchrun draws what a single process would); by default 0, 1, 2, ...
    """

    def __init__(self, items: list[ImageItem], pre: Preprocess, canvas: int, ids: Sequence[int] | None = None) -> None:
        self.items, self.pre, self.canvas = items, pre, canvas
        self.ids = list(ids) if ids is not None else list(range(len(items)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, int, str]:
        item = self.items[index]
        try:
            return self.ids[index], load_canvas(item.path, self.pre, self.canvas), item.label, ""
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return self.ids[index], None, item.label, f"{item.path}: {reason}"


@dataclass
class Batch:
    """Canvases of the readable images of one batch, with labels, image ids and skipped files."""

    canvases: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[str]

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (the DataLoader calls this with ``pin_memory``), so its
        copy to a GPU is queued without holding the host (it runs after the previous batch's work)."""
        return Batch(self.canvases.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.skipped)


def collate(samples: list[tuple[int, torch.Tensor | None, int, str]]) -> Batch:
    """Stack the readable canvases; report the unreadable ones instead of failing the run."""
    good = [s for s in samples if s[1] is not None]
    skipped = [s[3] for s in samples if s[1] is None]
    if good:
        canvases = torch.stack([s[1] for s in good])
    else:
        canvases = torch.empty(0)
    return Batch(
        canvases=canvases,
        labels=torch.tensor([s[2] for s in good], dtype=torch.long),
        indices=torch.tensor([s[0] for s in good], dtype=torch.long),
        skipped=skipped,
    )

