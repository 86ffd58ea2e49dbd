"""Text-to-image backends: any diffusers pipeline by hub id or local folder (``diffusers``), and
a tiny random-weight one built on the spot (``tiny-random``), both registered in
:data:`icsd.backends.registry.T2I_BACKENDS`.

One :class:`T2IPipeline` per device. Every image gets its own ``torch.Generator`` seeded from the
global seed and the item id (:func:`item_seed`), so an item's pixels do not depend on the batch
it lands in, the order or the number of workers. The pipeline's own safety checker decides the
NSFW flag of each image; pixels are never scanned. Nothing here knows about the run directory.

:func:`build_tiny_pipeline` writes a tiny random-weight Stable Diffusion pipeline (2-block UNet of
32 channels, tiny VAE, 2-layer CLIP text model, the real CLIP BPE vocabulary, a tiny safety checker)
with ``save_pretrained``, for offline runs and tests: its images carry no meaning.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from ..errors import UserError
from ..options import BackendOptions
from .registry import T2I_BACKENDS

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "fp16", "bf16", "fp32")

# name -> (diffusers scheduler class, extra config); "default" keeps the pipeline's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "default": ("", {}),
}

TINY_MODEL_NAME = "tiny-random"
TINY_CACHE_NAME = "tiny-random-sd"


class T2IOptions(BackendOptions):
    """What every text-to-image backend's ``load(spec, device)`` gets: ``model`` (what its
    ``prepare`` returned), its registered name and whether to run a safety checker. A backend that
    takes more declares a subclass as its ``Options`` (its fields become ``render.<key>`` settings
    and ``icsd render`` options); the render stage validates it and hands it over unchanged."""

    model: str = Field(default="", description="What the backend loads (what its prepare returned).")
    backend: str = Field(default="diffusers", description="The registered backend name.")
    safety_checker: bool = Field(
        default=True, description="Run the pipeline's safety checker (off: nsfw recorded as null)."
    )


class DiffusersOptions(T2IOptions):
    """``--backend diffusers`` (and ``tiny-random``): how the pipeline is loaded and sped up."""

    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        default="auto", description="auto (fp16 on cuda, fp32 on cpu) | fp16 | bf16 | fp32."
    )
    scheduler: str = Field(
        default="dpm++",
        description="dpm++ | dpm++-karras | dpm | unipc | ddim | pndm | euler | euler-a | heun | lms | default.",
    )
    compile: bool = Field(default=False, description="torch.compile the UNet and VAE decoder (GPU).")
    compile_mode: str = Field(
        default="default", description="torch.compile mode: default | reduce-overhead | max-autotune | ..."
    )
    channels_last: bool = Field(default=False, description="channels_last memory format (GPU).")
    fuse_qkv: bool = Field(default=False, description="Fuse attention QKV projections.")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        check_scheduler(v)
        return v


T2ISpec = DiffusersOptions  # the name backends were written against


@dataclass
class Rendered:
    """One batch of images: ``pixels`` is (B, H, W, 3) uint8; ``nsfw`` is None where no checker ran."""

    pixels: np.ndarray
    nsfw: list[bool | None]


# ----------------------------------------------------------------------------- pure helpers


def item_seed(global_seed: int, item_id: str) -> int:
    """The seed of one image: a function of the global seed and the item id only."""
    digest = hashlib.sha256(f"{global_seed}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")


def check_dtype(name: str) -> None:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is fp16 on CUDA and fp32 elsewhere."""
    import torch

    check_dtype(name)
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~", "\\"))
        or model.count("/") > 1
        or (len(model) > 1 and model[1] == ":")
        or model.endswith((".safetensors", ".ckpt"))
    )


