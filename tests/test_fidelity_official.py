"""The five official behaviours the paper config reproduces, each checked on tiny models against
what the official code (or the transformers version it pins) does: beam scores over the full
length, fp32 decoding, the BLIP-style decoder start, JPEG quality 75, candidate sets joined by
their first hit."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from icsd.backends.captioners import (
    CaptionerSpec,
    IcsdCaptioner,
    TinyCaptioner,
    build_caption_model,
    decoder_prompt_ids,
    load_captioner,
)
from icsd.backends.captioning.decoding import decode_autocast, decoding_context
from icsd.backends.captioning.icsd import blip_decoder
from icsd.config import GroupConfig
from icsd.knn import merge_by_first_hit
from icsd.records import Candidate, Caption, embeddings_table, from_table, to_table
from icsd.stages import group
from icsd.stages.render import encode_image
from icsd.store import RunDir, mark_done, write_parquet

NEG = -1.0e4


@pytest.fixture(scope="module")
def tiny_blip() -> object:
    torch.manual_seed(0)
    return build_caption_model(CaptionerSpec(preset="tiny", decoder_style="blip", length_norm="total"))


# ----------------------------------------------------------------------------- 1. beam scores


class Scripted:
    """A logits processor that replaces the model's log-probabilities by a script keyed on the
    tokens generated so far: two continuations, a short one and a long one."""

    def __init__(self, prompt_len: int, script: dict[tuple[int, ...], dict[int, float]]) -> None:
        self.prompt_len, self.script = prompt_len, script

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, NEG)
        for row, ids in enumerate(input_ids.tolist()):
            for token, logp in self.script.get(tuple(ids[self.prompt_len :]), {}).items():
                out[row, token] = logp
        return out


def scripted_caption(cm: object, length_norm: str) -> list[int]:
    from transformers import LogitsProcessorList

    model, tokenizer = cm.model, cm.tokenizer  # type: ignore[attr-defined]
    prompt_len = int(decoder_prompt_ids(tokenizer, cm.prompt).shape[1])  # type: ignore[attr-defined]
    eos = model.generation_config.eos_token_id
    x, y, z, w = tokenizer.convert_tokens_to_ids(["dog", "cat", "runs", "fast"])
    # A = "dog" (sum -1.5, 2 new tokens with the end, full length P + 1)
    # B = "cat runs fast" (sum -2.4, 4 new tokens, full length P + 3)
    script = {(): {x: -1.0, y: -1.2}, (x,): {eos: -0.5}, (y,): {z: -0.4}, (y, z): {w: -0.4}, (y, z, w): {eos: -0.4}}
    pixels = torch.zeros(1, 3, cm.image_size, cm.image_size)  # type: ignore[attr-defined]
    with decoding_context(model, "cpu", length_norm, "fp32"):
        new = IcsdCaptioner.generate(
            model, tokenizer, pixels, cm.prompt,  # type: ignore[attr-defined]
            num_beams=2, min_new_tokens=0, max_new_tokens=8,
            logits_processor=LogitsProcessorList([Scripted(prompt_len, script)]),
        )  # fmt: skip
    return [t for t in new[0].tolist() if t not in (eos, tokenizer.pad_token_id)]


def test_beam_order_flips_between_new_and_total_length_normalisation(tiny_blip: object) -> None:
    tokenizer = tiny_blip.tokenizer  # type: ignore[attr-defined]
    prompt_len = int(decoder_prompt_ids(tokenizer, tiny_blip.prompt).shape[1])  # type: ignore[attr-defined]
    assert prompt_len == 4, "[DEC] a picture of"
    short, long_ = -1.5, -2.4
    # transformers 5 (new): divided by the new tokens, the end token included: B wins
    assert long_ / 4 > short / 2
    # transformers 4.15 (total): divided by the full sequence before the end token: A wins
    assert short / (prompt_len + 1) > long_ / (prompt_len + 3)
    dog, cat, runs, fast = tokenizer.convert_tokens_to_ids(["dog", "cat", "runs", "fast"])
    assert scripted_caption(tiny_blip, "new") == [cat, runs, fast]
    assert scripted_caption(tiny_blip, "total") == [dog]
    model = tiny_blip.model  # type: ignore[attr-defined]
    assert "_update_finished_beams" not in vars(model), "the scoring hooks are removed after decoding"


def test_total_normalisation_travels_in_the_checkpoint(tiny_blip: object, tmp_path: Path) -> None:
    tiny_blip.save(tmp_path / "ckpt")  # type: ignore[attr-defined]
    info = json.loads((tmp_path / "ckpt" / "captioner.json").read_text())
    assert (info["length_norm"], info["decoder_style"]) == ("total", "blip")
    assert load_captioner(str(tmp_path / "ckpt"), device="cpu").length_norm == "total"
    assert load_captioner(str(tmp_path / "ckpt"), device="cpu", length_norm="new").length_norm == "new"


# ----------------------------------------------------------------------------- 2. precision


def test_decoding_precision_fp32_unless_bf16_is_asked_for() -> None:
    assert decode_autocast("cuda", "fp32") is None, "fp32: no autocast on the GPU"
    assert decode_autocast("cuda:1", "bf16") == ("cuda", torch.bfloat16)
    assert decode_autocast("cpu", "bf16") is None, "never autocast on the CPU"
    icsd = IcsdCaptioner.resolve(CaptionerSpec(preset="icsd"))
    tiny = TinyCaptioner.resolve(CaptionerSpec(preset="tiny"))
    assert (icsd.decode_dtype, tiny.decode_dtype) == ("fp32", "bf16"), "icsd preset: the official fp32"


# ----------------------------------------------------------------------------- 3. decoder start


def test_blip_decoder_starts_from_dec_with_a_fresh_head_transform() -> None:
    from transformers import BertConfig, BertLMHeadModel, BertTokenizer

    from icsd.backends.captioners import minilm_vocab

    tokenizer = BertTokenizer(vocab=str(minilm_vocab()))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, is_decoder=True, add_cross_attention=True)  # fmt: skip
    torch.manual_seed(0)
    decoder = BertLMHeadModel(config)
    head = decoder.cls.predictions
    with torch.no_grad():  # stand-in for a pretrained MLM head
        head.transform.dense.weight.fill_(0.5)
        head.transform.LayerNorm.weight.fill_(2.0)
        head.decoder.bias.fill_(0.3)
    words = decoder.get_input_embeddings().weight[: len(tokenizer)].detach().clone()
    blip_decoder(decoder, tokenizer)
    assert tokenizer.bos_token == "[DEC]" and len(tokenizer) == len(words) + 2  # [DEC], [ENC]
    assert abs(float(head.transform.dense.weight.detach().std()) - config.initializer_range) < 0.01
    assert torch.all(head.transform.LayerNorm.weight == 1) and torch.all(head.decoder.bias == 0)
    emb = decoder.get_input_embeddings().weight
    assert torch.equal(emb[: len(words)], words), "the pretrained word embeddings are kept"
    assert head.decoder.weight.data_ptr() == emb.data_ptr(), "output weights tied to the embeddings"


def test_blip_style_trains_and_decodes_from_dec(tiny_blip: object) -> None:
    tokenizer, model = tiny_blip.tokenizer, tiny_blip.model  # type: ignore[attr-defined]
    dec = tokenizer.convert_tokens_to_ids("[DEC]")
    batch = tiny_blip.text_batch(["A dog."], 16)  # type: ignore[attr-defined]
    assert batch.input_ids[0, 0] == dec != tokenizer.cls_token_id
    assert model.config.decoder_start_token_id == model.generation_config.decoder_start_token_id == dec
    assert decoder_prompt_ids(tokenizer, "a picture of ")[0, 0] == dec


def test_presets_keep_their_decoder_start() -> None:
    assert IcsdCaptioner.resolve(CaptionerSpec(preset="icsd")).decoder_style == "blip"
    for preset in ("tiny", "sandbox"):
        from icsd.backends.registry import CAPTIONERS

        spec = CAPTIONERS.get(preset).resolve(CaptionerSpec(preset=preset))
        assert (spec.decoder_style, spec.length_norm, spec.decode_dtype) == ("bert", "new", "bf16"), preset
    cm = build_caption_model(CaptionerSpec(preset="tiny"))
    assert cm.text_batch(["a dog"], 8).input_ids[0, 0] == cm.tokenizer.cls_token_id


# ----------------------------------------------------------------------------- 4. image files


def test_quality_75_jpeg_equals_pils_default_save() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    default = io.BytesIO()
    Image.fromarray(pixels).save(default, format="JPEG")  # the official imgs[j].save(path.jpg)
    assert encode_image(pixels, "jpg", 75) == default.getvalue()
    assert encode_image(pixels, "jpg", 95) != default.getvalue()


# ----------------------------------------------------------------------------- 5. duplicate sets


def official_group_summary(group_captions: list[dict[str, str]], k: int) -> dict[str, list[dict[str, str]]]:
    """preprocess/preprocess_for_chatgpt.py:14-19 of the official code (without its final shuffle)."""
    num_samples = len(group_captions) // k
    meta_dict: dict[str, list[dict[str, str]]] = defaultdict(list)
    for i in range(num_samples):
        ann_meta = group_captions[i * k : (i + 1) * k]
        head_id = f"{ann_meta[0]['image_id']}_{ann_meta[0]['coco_id']}"
        meta_dict[head_id].extend(ann_meta)
    return meta_dict


def test_merge_by_first_hit_equals_the_official_grouping() -> None:
    ids = np.array([[0, 1, 2], [0, 1, 3], [2, 0, 1], [3, 1, 0], [2, 3, 0], [5, 4, 1], [5, 1, 4]])
    flat = [{"image_id": str(j), "coco_id": "x", "caption": f"c{j}"} for row in ids for j in row]
    official = official_group_summary(flat, 3)
    rows, sizes = merge_by_first_hit(ids)
    got, start = {}, 0
    for size in sizes:
        block = rows[start : start + size]
        got[f"{ids[block[0], 0]}_x"] = [f"c{j}" for r in block for j in ids[r]]
        start += size
    assert list(got) == list(official)
    assert got == {key: [a["caption"] for a in anns] for key, anns in official.items()}


def test_group_stage_merges_sets_sharing_a_first_hit(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[7] = x[3]  # identical captions: both searches hit the same caption first
    run = RunDir.at(tmp_path / "run")
    caps = [Caption(f"c/{i}", f"text {i}", "t") for i in range(len(x))]
    write_parquet(to_table(caps, Caption), run.captions)
    part = run.embeddings / "part-00000.parquet"
    write_parquet(embeddings_table([c.caption_id for c in caps], x), part)
    mark_done(part, {})
    res = group.run(GroupConfig(k=5, duplicates="merge"), run)
    cands = {c.group_id: c for c in from_table(pq.read_table(run.candidates), Candidate)}
    assert res.counts["groups"] == len(cands) == 59 and res.counts["sets_merged"] == 1
    joined = [c for c in cands.values() if len(c.member_ids) == 10]
    assert len(joined) == 1 and joined[0].group_id in ("c/3", "c/7")
    assert joined[0].member_ids[0] == joined[0].member_ids[5] == joined[0].group_id
    dropped = group.run(GroupConfig(k=5, duplicates="drop"), run)
    assert dropped.counts["groups"] == 60 - dropped.counts["duplicates_dropped"] < 60
    assert all(len(c.member_ids) == 5 for c in from_table(pq.read_table(run.candidates), Candidate))
