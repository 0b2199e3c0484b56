"""Shared test set-up: no downloads, small real images, paths to the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
IMAGENET_SAMPLE = SHARED / "imagenet-sample"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never download: an empty torch hub cache, and transinv told not to try."""
    monkeypatch.setenv("TRANSINV_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"{IMAGENET_SAMPLE} not present")
    return IMAGENET_SAMPLE


@pytest.fixture(scope="session")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real ImageNet photographs (wnid-named, so labelled), shrunk for fast tests."""
    folder = tmp_path_factory.mktemp("few")
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[::80][:6]
    if not files:
        pytest.skip(f"{IMAGENET_SAMPLE} not present")
    for f in files:
        image = Image.open(f).convert("RGB")
        image.thumbnail((96, 96))
        image.save(folder / f.name, format="JPEG", quality=95)
    return folder

