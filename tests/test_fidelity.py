"""The paper config reproduces the official code: every setting the fidelity table names holds in
the resolved config, docs/fidelity.md is the table, and the official transforms behave as theirs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from icsd import fidelity
from icsd.backends.captioners import official_caption, squash_processor
from icsd.training.trainer import epoch_cosine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("row", [r for r in fidelity.ROWS if r.settings], ids=lambda r: r.aspect)
def test_paper_config_holds_the_official_settings(row: fidelity.Row) -> None:
    values = fidelity.resolved_paper_values(ROOT)
    for key, expected in row.settings.items():
        assert key in values, f"{row.aspect}: no setting {key}"
        assert values[key] == expected, f"{row.aspect}: {key} is {values[key]!r}, the official value is {expected!r}"


def test_fidelity_doc_is_generated_from_the_table() -> None:
    doc = (ROOT / "docs" / "fidelity.md").read_text(encoding="utf-8")
    assert doc == fidelity.markdown(), "docs/fidelity.md is stale: python -m icsd.fidelity > docs/fidelity.md"
    assert all(r.why for r in fidelity.ROWS if r.kind != "match" or r.default_elsewhere != "same"), "say why"
    assert {r.kind for r in fidelity.ROWS} <= {"match", "deviation", "inconsistent"}
    cited = re.compile(r"^(\(paper, Table \d\)|[\w/.]+\.(py|json)(:\d+(-\d+)?(, \d+(-\d+)?)*)?|dockerfile:\d+)$")
    for row in fidelity.ROWS:  # every claim about the official code names its file and line
        for ref in re.split(r", (?=[a-z(])", row.where):
            assert cited.match(ref) and (":" in ref or ref.endswith(".json")), f"{row.aspect}: {ref!r}"


def official_pre_caption(caption: str, max_words: int = 50) -> str:
    """training/data/utils.py:pre_caption of the official code, verbatim."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])
    return caption


@pytest.mark.parametrize(
    "text",
    ["A man riding a wave on top of a surfboard.", 'Two "dogs" (brown) play: tug-of-war!  ~ok~ #1',
     " ".join(f"Word{i}." for i in range(45)), "  leading and trailing  \n"],
)  # fmt: skip
def test_official_caption_cleaning_equals_pre_caption(text: str) -> None:
    assert official_caption(text, 30) == official_pre_caption(text, 30)


def test_squash_resizes_without_crop_bicubic() -> None:
    from transformers import CLIPImageProcessor

    proc = squash_processor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    wide = Image.new("RGB", (128, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (96, 0, 128, 32))  # the right quarter is blue: a centre crop would lose it
    pixels = proc(wide, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    assert pixels[2, :, -2:].mean() > pixels[0, :, -2:].mean(), "the right edge survives (no crop)"
    assert proc.resample == Image.Resampling.BICUBIC


def test_epoch_schedule_is_constant_within_an_epoch_and_cosine_across() -> None:
    steps, total = 10, 30
    factors = [epoch_cosine(s, steps, total, 0) for s in range(total)]
    assert factors[:10] == [1.0] * 10
    assert factors[10] == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert len(set(factors[10:20])) == 1 and factors[25] == pytest.approx(0.25)


def test_total_decode_lengths_count_the_prompt(tmp_path: Path) -> None:
    from icsd.backends.captioners import (
        CaptionerSpec,
        build_caption_model,
        decoder_prompt_ids,
        load_captioner,
    )

    torch.manual_seed(0)
    build_caption_model(CaptionerSpec(preset="tiny", test_resize="squash")).save(tmp_path / "tiny")
    cap = load_captioner(str(tmp_path / "tiny"), device="cpu")
    assert cap.image_processor.do_center_crop is False, "the squash setting travels in the checkpoint"
    prompt_tokens = int(decoder_prompt_ids(cap.tokenizer, cap.prompt).shape[1])
    assert prompt_tokens >= 2
    assert cap.new_token_range(5, 30) == (max(0, 5 - prompt_tokens), 30 - prompt_tokens)
    torch.manual_seed(0)
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    total = cap.caption([image], beams=1, min_new_tokens=0, max_new_tokens=prompt_tokens + 2, lengths="total")
    new = cap.caption([image], beams=1, min_new_tokens=0, max_new_tokens=2)
    longer = cap.caption([image], beams=1, min_new_tokens=0, max_new_tokens=prompt_tokens + 2)
    assert total == new and longer != total
