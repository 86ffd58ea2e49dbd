"""Random-weight models at the real architectures of the hub ids a config names, built offline
from the configuration objects of transformers and diffusers and written as ordinary
``save_pretrained`` folders, so that the stages load them through the same code a hub id takes.

Every known id maps to an :class:`Architecture`: its family and the config of each component, as
published with the checkpoint (CLIP ViT-B/16, ViT-B/32 and ViT-L/14, BERT-base, Stable Diffusion
v1.x); both are tables of the package data file ``tables/random_models.json``. ``scale="tiny"`` keeps every class, layer type, patch size and vocabulary and shrinks widths
and depths: the same code path at test speed.

Each built folder is checked once: the outputs of the model in memory on a fixed input equal the
outputs of the folder loaded back with plain transformers / diffusers (:func:`build_folder`).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .errors import UserError

Scale = Literal["paper", "tiny"]

# ----------------------------------------------------------------------------- published configs

TABLES = "tables/random_models.json"
"""The package data file of the known hub ids (``known``) and the published configs of their
components (``clip_text``, ``clip_vision``, ``bert_base``, ``sd1_unet``, ``sd1_vae``,
``sd1_scheduler``, ...), read on first use."""


@lru_cache(maxsize=1)
def _tables() -> dict[str, Any]:
    return json.loads(resources.files("icsd").joinpath(TABLES).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def table(name: str) -> Any:
    """A fresh copy of one table of :data:`TABLES` (callers may change it; the next call is untouched)."""
    return copy.deepcopy(_tables()[name])


def shrink(config: dict[str, Any], scale: Scale) -> dict[str, Any]:
    """A transformer config at ``scale``: tiny keeps vocabularies, patch and image sizes."""
    if scale == "paper":
        return dict(config)
    out = {**config, **table("tiny_block")}
    if "projection_dim" in out:
        out["projection_dim"] = 16
    return out


# ----------------------------------------------------------------------------- the known ids


@dataclass(frozen=True)
class Architecture:
    """What a hub id is: its family (``clip``, ``bert``, ``sd1``) and its variant's name."""

    family: str
    variant: str
    title: str


def known() -> dict[str, Architecture]:
    """Every hub id a rehearsal can build, with its architecture (the ``known`` table of :data:`TABLES`)."""
    return {model_id: Architecture(**arch) for model_id, arch in table("known").items()}


def architecture_of(model_id: str) -> Architecture | None:
    arch = table("known").get(model_id)
    return Architecture(**arch) if arch is not None else None


# ----------------------------------------------------------------------------- builders


@dataclass
class Built:
    """A model folder and what the report says about it."""

    role: str
    model_id: str
    path: Path
    title: str
    classes: dict[str, str]
    parameters: dict[str, int]
    roundtrip: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    def describe(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "model_id": self.model_id,
            "path": str(self.path),
            "architecture": self.title,
            "classes": self.classes,
            "parameters": self.parameters,
            "total_parameters": self.total_parameters,
            "roundtrip": self.roundtrip,
            "build_seconds": round(self.seconds, 1),
            "reused": self.reused,
        }


def count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def max_abs_diff(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max())


def clip_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    from .backends.t2i import write_clip_tokenizer_files

    tmp = write_clip_tokenizer_files(folder / "_bpe")
    tok = CLIPTokenizer.from_pretrained(str(tmp), model_max_length=77)
    shutil.rmtree(tmp)
    return tok


def bert_tokenizer() -> Any:
    """bert-base-uncased's WordPiece vocabulary, as the packaged MiniLM ships it (the hub's file is
    not reachable offline; the 30,522 entries are the same)."""
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    from .backends.captioners import minilm_vocab

    return BertTokenizerFast(vocab_file=str(minilm_vocab()), do_lower_case=True, model_max_length=512)


def text_ids(tokenizer: Any) -> Any:
    return tokenizer(["a dog runs on the beach next to a red umbrella"], return_tensors="pt")


