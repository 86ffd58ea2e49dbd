"""Cards for what a run publishes: the dataset card of an export and the model card beside each
trained checkpoint (``RUN/train/best/README.md``, ``RUN/train/last/README.md``).

Both are Markdown with the YAML front matter the Hugging Face Hub reads. Everything in them is
read from the run directory (config.yaml, manifest.json, the checkpoint's captioner.json, the
evaluations' scores.json); the model card is rewritten after training and after each evaluation,
so its test scores are the latest. A README.md does not change what ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..store import RunDir, atomic_write_text
from .recipe import Recipe, read_recipe, run_config

CITATION = """@inproceedings{ma2024icsd,
  title     = {Image Captioning with Multi-Context Synthetic Data},
  author    = {Ma, Feipeng and Zhou, Yizhou and Rao, Fengyun and Zhang, Yueyi and Sun, Xiaoyan},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  volume    = {38},
  number    = {5},
  pages     = {4089--4097},
  year      = {2024}
}"""
PAPER_URL = "https://doi.org/10.1609/aaai.v38i5.28203"
SCORE_KEYS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def card(meta: dict[str, Any], body: list[str]) -> str:
    """YAML front matter, the body, and the paper's citation."""
    return front_matter(meta) + "\n" + "\n".join([*body, "## Citation", "", "```bibtex", CITATION, "```", ""])


def corpus_licence(recipe: Recipe) -> tuple[str, str]:
    """(Hub licence id, words) of the caption corpus the data was made from."""
    corpus = str(recipe.setting("ingest", "corpus", "") or "").lower()
    if "coco" in corpus:
        return "cc-by-4.0", "COCO captions: CC BY 4.0"
    if "sandbox" in corpus:
        return "apache-2.0", "icsd's sandbox world (generated text, Apache-2.0)"
    return "other", f"the licence of the caption corpus ({Path(corpus).name or 'unknown'}): set it before publishing"


def size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def recipe_lines(recipe: Recipe) -> list[str]:
    """The settings that made the synthetic data, one bullet each."""
    s = recipe.setting
    sums = ", ".join(f"`{name}` SHA-256 {str(sha)[:16]}" for name, sha in recipe.inputs.items())
    lines = [
        f"- caption corpus: {sums or Path(str(s('ingest', 'corpus'))).name} ({s('ingest', 'format')}"
        + (f", splits {', '.join(s('ingest', 'splits') or [])}" if s("ingest", "format") == "karpathy" else "")
        + ")",
    ]
    if "group" in recipe.stages:
        lines.append(f"- embedder: `{s('embed', 'model')}`; candidate sets: top-{s('group', 'k')} neighbours "
                     f"({s('group', 'index')} index)")  # fmt: skip
    if "summarize" in recipe.stages:
        lines.append(f"- LLM: `{s('summarize', 'model')}` ({s('summarize', 'backend')}), prompt "
                     f"`{s('summarize', 'prompt') or 'icsd'}`, mode {s('summarize', 'mode')}, "
                     f"select {s('summarize', 'min_select')}-{s('summarize', 'max_select')} captions")  # fmt: skip
    if "render" in recipe.stages:
        lines.append(f"- text-to-image: `{s('render', 'model')}`, {s('render', 'scheduler')} "
                     f"{s('render', 'steps')} steps, guidance {s('render', 'guidance')}, {s('render', 'size')} px, "
                     f"prompts: {s('render', 'prompts')}, seed {s('render', 'seed')}")  # fmt: skip
    if "pairs" in recipe.stages:
        lines.append(f"- pairs: kinds {', '.join(s('pairs', 'kinds') or [])}")
    lines.append(f"- recipe hash: `{recipe.hash}` (the settings above and the corpus's SHA-256; the same hash "
                 "means the same data)")  # fmt: skip
    return lines


def count_lines(recipe: Recipe) -> list[str]:
    c = recipe.counts
    named = [
        ("captions in the corpus", c.get("ingest", {}).get("kept")),
        ("candidate sets", c.get("group", {}).get("groups") or c.get("group", {}).get("kept")),
        ("LLM answers kept", c.get("summarize", {}).get("ok")),
        ("images", c.get("render", {}).get("images")),
        ("image-caption pairs", c.get("pairs", {}).get("pairs")),
    ]
    return [f"- {name}: {value:,}" for name, value in named if isinstance(value, int)]


# ----------------------------------------------------------------------------- dataset card


