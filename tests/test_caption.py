"""Captioner models: building the presets, plain-transformers checkpoints, and `icsd caption`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import caption_corpus, save_tiny_bert, save_tiny_clip, save_tiny_gpt2

from icsd.backends.captioners import (
    IMAGE_TOKEN,
    CaptionerSpec,
    build_caption_model,
    interpolate_position_embeddings,
    load_captioner,
    prefix_image_features,
    prefix_processor,
)
from icsd.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The snippets README shows: a checkpoint captions with plain transformers, icsd not imported.
PLAIN_ENCODER_DECODER = """
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

model = VisionEncoderDecoderModel.from_pretrained(ckpt).eval()
tokenizer = AutoTokenizer.from_pretrained(ckpt)
processor = AutoImageProcessor.from_pretrained(ckpt)

pixels = processor(Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
prompt = tokenizer("a picture of", return_tensors="pt").input_ids[:, :-1]  # [CLS] a picture of
out = model.generate(pixel_values=pixels, decoder_input_ids=prompt)  # beams 3, 5-30 new tokens
print(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
"""

PLAIN_PREFIX = """
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
processor = AutoProcessor.from_pretrained(ckpt)

inputs = processor(images=Image.open(image).convert("RGB"), text="<image>a picture of", return_tensors="pt")
out = model.generate(**inputs)  # beams 3, 5-30 new tokens
print(processor.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
"""


def plain_script(snippets: list[tuple[str, Path, Path, int]]) -> str:
    """One program running each snippet on (checkpoint, image), capped at N new tokens for speed."""
    parts = ["import sys"]
    for code, ckpt, image, max_new in snippets:
        parts.append(f"ckpt, image = {str(ckpt)!r}, {str(image)!r}")
        parts.append(code.replace("model.generate(", f"model.generate(max_new_tokens={max_new}, "))
    parts.append("assert 'icsd' not in sys.modules")
    return "\n".join(parts)




@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory, coco_captions):
    root = tmp_path_factory.mktemp("parts")
    return {
        "clip": save_tiny_clip(root / "clip"),
        "bert": save_tiny_bert(root / "bert"),
        "gpt2": save_tiny_gpt2(root / "gpt2", caption_corpus(coco_captions)),
    }


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cm = build_caption_model(CaptionerSpec(preset="tiny", max_new_tokens=8))
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    cm.save(folder)
    return folder


def test_interpolate_position_embeddings_keeps_class_token_and_smooth_fields():
    grid = torch.ones(1 + 4 * 4, 3)
    grid[0] = 7.0
    out = interpolate_position_embeddings(grid, 6)
    assert out.shape == (1 + 36, 3)
    assert torch.equal(out[0], grid[0]) and torch.allclose(out[1:], torch.ones(36, 3))
    same = torch.randn(1 + 9, 5)
    assert torch.equal(interpolate_position_embeddings(same, 3), same)


def test_icsd_preset_from_pretrained_parts_interpolates_positions(tiny_parts, tmp_path, coco_images):
    from transformers import CLIPVisionModel

    spec = CaptionerSpec(preset="icsd", vision_model=str(tiny_parts["clip"]), text_model=str(tiny_parts["bert"]), image_size=64)
    cm = build_caption_model(spec)
    enc = cm.model.encoder
    assert enc.config.image_size == 64 and enc.embeddings.position_embedding.weight.shape[0] == 1 + 8 * 8
    original = CLIPVisionModel.from_pretrained(tiny_parts["clip"]).embeddings.position_embedding.weight
    assert torch.equal(enc.embeddings.position_embedding.weight[0], original[0])
    assert cm.model.decoder.config.add_cross_attention and cm.model.decoder.config.is_decoder
    assert cm.image_processor.crop_size["height"] == 64
    cm.save(tmp_path / "ckpt")
    texts = load_captioner(str(tmp_path / "ckpt"), "cpu").caption([Image.open(sorted(coco_images.glob("*.jpg"))[0])], max_new_tokens=6)
    assert len(texts) == 1 and texts[0]


def test_prompt_is_masked_out_of_the_loss():
    cm = build_caption_model(CaptionerSpec(preset="tiny"))
    batch = cm.text_batch(["A dog on a couch.", "two cats"], 40)
    prompt_len = 1 + len(cm.tokenizer("a picture of ", add_special_tokens=False)["input_ids"])
    assert (batch.labels[:, :prompt_len] == -100).all()
    assert batch.labels[0, prompt_len] == cm.tokenizer.convert_tokens_to_ids("a")
    assert batch.input_ids[1, -1] == cm.tokenizer.pad_token_id and batch.labels[1, -1] == -100
    assert batch.tokens() == int((batch.labels != -100).sum())


def test_prefix_model_trains_on_features_exactly_as_llava_runs(tiny_parts, tmp_path, coco_images):
    spec = CaptionerSpec(preset="prefix", vision_model=str(tiny_parts["clip"]), text_model=str(tiny_parts["gpt2"]))
    cm = build_caption_model(spec)
    assert cm.num_image_tokens == 16 and not any(p.requires_grad for p in cm.model.model.vision_tower.parameters())
    images = [Image.open(p).convert("RGB") for p in sorted(coco_images.glob("*.jpg"))[:2]]
    pixels = cm.image_processor(images, return_tensors="pt")["pixel_values"]
    batch = cm.text_batch(["A man rides a horse.", "Two dogs play"], 40)
    # the Llava processor (what inference and plain transformers use) makes the same prompt tokens
    proc = prefix_processor(cm.image_processor, cm.tokenizer, cm.model.config)
    prompt = proc(images=images[:1], text=IMAGE_TOKEN + "a picture of", return_tensors="pt")["input_ids"][0]
    assert torch.equal(batch.input_ids[0, : len(prompt)], prompt)
    assert (batch.labels[:, : len(prompt)] == -100).all() and batch.labels[0, len(prompt)] != -100
    cm.model.eval()
    loss = cm.loss_module(0.0)
    with torch.no_grad():
        reference = cm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
        ours = loss.logits(pixels, batch.input_ids, batch.attention_mask)
        from_features = loss.logits(prefix_image_features(cm.model, pixels), batch.input_ids, batch.attention_mask)
    assert torch.allclose(ours, reference, atol=1e-5) and torch.allclose(from_features, reference, atol=1e-5)
    cm.save(tmp_path / "prefix")


def test_checkpoints_load_with_plain_transformers(tiny_checkpoint, tiny_parts, coco_images, tmp_path):
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "captioner.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    spec = CaptionerSpec(preset="prefix", vision_model=str(tiny_parts["clip"]), text_model=str(tiny_parts["gpt2"]))
    build_caption_model(spec).save(tmp_path / "prefix")
    image = sorted(coco_images.glob("*.jpg"))[0]
    ours = [
        load_captioner(str(folder), "cpu").caption([Image.open(image)], max_new_tokens=6)[0]
        for folder in (tiny_checkpoint, tmp_path / "prefix")
    ]
    script = plain_script([(PLAIN_ENCODER_DECODER, tiny_checkpoint, image, 6), (PLAIN_PREFIX, tmp_path / "prefix", image, 6)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-2:] == ours


def test_load_captioner_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a captioner checkpoint"):
        load_captioner(str(tmp_path), "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError):
        load_captioner(str(tmp_path), "cpu")


def test_caption_cli_captions_real_files_and_skips_broken_ones(tiny_checkpoint, coco_images, tmp_path):
    from typer.testing import CliRunner

    from icsd.cli import app

    folder = tmp_path / "imgs"
    folder.mkdir()
    real = sorted(coco_images.glob("*.jpg"))[:3]
    for p in real:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(real[0].read_bytes()[:200])
    (folder / "notes.png").write_text("not an image")
    out = tmp_path / "caps.jsonl"
    args = ["caption", "--model", str(tiny_checkpoint), str(folder), str(tmp_path / "missing.jpg"),
            "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [Path(x["image"]).name for x in lines] == [p.name for p in real]
    assert all(isinstance(x["caption"], str) and x["caption"] for x in lines)
    assert "broken.jpg" in res.output and "notes.png" in res.output and "missing.jpg" in res.output
    assert "3 images captioned, 3 skipped" in res.output

    coco_out = tmp_path / "preds.json"
    pattern = str(folder / "0*.jpg")
    res = CliRunner().invoke(app, ["caption", "-m", str(tiny_checkpoint), pattern, "-f", "coco", "-o", str(coco_out), "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    preds = json.loads(coco_out.read_text())
    assert sorted(p["image_id"] for p in preds) == sorted(int(p.stem) for p in real)


def test_caption_cli_errors_are_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from icsd.cli import main

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00" * 10)
    monkeypatch.setattr(sys, "argv", ["icsd", "caption", "-m", str(tiny_checkpoint), str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: none of the 1 files could be read" in err
    assert "Traceback" not in err
