"""How ``configs/icsd_coco.yaml`` relates to the official ICSD code (github FeipengMa6/ICSD).

One table, aspect by aspect: what the official code does (file and line), the paper config's
settings, icsd's default elsewhere where it differs, and why. Rows with ``settings`` are checked
against the resolved paper config by the test suite, and ``docs/fidelity.md`` is generated from
this table (``python -m icsd.fidelity > docs/fidelity.md``; a test fails when the file is stale),
so the document cannot drift from the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAPER_CONFIG = "configs/icsd_coco.yaml"


@dataclass(frozen=True)
class Row:
    aspect: str
    official: str
    where: str
    icsd: str
    settings: dict[str, Any] = field(default_factory=dict)
    default_elsewhere: str = "same"
    why: str = ""
    #: match: the paper config does what the official code does (``settings`` hold it) |
    #: deviation: it does not (``restore`` names the setting that would, or is empty) |
    #: inconsistent: the official code contradicts itself here
    kind: str = "match"
    restore: str = ""


ROWS: tuple[Row, ...] = (
    Row(
        "caption encoder",
        "CLIP ViT-B/16 text tower, L2-normalised features",
        "preprocess/extract_caption_features.py:28, preprocess/initial_grouping.py:71",
        "the same model through transformers",
        {"embed.model": "openai/clip-vit-base-patch16", "embed.kind": "clip"},
        "all-MiniLM-L6-v2 (packaged, offline)",
        "the default elsewhere must run offline; the paper config names the CLIP tower",
        kind="match",
    ),
    Row(
        "candidate sets",
        "exact inner-product top-30, the head caption first",
        "preprocess/initial_grouping.py:72-88, preprocess/remapping.py:100",
        "exact faiss flat search, K = 30, head first",
        {"group.k": 30, "group.index": "flat"},
    ),
    Row(
        "duplicate candidate sets",
        "each caption's top-30 is keyed on its first hit (the caption itself, or an identical caption "
        "found first); sets sharing a key are joined, in order, into one prompt of 60 or more captions",
        "preprocess/preprocess_for_chatgpt.py:14-19, generation/sele_and_sum.py:98-104",
        "`duplicates: merge`: sets keyed on their first hit (search order, no reordering) and joined",
        {"group.duplicates": "merge"},
        "`drop`: each set starts with its own caption; a set whose members equal an earlier set's is dropped",
        "an identical set gives the same prompt and a near-identical image: an LLM call and a render "
        "spent for no new data (the official no-selection variant drops them too, preprocess/remapping.py:38-59)",
    ),
    Row(
        "LLM prompt",
        "one fixed English instruction; captions as `<1> caption. <2> caption. ` (a period added)",
        "generation/sele_and_sum.py:61, 74-79, 99-104",
        "the official text verbatim as the named prompt `official`",
        {"summarize.prompt": "official"},
        "`icsd`: a reworded prompt with numbered lines (selectable as `prompt: icsd`)",
        "small local models copy less and answer in form more often with the reworded prompt",
        kind="match",
    ),
    Row(
        "LLM sampling",
        "no temperature sent (the API default), max_tokens 500",
        "generation/sele_and_sum.py:17-21",
        "temperature omitted, 500 new tokens",
        {"summarize.temperature": None, "summarize.max_new_tokens": 500},
        "temperature 0 (greedy) for the packaged local model",
        "greedy answers make offline runs repeatable",
        kind="match",
    ),
    Row(
        "structured output",
        "none: plain text, parsed afterwards",
        "generation/sele_and_sum.py:17-21",
        "plain text (`response_format: text`)",
        {"summarize.response_format": "text"},
        "`auto`: JSON schema where the server offers it, stepping down on refusal",
        "a schema makes small and local models answer in form far more often",
        kind="match",
    ),
    Row(
        "answer parsing",
        "`eval()` of the answer; any dict whose two values are an index list and a summary is kept, "
        "whatever the count or length",
        "generation/postprocess.py:22-27, 37-45",
        "`answers: official`: a Python-literal or JSON dict, any number of in-range indices, any "
        "length, read with a literal parser (no code is ever evaluated)",
        {"summarize.answers": "official"},
        "`strict`: 5-10 unique indices, at most 50 words",
        "eval() on model output runs code; an index 0 wraps to the last caption there "
        "(meta_list[int(ii)-1]): icsd calls it invalid",
        kind="match",
    ),
    Row(
        "LLM",
        "gpt-3.5-turbo through OpenAI's API",
        "generation/sele_and_sum.py:11",
        "any chat model on an OpenAI-compatible server (the config names Meta-Llama-3-8B-Instruct)",
        {"summarize.backend": "openai"},
        "the packaged SmolLM2-135M-Instruct in process (offline)",
        "the gpt-3.5-turbo snapshot of the paper's time is retired; set summarize.model to any model",
        kind="deviation",
    ),
    Row(
        "answers wrapped in prose or code fences",
        "dropped: eval() of the whole text fails",
        "generation/postprocess.py:25",
        "the first `{...}` of the answer is read",
        why="a few answers the official run lost are kept; the content rules are the same",
        kind="deviation",
    ),
    Row(
        "answer keys",
        "exactly two keys, whatever their names (`index_k, summary_k = list(index_summary.keys())`); "
        "a dict with more or fewer keys raises, and the answer is dropped",
        "generation/postprocess.py:35-38, 50-51",
        "`index`/`summary` by name, else the two keys in order; extra keys ignored",
        why="an extra key no longer drops the whole answer",
        kind="deviation",
    ),
    Row(
        "bad indices",
        "0 wraps to the last caption, negatives wrap, 2.5 becomes 2, True becomes 1, a duplicate index "
        "pairs its caption twice, an empty list keeps a summary with no pairs",
        "generation/postprocess.py:41-49",
        "0, negative, out-of-range, non-integer and empty selections are `invalid`; duplicates count once; "
        "digit strings such as '3' are read as numbers",
        why="plain bugs of the official parser",
        kind="deviation",
    ),
    Row(
        "failed requests",
        "2 tries on exceptions, then the group's answer is stored as None; rerunning the script asks "
        "the None groups again (answers that came back but do not parse are kept and never re-asked)",
        "generation/sele_and_sum.py:11-41, 48-56, 81-87, 94-96",
        "transport retries with backoff; a plain rerun keeps every record, failed ones included; "
        "`--retry` re-asks the groups that are not ok (failed, parse_error or invalid), with a new seed",
        why="a failed or nonsensical answer can be redone without redoing the run",
        kind="deviation",
    ),
    Row(
        "answers checked for sense",
        "none: a copied placeholder is kept as a summary",
        "generation/postprocess.py:37-45",
        "a summary that copies the prompt's placeholder, is empty or shares no content word with "
        "its captions is `invalid` (every mode)",
        why="a copied placeholder rendered and trained on is silent garbage",
        kind="deviation",
    ),
    Row(
        "rendering",
        "Stable Diffusion v1.4, fp16, DPM-Solver multistep, 20 steps, guidance 7.5, 512x512",
        "generation/generate_images.py:85-95",
        "the same",
        {"render.model": "CompVis/stable-diffusion-v1-4", "render.scheduler": "dpm++", "render.steps": 20,
         "render.guidance": 7.5, "render.size": 512, "render.dtype": "fp16"},  # fmt: skip
    ),
    Row(
        "image files",
        "each render saved with `imgs[j].save(path.jpg)`: JPEG at PIL's default quality, 75",
        "generation/generate_images.py:96-99",
        "JPEG at quality 75, byte for byte what PIL's default writes",
        {"render.image_format": "jpg", "render.quality": 75},
        "quality 95",
        "fewer compression artefacts for the captioner to learn, at about twice the bytes",
    ),
    Row(
        "NSFW images",
        "the pipeline's safety checker blacks them; a script finds black images and drops them",
        "generation/verify_nsfw_images.py:35, 49-57",
        "the safety checker's flag is recorded per image; pairs leave flagged images out",
        {"render.safety_checker": True, "pairs.include_nsfw": False},
    ),
    Row(
        "training pairs",
        "each rendered image with each selected original caption",
        "generation/postprocess.py:41-48",
        "the same (`pairs.kinds: [selected]`)",
        {"pairs.kinds": ["selected"]},
    ),
    Row(
        "caption text for training",
        'lower-cased, `.!"()*#:;~` replaced by spaces, at most 30 words',
        "training/data/utils.py:8-23, training/data/coco_karpathy_dataset.py:79",
        "`caption_style: official`, `caption_max_words: 30`",
        {"train.caption_style": "official", "train.caption_max_words": 30},
        "`plain` (whitespace collapsed, case and punctuation kept)",
        "kept as written elsewhere so that other corpora's casing survives",
        kind="match",
    ),
    Row(
        "captioner",
        "CLIP ViT-B/32 at 384 px (positions interpolated) + BERT-base decoder with cross-attention, "
        'prompt "a picture of ", label smoothing 0.1, captions cut at 40 tokens',
        "training/configs/caption_coco_config.py:29-40, training/src/blip.py:120, training/src/med.py:722",
        "the `icsd` preset",
        {"train.preset": "icsd", "train.image_size": 384, "train.prompt": "a picture of ",
         "train.label_smoothing": 0.1, "train.max_tokens": 40},  # fmt: skip
    ),
    Row(
        "decoder start and LM head",
        "the tokenizer gains `[DEC]` (BOS) and `[ENC]`; every caption starts with `[DEC]` in training and "
        "decoding; the decoder is `BertLMHeadModel(config)` with only `.bert` replaced by bert-base-uncased, "
        "so the LM-head transform and output bias start fresh (output weights tied to the embeddings, two "
        "new rows drawn N(0, 0.02))",
        "training/src/blip.py:103-109, 121, 145, 297-302, training/configs/med_config.json",
        "`decoder_style: blip` (the `icsd` preset's default): the same tokens, start and initialisation",
        {"train.decoder_style": "blip"},
        "`bert` for the tiny, sandbox and prefix presets: the text model's MLM head, starting from `[CLS]`",
        "the small presets train from random weights, where the two starts are the same thing",
    ),
    Row(
        "optimisation",
        "AdamW lr 1e-5, weight decay 0.05, batch 64 per GPU, 30 epochs",
        "training/configs/caption_coco_config.py:21-35, training/train_on_coco_img_iter.py:106",
        "the same",
        {"train.lr": 1e-5, "train.weight_decay": 0.05, "train.batch_size": 64, "train.epochs": 30},
    ),
    Row(
        "learning-rate schedule",
        "cosine to 0 over epochs, set at each epoch boundary (constant within an epoch)",
        "training/utils.py:6, training/train_on_coco_img_iter.py:141-143",
        "`lr_schedule: epoch`",
        {"train.lr_schedule": "epoch", "train.warmup_steps": 0},
        "`step`: cosine per optimizer step",
        "a per-step decay is smoother and equal at every epoch boundary",
        kind="match",
    ),
    Row(
        "precision and clipping",
        "fp32, no gradient clipping",
        "training/configs/caption_coco_config.py:16, training/train_on_coco_img_iter.py:133-137",
        "`bf16: false`, `max_grad_norm: 0`",
        {"train.bf16": False, "train.max_grad_norm": 0.0},
        "bf16 autocast on GPU, clipping at 1.0",
        "bf16 is about twice as fast on current GPUs; clipping guards short runs at higher rates",
        kind="match",
    ),
    Row(
        "augmentation",
        "RandomResizedCrop(384, scale 0.5-1, bicubic) + horizontal flip",
        "training/data/__init__.py:15-20",
        "the same, without torchvision",
        {"train.crop_scale_min": 0.5},
    ),
    Row(
        "data order",
        "each (image, caption) pair once per pass in one global shuffle: DistributedSampler seeded with "
        "seed + the iteration count at the pass's start, rank r taking every world-th pair, the tail "
        "padded by repeating pairs",
        "training/data/iter_dataloader.py:13-45",
        "`data_order: official`: each pair exactly once per epoch, randperm seeded with seed + epoch, "
        "rank r taking the interleaved slice r::world of each global batch (the same sequence on any "
        "number of GPUs, resumable mid-epoch); a short last batch instead of repeated pairs",
        {"train.data_order": "official"},
        "`streams`: shards drawn with replacement through a 1,000-pair shuffle buffer",
        "streams read shards sequentially, for file systems that serve random reads badly",
        kind="match",
    ),
    Row(
        "image-grouped steps",
        "every pair runs the vision encoder on its own image crop",
        "training/src/blip.py:114-119",
        "the same (`group_captions: false`)",
        {"train.group_captions": False},
        "same",
        "a deviation when on (`group_captions: true`, with `data_order: official`): a step takes images "
        "with all their captions, the vision encoder and cross-attention keys/values run once per image "
        "(about 3x fewer FLOPs per pair at 7 captions per image), the loss per caption token is unchanged, "
        "but an image's captions share one crop and one step",
        kind="match",
    ),
    Row(
        "test-time image",
        "resized to 384x384 (aspect ratio not kept), bicubic",
        "training/data/__init__.py:21-25",
        "`test_resize: squash`, saved in the checkpoint's image processor",
        {"train.test_resize": "squash"},
        "`crop`: shortest side to 384, centre crop (CLIP's own processing)",
        "a crop keeps the aspect ratio, as CLIP was trained",
        kind="match",
    ),
    Row(
        "checkpoint selection",
        "CIDEr + BLEU-4 on all val images, PTB tokenizer (COCOEvalCap), every 500 iterations",
        "training/train_on_coco_img_iter.py:144-171, training/configs/caption_coco_config.py:23",
        "`val_max_images: null`, `val_tokenizer: ptb`, `eval_every: 500`",
        {"train.val_max_images": None, "train.val_tokenizer": "ptb", "train.eval_every": 500},
        "the first 500 val images, Python tokenisation, every 1,000 steps",
        "a faster check for short runs",
        kind="match",
    ),
    Row(
        "decoding",
        "beam 3, min_length 5 / max_length 30 counting the prompt's tokens",
        "training/configs/caption_coco_config.py:30-32, training/src/blip.py:143-166",
        "`beams: 3`, `min_new_tokens: 5`, `max_new_tokens: 30`, `decode_lengths: total`",
        {"train.beams": 3, "train.min_new_tokens": 5, "train.max_new_tokens": 30, "train.decode_lengths": "total",
         "evaluate.beams": 3, "evaluate.min_new_tokens": 5, "evaluate.max_new_tokens": 30,
         "evaluate.decode_lengths": "total"},  # fmt: skip
        "`new`: 5-30 new tokens after the prompt",
        "lengths that do not depend on the prompt's length",
        kind="match",
    ),
    Row(
        "beam scores",
        "transformers 4.15 (the dockerfile's pin): a finished beam's log-probability divided by its full "
        "length, the prompt `[DEC] a picture of` included and the end token not counted; the early-stop "
        "bound over the same length",
        "dockerfile:37, training/src/blip.py:159-166",
        "`length_norm: total`: the same division around transformers 5's own beam search; saved in the "
        "checkpoint",
        {"train.length_norm": "total", "evaluate.length_norm": "total"},
        "`new` for the tiny, sandbox and prefix presets: transformers 5's division by the new tokens, end "
        "token included",
        "the division that current transformers makes, for checkpoints of other families",
    ),
    Row(
        "decoding precision",
        "fp32: validation and test decoding run without autocast",
        "training/configs/caption_coco_config.py:16, training/train_on_coco_img_iter.py:63-73",
        "`decode_dtype: fp32` (the `icsd` preset's default); saved in the checkpoint",
        {"train.decode_dtype": "fp32", "evaluate.decode_dtype": "fp32"},
        "`bf16` autocast on a GPU for the other presets (no effect on the CPU)",
        "bf16 decodes faster; beams can change where two scores differ by less than bf16's rounding",
    ),
    Row(
        "evaluation",
        "pycocoevalcap on PTB-tokenised text",
        "training/data/utils.py:70",
        "pycocoevalcap's scorers, equal to COCOEvalCap to the last digit",
    ),
    Row(
        "uni-context baseline",
        "one image per caption of the whole corpus (paper, Table 4); the render script names each image "
        "`{image_id}_{coco_id}.jpg`, but the uni-context training set opens `{image_id}.jpg` unless the "
        "image folder's path contains 'ss1m': as published, the COCO baseline does not find its images",
        "generation/generate_images.py:45-49, 98, training/data/coco_karpathy_dataset.py:136-141",
        "configs/uni_context_coco.yaml renders every caption (`render.sample` unset); each image is "
        "paired with its caption by key, whatever the file name",
        why="icsd keys images and captions in the run directory, so the contradiction cannot arise; "
        "`render.sample N` exists for a cheaper baseline at a fixed image budget",
        kind="inconsistent",
    ),
    Row(
        "no-selection variant",
        "the first 5 neighbours of each set, duplicate groups removed, no LLM",
        "preprocess/remapping.py:16-55, 102",
        "`summarize.mode: remap` (n 5) in configs/ablation_no_selection.yaml: the head caption is "
        "rendered and its image paired with the 5 captions (training/data/coco_karpathy_dataset.py:98 opens "
        "`head_id + '.jpg'`); repeated sets dropped",
        why="the official per-caption `group_times` weight is not kept: its training dataset returns weight 0 "
        "and never uses it; `first-n` (the LLM condenses the first n captions) stays available",
    ),
    Row(
        "cross-domain model selection",
        "the target domain's val split (eval_type picks val and test of the target)",
        "training/data/__init__.py:31-64",
        "coco_to_flickr30k and flickr30k_to_coco select on the target's val split; coco_to_nocaps "
        "on COCO val",
        why="NoCaps' only public references are its val split, the split that is reported: icsd "
        "never selects a checkpoint on the split it reports",
        kind="deviation",
    ),
)


def resolved_paper_values(root: Path) -> dict[str, Any]:
    """Every dotted key of the resolved paper config."""
    from .config import leaves, resolve

    return leaves(resolve(root / PAPER_CONFIG).config.model_dump(mode="json"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _settings(settings: dict[str, Any]) -> str:
    import json

    return "<br>".join(f"`{k}: {json.dumps(v)}`" for k, v in settings.items())


def kind_cell(row: Row) -> str:
    """match | deviation (and what restores the official behaviour) | official code inconsistent."""
    if row.kind == "deviation":
        return f"deviation (restore: {row.restore})" if row.restore else "deviation (no setting restores it)"
    return "official code inconsistent" if row.kind == "inconsistent" else row.kind


def markdown() -> str:
    """docs/fidelity.md."""
    lines = [
        "# Fidelity: the paper config against the official code",
        "",
        "`configs/icsd_coco.yaml` reproduces the official ICSD code (github FeipengMa6/ICSD) by default.",
        "This table lists every aspect, the official code's file and line (at the repository's HEAD), the",
        "settings of the paper config (checked against the resolved config by `tests/test_fidelity.py`),",
        "icsd's default elsewhere when it differs, and why. *match*: the paper config does what the",
        "official code does; *deviation*: it does not, on purpose, with its reason and the setting that",
        "would restore the official behaviour, if any; *official code inconsistent*: the official code",
        "contradicts itself, so no single behaviour can be reproduced.",
        "",
        "Generated from `src/icsd/fidelity.py` (`python -m icsd.fidelity > docs/fidelity.md`).",
        "",
        "| aspect | official code | where | icsd paper config | settings | default elsewhere | kind | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        cells = [r.aspect, r.official, r.where, r.icsd, _settings(r.settings), r.default_elsewhere, kind_cell(r), r.why]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