def build_clip_text(model_id: str, arch: Architecture, folder: Path, scale: Scale) -> Built:
    """The embedder's text tower with its projection (``CLIPTextModelWithProjection``)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    size = "large" if arch.variant == "L/14" else "base"
    config = CLIPTextConfig(**table("clip_text_common"), **shrink(table("clip_text")[size], scale))
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(config).eval()
    tok = clip_tokenizer(folder)
    batch = text_ids(tok)
    with torch.no_grad():
        ref = model(**batch).text_embeds
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    params = {"text_model": count(model)}
    del model
    gc.collect()
    reloaded = CLIPTextModelWithProjection.from_pretrained(folder).eval()
    with torch.no_grad():
        diff = max_abs_diff(ref, reloaded(**batch).text_embeds)
    return Built(
        "embed", model_id, folder, f"{arch.title} text tower + projection",
        {"text_model": "CLIPTextModelWithProjection"}, params,
        {"loads_with": "transformers.CLIPTextModelWithProjection", "max_abs_diff": diff, "ok": diff == 0.0},
    )  # fmt: skip


def build_clip_vision(model_id: str, arch: Architecture, folder: Path, scale: Scale) -> Built:
    """The captioner's image encoder (``CLIPVisionModel``) and CLIP's image processor."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .backends.captioners import clip_image_processor

    vision = shrink(table("clip_vision")[arch.variant], scale)
    config = CLIPVisionConfig(**vision, hidden_act="quick_gelu")
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    side = int(config.image_size)  # type: ignore[arg-type]
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(pixel_values=pixels).pooler_output
    model.save_pretrained(folder)
    clip_image_processor(side).save_pretrained(folder)
    params = {"vision_model": count(model)}
    del model
    gc.collect()
    reloaded = CLIPVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        diff = max_abs_diff(ref, reloaded(pixel_values=pixels).pooler_output)
    return Built(
        "train.vision_model", model_id, folder, f"{arch.title} vision tower",
        {"vision_model": "CLIPVisionModel"}, params,
        {"loads_with": "transformers.CLIPVisionModel", "max_abs_diff": diff, "ok": diff == 0.0},
    )  # fmt: skip


def build_bert(model_id: str, arch: Architecture, folder: Path, scale: Scale) -> Built:
    """BERT with its masked-LM head, as the hub's checkpoint (the captioner adds cross-attention)."""
    import torch
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    config = BertConfig(**shrink(table("bert_base"), scale))
    torch.manual_seed(0)
    model = BertForMaskedLM(config).eval()
    tok = bert_tokenizer()
    batch = text_ids(tok)
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    params = {"text_model": count(model)}
    del model
    gc.collect()
    reloaded = AutoModelForMaskedLM.from_pretrained(folder).eval()
    with torch.no_grad():
        diff = max_abs_diff(ref, reloaded(**batch).logits)
    return Built(
        "train.text_model", model_id, folder, f"{arch.title}, WordPiece vocabulary of 30,522",
        {"text_model": "BertForMaskedLM"}, params,
        {"loads_with": "transformers.AutoModelForMaskedLM", "max_abs_diff": diff, "ok": diff == 0.0},
    )  # fmt: skip