def dataset_card(recipe: Recipe, run_root: Path, *, pairs: int, images: int, fmt: str) -> str:
    licence, licence_words = corpus_licence(recipe)
    meta: dict[str, Any] = {
        "license": licence,
        "task_categories": ["image-to-text", "text-to-image"],
        "language": ["en"],
        "tags": ["synthetic", "image-captioning", "icsd"],
        "size_categories": [size_category(pairs)],
        "pretty_name": f"ICSD synthetic image-caption pairs ({run_root.name})",
    }
    if fmt == "hf":
        from .export import FEATURES

        meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
        meta["dataset_info"] = {
            "features": [_yaml_feature(name, f) for name, f in FEATURES.items()],
        }
    image_model = recipe.setting("render", "model")
    body = [
        f"# ICSD synthetic image-caption pairs: {run_root.name}",
        "",
        "Made with icsd by the method of [*Image Captioning with Multi-Context Synthetic Data*]"
        f"({PAPER_URL}) (Ma et al., AAAI 2024): every caption's nearest captions form a "
        "candidate set, an LLM selects the ones that describe one scene and summarises them into one "
        "prompt, a text-to-image model draws it, and the image is paired with each selected caption. "
        "No real image-caption pair is used.",
        "",
        "## Counts",
        "",
        f"- rows (pairs): {pairs:,}; images: {images:,}",
        *count_lines(recipe),
        "",
        "## How it was made",
        "",
        *recipe_lines(recipe),
        "",
        "## Columns" if fmt == "hf" else "## Files",
        "",
        *(
            [
                "- `image`: the generated image (bytes as rendered); `caption`: one caption of the corpus; "
                "`kind`: selected | summary | uni",
                "- `group_id`: the candidate set (= the image); `summary`: the prompt the image was drawn from; "
                "`selected_captions`: every caption the LLM selected for it",
                "- `seed`, `image_model`: how the image was drawn; `llm_model`: the LLM that selected and summarised",
            ]
            if fmt == "hf"
            else ["- `shard-NNNNN.tar`: per image `KEY.<ext>`, `KEY.txt` (its captions, one a line), `KEY.json` "
                  "(captions, kinds, group_id, summary, selected_captions, seed, image_model, llm_model)"]  # fmt: skip
        ),
        "",
        "## Licence and use",
        "",
        f"- captions: {licence_words}",
        f"- images: generated by `{image_model}`; its licence's use restrictions apply to them",
        "- intended for research on image captioning; synthetic images can carry the text-to-image model's "
        "biases and artefacts, and captions describe the prompt, not necessarily every detail drawn",
        "",
        "## Load",
        "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset(\"PATH_OR_REPO\", split=\"train\")" if fmt == "hf" else "import webdataset as wds",
        "```",
        "",
    ]
    return card(meta, body)


def _yaml_feature(name: str, feature: dict[str, Any]) -> dict[str, Any]:
    if feature["_type"] == "Image":
        return {"name": name, "dtype": "image"}
    if feature["_type"] == "Sequence":
        return {"name": name, "sequence": feature["feature"]["dtype"]}
    return {"name": name, "dtype": feature["dtype"]}


# ----------------------------------------------------------------------------- model card


def checkpoint_scores(run: RunDir, folder: Path) -> list[dict[str, Any]]:
    """The evaluations of the run that scored this checkpoint (scores.json documents)."""
    out = []
    for f in sorted((run.root / "eval").glob("*/scores.json")):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        checkpoint = doc.get("checkpoint") if isinstance(doc, dict) else None
        if checkpoint and Path(checkpoint).expanduser().resolve() == folder.resolve():
            out.append(doc)
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hub_id(value: Any) -> str | None:
    text = str(value or "")
    return text if text.count("/") == 1 and not Path(text).exists() else None


