"""Shared fixtures: paths to the real test data under ``tests/data`` (a missing file is a failure)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# nothing outside the clone and the temp dir: scratch files and the sandbox world go to a temp folder
_SCRATCH = tempfile.mkdtemp(prefix="icsd-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ.setdefault("ICSD_CACHE_DIR", os.path.join(_SCRATCH, "cache"))
os.environ.setdefault("ICSD_SANDBOX_DIR", os.path.join(_SCRATCH, "sandbox"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core: torch (and the subprocesses a test starts) on one thread each,
    # so two workers do not fight over both cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # real data, copied into the repository (see its README.md)
COCO_CAPTIONS = TEST_DATA / "coco" / "captions_val2017_subset.json"
COCO_IMAGES = TEST_DATA / "coco" / "val2017"
COCO_SUBSET_IMAGES = 998  # images and captions in the subset file (tests/data/README.md)
COCO_SUBSET_CAPTIONS = 4993


@pytest.fixture(scope="session")
def coco_captions() -> Path:
    assert COCO_CAPTIONS.is_file(), f"test data missing: {COCO_CAPTIONS} (it ships with the repository)"
    return COCO_CAPTIONS


@pytest.fixture(scope="session")
def coco_images() -> Path:
    photos = sorted(COCO_IMAGES.glob("*.jpg"))
    assert len(photos) == 24, f"test data missing: expected 24 photos in {COCO_IMAGES}, found {len(photos)}"
    return COCO_IMAGES


@pytest.fixture(scope="session")
def tiny_sentence_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT sentence-transformer (mean pooling) built from a config, saved to disk."""
    from tiny_models import save_tiny_sentence_transformer

    return save_tiny_sentence_transformer(tmp_path_factory.mktemp("tiny_st"))


@pytest.fixture()
def coco_slice(tmp_path: Path, coco_captions: Path) -> Path:
    """The first 300 annotations of the COCO test captions as a small COCO-format file."""
    import json

    data = json.loads(coco_captions.read_text())
    small = {"images": data["images"][:100], "annotations": data["annotations"][:300]}
    out = tmp_path / "coco_slice.json"
    out.write_text(json.dumps(small))
    return out


@pytest.fixture(scope="session")
def tiny_clip_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer CLIP (text + vision) with the real CLIP BPE vocabulary, saved to disk."""
    from tiny_models import save_tiny_clip_with_vocab

    return save_tiny_clip_with_vocab(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_caption_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pretrained-style folders a captioner family starts from: a CLIP, a BERT and a GPT-2."""
    from tiny_models import save_tiny_bert, save_tiny_clip, save_tiny_gpt2, tiny_caption_texts

    root = tmp_path_factory.mktemp("caption_parts")
    return {
        "clip": save_tiny_clip(root / "clip"),
        "bert": save_tiny_bert(root / "bert"),
        "gpt2": save_tiny_gpt2(root / "gpt2", tiny_caption_texts()),
    }


@pytest.fixture(scope="session")
def tiny_sd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Stable Diffusion pipeline (with its tiny safety checker), saved to disk."""
    from tiny_models import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "tiny-sd")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module (2-core CI: subprocesses and servers need the other core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
