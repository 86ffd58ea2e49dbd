"""Caption text for the captioners: cleaning, the official training text, token batches with labels."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import UserError
from .options import DEFAULT_PROMPT  # noqa: F401 - where the decoders read it

IMAGE_TOKEN = "<image>"
#: the decoder start token and the encoder token the official (BLIP-based) tokenizer adds
DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(decoder start, end, pad) token ids: [CLS]/[SEP]/[PAD] for BERT, BOS/EOS/EOS for GPT-style.
    A BERT tokenizer given a BOS token (``[DEC]`` in the official BLIP-style decoder) starts there:
    the start token travels with the saved tokenizer."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    if start is None or end is None:
        raise UserError("the text tokenizer has neither [CLS]/[SEP] nor BOS/EOS tokens")
    return int(start), int(end), int(pad)


@dataclass
class TextBatch:
    """Token ids, attention mask and labels (``-100`` on the prompt, image tokens and padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def tokens(self) -> int:
        """How many positions the loss counts."""
        return int((self.labels[:, 1:] != -100).sum())


def _pad(rows: list[list[int]], targets: list[int], pad: int, width: int | None = None) -> TextBatch:
    """Right-pad rows (to ``width`` if given); positions from ``targets[i]`` on (and not padding) are labels."""
    width = max([len(r) for r in rows] + [width or 0])
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, first) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, first : len(row)] = ids[i, first : len(row)]
    return TextBatch(ids, mask, labels)


def clean_caption(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


OFFICIAL_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def official_caption(text: str, max_words: int | None = 30) -> str:
    """The official training text (``pre_caption`` of the ICSD/BLIP code): lower-cased, the
    characters ``.!"()*#:;~`` replaced by spaces, spaces collapsed, at most ``max_words`` words."""
    words = re.sub(r"\s{2,}", " ", OFFICIAL_PUNCTUATION.sub(" ", text.lower())).strip(" \n").split(" ")
    return " ".join(words[:max_words] if max_words else words)


def encode_decoder_texts(
    tokenizer: Any, prompt: str, captions: Sequence[str], max_tokens: int, fixed: bool = False
) -> TextBatch:
    """``[start] prompt caption [end]`` for a cross-attention decoder; the loss skips the prompt."""
    start, end, pad = special_ids(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    rows, targets = [], []
    for caption in captions:
        ids = tokenizer(prompt + clean_caption(caption), add_special_tokens=False, verbose=False)["input_ids"]
        ids = ids[: max(len(prompt_ids) + 1, max_tokens - 2)]
        rows.append([start, *ids, end])
        targets.append(1 + len(prompt_ids))
    return _pad(rows, targets, pad, max_tokens if fixed else None)


def prefix_prompt_text(prompt: str, num_image_tokens: int) -> str:
    """What the Llava processor tokenises for a prefix model: image tokens, then the prompt."""
    return IMAGE_TOKEN * num_image_tokens + prompt.rstrip()


def encode_prefix_texts(
    tokenizer: Any,
    prompt: str,
    captions: Sequence[str],
    max_tokens: int,
    image_token_id: int,
    num_image_tokens: int,
    fixed: bool = False,
) -> TextBatch:
    """``<image>*N prompt caption <eos>`` for a prefix LM; the loss skips image tokens and the prompt."""
    _, end, pad = special_ids(tokenizer)
    head = prefix_prompt_text(prompt, num_image_tokens)
    head_ids = tokenizer(head)["input_ids"]
    rows, targets = [], []
    for caption in captions:
        text = (head + " " if prompt.strip() else head) + clean_caption(caption)
        ids = tokenizer(text, verbose=False)["input_ids"][: len(head_ids) + max_tokens - 1]
        rows.append([*ids, end])
        targets.append(len(head_ids))
    batch = _pad(rows, targets, pad, len(head_ids) + max_tokens if fixed else None)
    if int((batch.input_ids == image_token_id).sum()) != num_image_tokens * len(captions):
        raise ValueError("the tokenizer split the image placeholder tokens")
    return batch


def decoder_prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """``[[start, *prompt]]``: what an encoder-decoder captioner's decoder starts from."""
    start, _, _ = special_ids(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return torch.tensor([[start, *ids]], dtype=torch.long)