def sd1_components(folder: Path, scale: Scale) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

    from .backends.captioners import clip_image_processor
    from .backends.t2i import tiny_pipeline_components, write_clip_tokenizer_files

    if scale == "tiny":
        # the tiny pipeline of the offline quickstart: the same classes at a few thousand parameters
        tmp = write_clip_tokenizer_files(folder / "_bpe")
        parts = tiny_pipeline_components(tmp, safety_checker=True, seed=0)
        shutil.rmtree(tmp)
        parts["scheduler"] = PNDMScheduler(**table("sd1_scheduler"))
        return parts
    torch.manual_seed(0)
    text = {**table("clip_text_common"), **table("clip_text")["large"], "pad_token_id": 1}
    checker_config = CLIPConfig(
        text_config={k: v for k, v in text.items() if k != "projection_dim"},
        vision_config={**{k: v for k, v in table("clip_vision")["L/14"].items() if k != "projection_dim"},
                       "hidden_act": "quick_gelu"},
        projection_dim=768,
    )  # fmt: skip
    return {
        "unet": UNet2DConditionModel(**table("sd1_unet")),
        "vae": AutoencoderKL(**table("sd1_vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text)),
        "tokenizer": clip_tokenizer(folder),
        "scheduler": PNDMScheduler(**table("sd1_scheduler")),
        "safety_checker": StableDiffusionSafetyChecker(checker_config).eval(),
        "feature_extractor": clip_image_processor(224),
        "requires_safety_checker": True,
    }  # fmt: skip


def sd1_probe_inputs(parts: dict[str, Any]) -> dict[str, Any]:
    """Small fixed inputs for each network of the pipeline (8x8 latents: cheap at any scale)."""
    import torch

    g = torch.Generator().manual_seed(0)
    text_dim = parts["text_encoder"].config.hidden_size
    size = parts["safety_checker"].config.vision_config.image_size
    return {
        "ids": parts["tokenizer"](["a red bus on a street"], padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids,
        "latents": torch.randn(1, 4, 8, 8, generator=g),
        "context": torch.randn(1, 77, text_dim, generator=g),
        "clip_pixels": torch.randn(1, 3, size, size, generator=g),
    }  # fmt: skip


NETWORKS = ("unet", "vae", "text_encoder", "safety_checker")


def build_sd1(model_id: str, arch: Architecture, folder: Path, scale: Scale) -> Built:
    """The whole SD v1.x pipeline folder (UNet, VAE, CLIP ViT-L/14 text encoder, safety checker,
    tokenizer, scheduler, feature extractor); each network reloaded alone with plain diffusers /
    transformers and compared on small inputs."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextModel

    parts = sd1_components(folder, scale)
    x = sd1_probe_inputs(parts)
    ref = {name: sd1_output(name, parts[name], x) for name in NETWORKS}
    classes = {name: type(parts[name]).__name__ for name in NETWORKS}
    classes["scheduler"] = type(parts["scheduler"]).__name__
    params = {name: count(parts[name]) for name in NETWORKS}
    pipe = StableDiffusionPipeline(**parts)
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
    del pipe, parts
    gc.collect()
    loaders: dict[str, Callable[[], Any]] = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        "safety_checker": lambda: StableDiffusionSafetyChecker.from_pretrained(
            folder, subfolder="safety_checker"
        ),
    }
    diffs = {}
    for name, load in loaders.items():  # one network in memory at a time
        net = load().eval()
        diffs[name] = max_abs_diff(ref[name], sd1_output(name, net, x))
        del net
        gc.collect()
    worst = max(diffs.values())
    return Built(
        "render", model_id, folder,
        f"{arch.title}: UNet 320-640-1280-1280, VAE f8, CLIP ViT-L/14 text encoder, safety checker (ViT-L/14)"
        if scale == "paper" else f"{arch.title} (tiny widths)",
        classes, params,
        {"loads_with": "diffusers.UNet2DConditionModel / AutoencoderKL, transformers.CLIPTextModel, "
                       "StableDiffusionSafetyChecker (subfolders of the pipeline folder)",
         "max_abs_diff": diffs, "ok": worst == 0.0},
    )  # fmt: skip


def sd1_output(name: str, net: Any, x: dict[str, Any]) -> Any:
    """The output of one network of the pipeline on its probe input."""
    import torch

    with torch.no_grad():
        if name == "text_encoder":
            return net(x["ids"]).last_hidden_state
        if name == "unet":
            return net(x["latents"], 10, encoder_hidden_states=x["context"]).sample
        if name == "vae":
            return net.decode(x["latents"]).sample
        return net.vision_model(x["clip_pixels"]).pooler_output


BUILDERS: dict[tuple[str, str], Callable[[str, Architecture, Path, Scale], Built]] = {
    ("clip", "embed"): build_clip_text,
    ("clip", "vision"): build_clip_vision,
    ("bert", "text"): build_bert,
    ("sd1", "render"): build_sd1,
}


def folder_name(model_id: str, use: str, scale: Scale) -> str:
    return f"{model_id.replace('/', '--')}.{use}.{scale}"


def build_folder(model_id: str, use: str, root: Path, scale: Scale) -> Built:
    """The random-weight folder of ``model_id`` for ``use`` (embed | vision | text | render) under
    ``root``; reused when an earlier rehearsal built the same one (its ``rehearsal-build.json``)."""
    arch = architecture_of(model_id)
    if arch is None or (arch.family, use) not in BUILDERS:
        raise UserError(f"no known architecture for {model_id!r} as a {use} model; pass a local folder")
    folder = root / folder_name(model_id, use, scale)
    marker = folder / "rehearsal-build.json"
    key = hashlib.sha256(json.dumps([model_id, use, scale, BUILDER_VERSION]).encode()).hexdigest()[:16]
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            built = Built(**{k: v for k, v in saved["built"].items() if k != "path"}, path=folder)
            built.reused = True
            return built
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    built = BUILDERS[(arch.family, use)](model_id, arch, folder, scale)
    built.seconds = time.perf_counter() - t0
    state = {k: v for k, v in built.__dict__.items() if k not in ("path", "reused")}
    marker.write_text(json.dumps({"key": key, "built": state}, indent=1))
    return built


BUILDER_VERSION = 1
