"""Shared fixtures: paths to the shared real data (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ICSD_SHARED_DATA", REPO.parent / "shared" / "data"))
COCO_CAPTIONS = SHARED_DATA / "coco" / "captions_val2017.json"
COCO_IMAGES = SHARED_DATA / "coco" / "val2017"


@pytest.fixture(scope="session")
def coco_captions() -> Path:
    if not COCO_CAPTIONS.exists():
        pytest.skip(f"shared data not found: {COCO_CAPTIONS}")
    return COCO_CAPTIONS


@pytest.fixture(scope="session")
def coco_images() -> Path:
    if not COCO_IMAGES.is_dir():
        pytest.skip(f"shared images not found: {COCO_IMAGES}")
    return COCO_IMAGES