def model_card(run_root: Path, folder: Path) -> str:
    run = RunDir.at(run_root, create=False)
    recipe = read_recipe(run.root)
    train = run_config(run).get("train", {})
    info = _read(folder / "captioner.json")
    arch = _read(folder / "config.json").get("architectures") or ["?"]
    evaluations = checkpoint_scores(run, folder)
    bases = [m for m in (info.get("vision_model"), info.get("text_model")) if m]
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-to-text",
        "tags": ["image-captioning", "synthetic-data", "icsd"],
        "license": "other",
    }
    hub_bases = [b for b in map(_hub_id, bases) if b]
    if hub_bases:
        meta["base_model"] = hub_bases
    if evaluations:
        meta["model-index"] = [{"name": run.root.name, "results": [
            {"task": {"type": "image-to-text", "name": "Image Captioning"},
             "dataset": {"type": doc.get("benchmark", "?"), "name": doc.get("benchmark", "?"),
                         "split": doc.get("split") or "test"},
             "metrics": [{"type": k.lower(), "name": k, "value": round(float(doc[k]), 4)}
                         for k in SCORE_KEYS if isinstance(doc.get(k), int | float)]}
            for doc in evaluations]}]  # fmt: skip
    val = info.get("val") or {}
    body = [
        f"# ICSD captioner: {run.root.name} ({folder.name})",
        "",
        "An image captioner trained only on multi-context synthetic image-caption pairs (ICSD, Ma et al., "
        "AAAI 2024), made with icsd. No real image-caption pair was used in training.",
        "",
        "## Architecture",
        "",
        f"- `{arch[0]}` ({info.get('kind', '?')}, preset `{info.get('preset', '?')}`), input {info.get('image_size', '?')} px, "
        f"prompt `{info.get('prompt', '')!s}`",
        f"- base models: vision `{info.get('vision_model') or '-'}`, text `{info.get('text_model') or '-'}`",
        "",
        "## Synthetic training data",
        "",
        *count_lines(recipe),
        *recipe_lines(recipe),
        "",
        "## Training",
        "",
        f"- step {info.get('step', '?')} of this checkpoint; "
        + ", ".join(f"{k} {train[k]}" for k in ("lr", "weight_decay", "batch_size", "grad_accum", "epochs", "max_steps",
                                                 "label_smoothing", "caption_style", "bf16") if k in train and train[k] is not None)  # fmt: skip
        ,
        f"- checkpoint selection: CIDEr + BLEU-4 on {info.get('val_source') or 'the validation split'}"
        + (f" (score {val['score']:.4f}: CIDEr {val.get('CIDEr', 0):.4f}, BLEU-4 {val.get('BLEU-4', 0):.4f} "
           f"on {val.get('images', '?')} images)" if isinstance(val.get("score"), int | float) else "")  # fmt: skip
        ,
        "",
        "## Test scores",
        "",
        *score_lines(evaluations),
        "",
        "## Use",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel",
        "",
        "ckpt = \"PATH_OR_REPO\"",
        "model = VisionEncoderDecoderModel.from_pretrained(ckpt).eval()",
        "tokenizer, processor = AutoTokenizer.from_pretrained(ckpt), AutoImageProcessor.from_pretrained(ckpt)",
        "pixels = processor(Image.open(\"photo.jpg\").convert(\"RGB\"), return_tensors=\"pt\").pixel_values",
        f"prompt = tokenizer({str(info.get('prompt', '')).strip()!r}, return_tensors=\"pt\").input_ids[:, :-1]",
        "out = model.generate(pixel_values=pixels, decoder_input_ids=prompt)",
        "print(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "Or `icsd caption --model PATH photo.jpg`.",
        "",
        "## Intended use and limits",
        "",
        "- research on image captioning without human-paired data; describing everyday photos in English",
        "- it learned from generated images: photos unlike what the text-to-image model draws, text in images, "
        "counting and rare objects are weak spots; it inherits the biases of the caption corpus, the LLM and "
        "the text-to-image model",
        "- not for decisions about people, accessibility without human review, or safety-critical use",
        "",
    ]
    return card(meta, body)


def score_lines(evaluations: list[dict[str, Any]]) -> list[str]:
    if not evaluations:
        return ["Not evaluated yet: `icsd evaluate --run RUN --model THIS_FOLDER ...` adds the scores here."]
    lines = []
    for doc in evaluations:
        shown = ", ".join(f"{k} {float(doc[k]):.4f}" for k in SCORE_KEYS if isinstance(doc.get(k), int | float))
        dec = doc.get("decoding") or {}
        sel = doc.get("selection") or {}
        lines.append(
            f"- **{doc.get('benchmark')}** ({doc.get('split') or 'all'} split, {sel.get('predictions', '?')} images): {shown}"
        )
        lines.append(
            f"  - protocol: pycocoevalcap on PTB-tokenised text, 0-1 scale (papers print x100); beam "
            f"{dec.get('beams', '?')}, {dec.get('min_new_tokens', '?')}-{dec.get('max_new_tokens', '?')} new tokens; "
            f"references `{Path(str(doc.get('annotations', ''))).name}` (SHA-256 {str(doc.get('annotations_sha256', ''))[:12]})"
            + ("; a subset of the images" if sel.get("subset") else "")
        )
        if isinstance(doc.get("domains"), dict):
            for name, block in doc["domains"].items():
                if isinstance(block, dict) and isinstance(block.get("CIDEr"), int | float):
                    lines.append(f"  - {name}: CIDEr {float(block['CIDEr']):.4f}")
    return lines


def write_model_cards(run_root: Path) -> list[Path]:
    """README.md beside each finished checkpoint of the run (train/best, train/last)."""
    run = RunDir.at(run_root, create=False)
    written = []
    for name in ("best", "last"):
        folder = run.train / name
        if (folder / "config.json").is_file():
            atomic_write_text(folder / "README.md", model_card(run.root, folder))
            written.append(folder / "README.md")
    return written
