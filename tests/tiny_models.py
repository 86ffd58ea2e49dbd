"""Tiny random pretrained-style components saved to folders, built offline from configs:
a CLIP model (vision + text towers, as hub CLIP checkpoints are), a BERT and a GPT-2 with a
byte-level BPE tokenizer trained on real captions."""

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
