"""Shared test set-up: no downloads, and small labelled photographs kept in the repository."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_PHOTOS = Path(__file__).resolve().parent / "data"
FEW = ("n02123045_tabby.JPEG", "n02123045_tabby_face.JPEG", "n03773504_missile.JPEG", "n04326547_stone_wall.JPEG",
       "n07920052_espresso.JPEG", "n07920052_espresso_cup.JPEG")
EXTRA_IMAGES = "TRANSINV_TEST_IMAGES"  # optional: run the photo tests on another labelled folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never download: an empty torch hub cache, and transinv told not to try."""
    monkeypatch.setenv("TRANSINV_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """A folder of labelled photographs (``<wnid>_*.JPEG``): the eight in tests/data, or the folder
    named by ``TRANSINV_TEST_IMAGES`` (any folder of labelled photos) for an optional extra run."""
    folder = Path(os.environ.get(EXTRA_IMAGES) or TEST_PHOTOS)
    if not any(folder.glob("n*_*.JPEG")):
        raise pytest.UsageError(f"{EXTRA_IMAGES}={folder}: no <wnid>_*.JPEG photographs there")
    return folder


@pytest.fixture(scope="session")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small labelled photographs (one grayscale, three of odd sizes) in a folder of their own."""
    folder = tmp_path_factory.mktemp("few")
    for name in FEW:
        shutil.copy(TEST_PHOTOS / name, folder / name)
    return folder