def check_model_available(model: str) -> None:
    """Fail with one line unless ``model`` is a diffusers pipeline folder or a hub id whose
    ``model_index.json`` is cached or downloadable now."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"not a diffusers pipeline folder (no model_index.json): {path}")
        return
    if _looks_like_path(model):
        raise UserError(f"text-to-image model path not found: {model}")
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(model, "model_index.json")
    except Exception as exc:  # any hub, network or validation failure means the same to the user
        raise UserError(
            f"text-to-image model {model!r} is not a local folder and cannot be fetched from the "
            f"Hugging Face Hub: {_hub_reason(exc)}; pass a local pipeline folder or a cached hub id"
        ) from None


def _hub_reason(exc: Exception) -> str:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return "gated repository (log in with `hf auth login` and accept its licence)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "no such repository"
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return "not in the local cache and the Hub cannot be reached (offline)"
    if isinstance(exc, errors.EntryNotFoundError):
        return "the repository has no model_index.json (not a diffusers pipeline)"
    if isinstance(exc, errors.HFValidationError):
        return "not a valid hub id"
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _model_index(model: str) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model)
    return dict(index) if isinstance(index, dict) else {}


def to_uint8(images: Any) -> np.ndarray:
    """Pipeline output in [0, 1] (tensor NCHW, array NHWC or PIL list) -> (B, H, W, 3) uint8,
    rounded the way diffusers' ``numpy_to_pil`` rounds."""
    import torch

    if isinstance(images, torch.Tensor):
        arr = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return arr.cpu().numpy()
    if isinstance(images, np.ndarray):
        return np.clip(np.round(images.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


# ----------------------------------------------------------------------------- the pipeline


class T2IPipeline:
    """A loaded diffusers text-to-image pipeline on one device."""

    def __init__(self, pipe: Any, spec: T2ISpec, device: str, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.spec = spec
        self.device = device
        self.dtype = dtype

    @property
    def has_safety_checker(self) -> bool:
        return getattr(self.pipe, "safety_checker", None) is not None

    @property
    def scheduler_name(self) -> str:
        return type(self.pipe.scheduler).__name__

    @property
    def pipeline_class(self) -> str:
        return type(self.pipe).__name__

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int,
        guidance: float,
        width: int,
        height: int,
        negative_prompt: str | None = None,
    ) -> Rendered:
        """Render one image per prompt, image ``i`` from ``torch.Generator().manual_seed(seeds[i])``."""
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        # CPU generators make the initial noise the same on every device.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "width": width,
            "height": height,
            "generator": generators,
            "output_type": "pt",
        }
        if negative_prompt:
            kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
        with torch.inference_mode():
            out = self.pipe(**kwargs)
            pixels = to_uint8(out.images)
        flags = getattr(out, "nsfw_content_detected", None)
        nsfw: list[bool | None] = [bool(f) for f in flags] if flags is not None else [None] * len(prompts)
        return Rendered(pixels=pixels, nsfw=nsfw)


def _dtype_kwarg() -> str:
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def _set_scheduler(pipe: Any, name: str) -> None:
    check_scheduler(name)
    cls_name, extra = SCHEDULERS[name]
    if not cls_name:
        return
    import diffusers

    cls = getattr(diffusers, cls_name)
    current = type(pipe.scheduler)
    compatible = {c.__name__ for c in getattr(pipe.scheduler, "compatibles", [])} | {current.__name__}
    if cls_name not in compatible:
        raise UserError(
            f"scheduler {name!r} ({cls_name}) does not fit this pipeline, whose scheduler is "
            f"{current.__name__}; pass --scheduler default"
        )
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def _apply_levers(pipe: Any, spec: T2ISpec) -> None:
    """GPU speed levers, each behind its own flag (see benchmarks/render_gpu.py)."""
    import torch

    if spec.fuse_qkv and hasattr(pipe, "fuse_qkv_projections"):
        pipe.fuse_qkv_projections()
    for name in ("unet", "transformer", "vae"):
        module = getattr(pipe, name, None)
        if module is not None and spec.channels_last:
            module.to(memory_format=torch.channels_last)
    if spec.compile:
        mode = None if spec.compile_mode == "default" else spec.compile_mode
        for name in ("unet", "transformer"):
            module = getattr(pipe, name, None)
            if module is not None:
                setattr(pipe, name, torch.compile(module, mode=mode))
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            vae.decoder = torch.compile(vae.decoder, mode=mode)


def load_pipeline(spec: T2ISpec, device: str) -> T2IPipeline:
    """Load ``spec.model`` (hub id or folder) onto ``device``; any failure is one line."""
    check_scheduler(spec.scheduler)
    dtype = resolve_dtype(spec.dtype, device)
    check_model_available(spec.model)
    from diffusers import AutoPipelineForText2Image

    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype}
    try:
        index = _model_index(spec.model)
        if not spec.safety_checker and "safety_checker" in index:
            kwargs["safety_checker"] = None
            if "requires_safety_checker" in index:
                kwargs["requires_safety_checker"] = False
        pipe = AutoPipelineForText2Image.from_pretrained(spec.model, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load text-to-image pipeline {spec.model!r}: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    _set_scheduler(pipe, spec.scheduler)
    pipe.to(device)
    _apply_levers(pipe, spec)
    return T2IPipeline(pipe, spec, device, dtype)


# ----------------------------------------------------------------------------- registered backends


class DiffusersBackend:
    """Any diffusers text-to-image pipeline (hub id or folder) through ``AutoPipelineForText2Image``.

    A backend is three static methods: :meth:`prepare` (what to load, checked or built now, in the
    main process), :meth:`model_label` (the model name the samples record; it must change whenever
    the pixels would) and :meth:`load` (a generator on one device, in each worker). The generator
    answers ``generate(prompts, seeds, steps=, guidance=, width=, height=, negative_prompt=)`` with a
    :class:`Rendered` (image ``i`` from ``seeds[i]`` alone) and tells ``has_safety_checker``,
    ``pipeline_class``, ``scheduler_name`` and ``device``, as :class:`T2IPipeline` does.
    """

    untrained = False
    Options = DiffusersOptions

    @staticmethod
    def prepare(model: str, cache: Path) -> str:
        check_model_available(model)
        return model

    @staticmethod
    def model_label(model: str) -> str:
        return model

    @staticmethod
    def load(spec: T2ISpec, device: str) -> T2IPipeline:
        return load_pipeline(spec, device)


class TinyRandomBackend(DiffusersBackend):
    """A tiny untrained Stable Diffusion pipeline built once into ``cache`` (offline demos, tests);
    ``model`` is ignored and its images carry no meaning."""

    untrained = True

    @staticmethod
    def prepare(model: str, cache: Path) -> str:
        return str(ensure_tiny_pipeline(cache / TINY_CACHE_NAME))

    @staticmethod
    def model_label(model: str) -> str:
        return TINY_MODEL_NAME


def load_generator(spec: T2IOptions, device: str) -> Any:
    """The generator of ``spec.backend`` for ``spec.model`` on ``device``."""
    return T2I_BACKENDS.get(spec.backend).load(spec, device)


_loaded: dict[tuple[T2IOptions, str], T2IPipeline] = {}
_keep_loaded = False


def keep_pipelines_loaded(enabled: bool = True) -> None:
    """Keep the last loaded pipeline (compiled, on its device) for the next render in this process.
    Off by default, so a finished render frees its device memory for the stages after it."""
    global _keep_loaded
    _keep_loaded = enabled
    if not enabled:
        _loaded.clear()


def cached_pipeline(spec: T2IOptions, device: str) -> T2IPipeline:
    """:func:`load_generator`, reusing the last one when :func:`keep_pipelines_loaded` is on."""
    if not _keep_loaded:
        return load_generator(spec, device)  # type: ignore[no-any-return]
    key = (spec, device)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_generator(spec, device)
    return _loaded[key]


# ----------------------------------------------------------------------------- tiny random pipeline


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte mapped to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_bpe_path() -> Path:
    """The real CLIP BPE merges file shipped in the open-clip-torch wheel (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise UserError(
            "the tiny pipeline needs the CLIP BPE vocabulary from open-clip-torch: pip install open-clip-torch"
        )
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"CLIP BPE vocabulary not found in open-clip-torch: {path}")
    return path


def write_clip_tokenizer_files(dest: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the 49,408-token CLIP vocabulary into ``dest``,
    built from the BPE merges exactly as CLIP's own tokenizer builds them."""
    lines = gzip.decompress(clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return dest


def tiny_pipeline_components(
    tokenizer_dir: Path, *, safety_checker: bool = True, seed: int = 0
) -> dict[str, Any]:
    """The components of a tiny Stable Diffusion pipeline, random weights from a fixed seed.

    The VAE downsamples 8x like SD's, so ``--size`` means the same as with a real model.
    """
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
    components: dict[str, Any] = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": safety_checker,
    }
    if safety_checker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
        clip_config = CLIPConfig(
            text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77},
            vision_config={**small, "image_size": 32, "patch_size": 4},
            projection_dim=32,
        )
        components["safety_checker"] = StableDiffusionSafetyChecker(clip_config).eval()
        components["feature_extractor"] = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    return components


def build_tiny_pipeline(
    dest_dir: str | os.PathLike[str], *, safety_checker: bool = True, seed: int = 0
) -> Path:
    """Build a tiny random-weight ``StableDiffusionPipeline`` and ``save_pretrained`` it (safetensors)
    at ``dest_dir``, replacing what was there. Returns the folder, loadable by any diffusers user."""
    from diffusers import StableDiffusionPipeline

    dest = Path(dest_dir).expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        tokenizer_dir = write_clip_tokenizer_files(tmp / "_clip_bpe")
        pipe = StableDiffusionPipeline(
            **tiny_pipeline_components(tokenizer_dir, safety_checker=safety_checker, seed=seed)
        )
        shutil.rmtree(tokenizer_dir)
        pipe.save_pretrained(tmp, safe_serialization=True)  # type: ignore[attr-defined]
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_tiny_pipeline(dest_dir: str | os.PathLike[str]) -> Path:
    """The tiny pipeline at ``dest_dir``, built only when it is not there yet."""
    dest = Path(dest_dir).expanduser().resolve()
    if (dest / "model_index.json").is_file():
        return dest
    return build_tiny_pipeline(dest)
