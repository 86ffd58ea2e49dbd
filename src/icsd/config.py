"""Stage configs: pydantic models loaded from YAML, overridable by CLI flags.

Each stage function takes its own config model; the whole-chain config (:class:`PipelineConfig`)
holds one of each. Unknown keys, wrong types and impossible values are rejected with one line.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .errors import UserError

DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RENDER_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_LLM_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class StageConfig(BaseModel):
    """A stage's settings. A stage that picks a backend by name names the backends' registry in
    ``backend_registry`` (``"module:attribute"``): its settings then also hold every registered
    backend's options (:mod:`icsd.options`), and :meth:`options` gives the chosen backend's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    backend_registry: ClassVar[str | None] = None
    backend_default_options: ClassVar[str | None] = None  # "module:attr" of the options of a backend without its own
    backend_section: ClassVar[bool] = False  # True on the model that carries the backends' options

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # ``SummarizeConfig(base_url=...)`` builds the model with the backends' options as fields.
        if cls.backend_registry is not None and not cls.backend_section:
            cls = cls.section()
        return super().__new__(cls)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        section = cls.section()
        return super().model_validate(obj, **kwargs) if section is cls else section.model_validate(obj, **kwargs)

    @classmethod
    def section(cls) -> type[StageConfig]:
        """This model with the options of the backends registered now (itself when it has none)."""
        from .options import section_model

        return section_model(cls)

    def chosen_backend(self) -> str:
        """The registered name of the backend these settings choose."""
        return str(getattr(self, "backend"))  # noqa: B009 - a field of the subclasses that pick a backend

    def options(self) -> Any:
        """The chosen backend's options model, validated from these settings."""
        from .options import backend_options

        return backend_options(self)

    def resolved(self) -> dict[str, Any]:
        """The config as plain JSON-able data (what goes into config.yaml and the manifest)."""
        return self.model_dump(mode="json")


class IngestConfig(StageConfig):
    corpus: str | None = Field(default=None, description="Caption corpus file.")
    format: Literal["auto", "coco", "karpathy", "flickr-token", "txt", "jsonl", "csv", "parquet"] = Field(
        default="auto",
        description="Corpus format: auto|coco|karpathy|flickr-token|txt|jsonl|csv|parquet.",
        json_schema_extra={"cli_flags": ["--format", "-f"]},
    )
    field: str = Field(default="caption", description="Caption column/key for jsonl, csv and parquet.")
    id_field: str | None = Field(default=None, description="Id column/key (default: row number).")
    image_field: str | None = Field(default=None, description="Image id column/key, when the corpus has one.")
    splits: list[str] = Field(
        default_factory=lambda: ["train", "restval"], description="Karpathy splits to keep, comma-separated."
    )
    limit: int | None = Field(default=None, ge=1, description="Keep only the first N captions.")


class EmbedConfig(StageConfig):
    model: str = Field(
        default=DEFAULT_EMBED_MODEL,
        description="sentence-transformers or CLIP model id or path (default: packaged all-MiniLM-L6-v2).",
    )
    kind: str = Field(
        default="auto", description="Encoder family: auto|sentence-transformers|clip (any registered embedder)."
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from .backends.registry import EMBEDDERS, known

        return known(EMBEDDERS, v, "auto")
    batch_size: int = Field(default=256, ge=1, description="Captions per forward pass.")
    device: str = Field(default="auto", description="auto|cpu|cuda|cuda:N.")
    part_size: int = Field(default=20_000, ge=1, description="Captions per output part (unit of resume).")
    executor: Literal["inline", "process", "ray"] = Field(default="inline", description="inline|process|ray.")
    workers: int = Field(default=1, ge=1, description="Worker processes or Ray actors.")
    address: str | None = Field(default=None, description="Ray address (auto or ray://host:port).")


class GroupConfig(StageConfig):
    k: int = Field(default=30, ge=1, description="Candidate-set size, the head included.")
    duplicates: Literal["drop", "merge"] = Field(
        default="drop",
        description="drop: a set whose members equal an earlier set's is dropped, each set starts with its "
        "own caption | merge: the official way, each set keyed on its first hit and sets sharing it joined "
        "into one (preprocess_for_chatgpt.py).",
    )
    index: Literal["flat", "ivf", "hnsw"] = Field(default="flat", description="flat (exact) | ivf | hnsw.")
    block_size: int = Field(default=8192, ge=1, description="Queries per search block.")
    nlist: int | None = Field(default=None, ge=1, description="IVF lists (default: about 4 x sqrt(N)).")
    nprobe: int = Field(default=32, ge=1, description="IVF lists probed per query.")
    hnsw_m: int = Field(default=32, ge=2, description="HNSW links per node.")
    ef_construction: int = Field(default=80, ge=1, description="HNSW build breadth.")
    ef_search: int = Field(default=128, ge=1, description="HNSW search breadth.")
    threads: int | None = Field(default=None, ge=1, description="faiss threads (default: all cores).")
    device: str = Field(
        default="cpu",
        pattern=r"^(cpu|auto|torch-cpu|cuda(:\d+)?)$",
        description="cpu: faiss on the CPU (index as chosen) | cuda[:N]: exact search in torch on the GPU "
        "(the path for large corpora) | torch-cpu: the same torch code on the CPU | auto: cuda if present, else cpu.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="Scores of the torch search: fp32 | bf16 (candidates re-ranked in fp32).",
    )
    recall_sample: int = Field(
        default=0,
        ge=0,
        description="Measure recall@K of ivf/hnsw against exact search on N queries (0 = off).",
    )


class SummarizeConfig(StageConfig):
    """The summarize stage's own settings; the chosen LLM backend's options (``model``,
    ``base_url``, ``temperature``, ...) are declared by the backends (``Options`` next to each
    one's code) and join this section as fields of their own (:mod:`icsd.options`)."""

    backend_registry: ClassVar[str | None] = "icsd.llm.registry:LLM_BACKENDS"

    backend: str = Field(default="transformers", description="LLM backend (a registered name; its options below).")
    prompt: str | None = Field(
        default=None,
        description="Prompt: a bundled name, official (the official code's prompt verbatim) | icsd | first-n, "
        "or a Jinja2 template file (default: icsd in select mode, first-n in first-n mode).",
    )
    mode: Literal["select", "first-n", "remap"] = Field(
        default="select",
        description="select (choose 5-10 and summarise) | first-n (condense the first N) | remap (no LLM: the "
        "head caption is rendered and paired with the first N candidates, as the official remapping.py).",
    )
    answers: Literal["strict", "official"] = Field(
        default="strict",
        description="How answers are read: strict (JSON, min_select..max_select distinct indices, at most "
        "max_words words) | official (JSON or a Python-literal dict, any number of indices, any length, "
        "as the official postprocess.py kept them). Every mode checks summaries for sense.",
    )
    n: int = Field(default=5, ge=1, description="Captions condensed in first-n mode, paired per group in remap mode.")
    min_select: int = Field(default=5, ge=1, description="Fewest captions a valid answer selects.")
    max_select: int = Field(default=10, ge=1, description="Most captions a valid answer selects.")
    max_words: int = Field(default=50, ge=1, description="Word limit of the summary.")
    part_size: int = Field(default=1000, ge=1, description="Groups per output part (unit of resume).")
    limit: int | None = Field(default=None, ge=1, description="Only the first N groups.")
    sample: int | None = Field(default=None, ge=1, description="A random sample of N groups (see --seed).")
    seed: int = Field(default=0, description="Seed of --sample; --retry re-asks with seed + the group's attempts.")
    retry: bool = Field(
        default=False,
        description="Also redo groups whose record is not ok, with a new sampling seed (this invocation only).",
        json_schema_extra={"transient": True},
    )
    device: str = Field(default="auto", description="auto|cpu|cuda|cuda:N (local backends, process workers).")
    executor: Literal["inline", "process", "ray"] = Field(
        default="inline", description="inline|process|ray (local backends)."
    )
    address: str | None = Field(default=None, description="Ray address (auto or ray://host:port).")

    @field_validator("backend")
    @classmethod
    def _known_llm_backend(cls, v: str) -> str:
        from .llm.registry import LLM_BACKENDS
        from .registry import closest

        if v not in LLM_BACKENDS:
            names = LLM_BACKENDS.names()
            raise ValueError(f"unknown LLM backend {v!r}{closest(v, names)}; known: {', '.join(names)}")
        return v

    if TYPE_CHECKING:  # the backends' options (``cfg.model``, ``cfg.base_url``): fields of the section

        def __getattr__(self, key: str) -> Any: ...


class RenderConfig(StageConfig):
    """The render stage's own settings; the chosen backend's options (``scheduler``, ``dtype``,
    ``safety_checker``, ...) are declared by the text-to-image backends and join this section
    (:mod:`icsd.options`)."""

    backend_registry: ClassVar[str | None] = "icsd.backends.registry:T2I_BACKENDS"
    backend_default_options: ClassVar[str | None] = "icsd.backends.t2i:T2IOptions"

    model: str = Field(
        default=DEFAULT_RENDER_MODEL, description="diffusers text-to-image pipeline: hub id or local folder."
    )
    backend: str = Field(
        default="diffusers",
        description="Text-to-image backend (a registered name; its options below; --tiny-random implies tiny-random).",
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from .backends.registry import T2I_BACKENDS, known

        return known(T2I_BACKENDS, v)
    prompts: Literal["summaries", "captions"] = Field(
        default="summaries",
        description="summaries (ok rows of selections.parquet) | captions (one image per caption).",
    )
    steps: int = Field(default=20, ge=1, description="Denoising steps.")
    guidance: float = Field(default=7.5, ge=0.0, description="Classifier-free guidance scale.")
    size: int = Field(default=512, ge=8, description="Image width and height in pixels, a multiple of 8.")
    negative_prompt: str | None = Field(default=None, description="Negative prompt for every image.")
    batch_size: int = Field(default=16, ge=1, description="Images per pipeline call.")
    shard_size: int = Field(
        default=1000, ge=1, description="Images per webdataset shard, the unit of resume."
    )
    seed: int = Field(
        default=0, description="Global seed; each image's seed derives from it and the item id."
    )
    limit: int | None = Field(default=None, ge=1, description="Only the first N items (sorted by id).")
    sample: int | None = Field(default=None, ge=1, description="A seeded random sample of N items.")
    image_format: Literal["jpg", "webp"] = Field(
        default="jpg",
        description="Image format in the shards: jpg | webp.",
        json_schema_extra={"cli_flags": ["--format"]},
    )
    quality: int = Field(default=95, ge=1, le=100, description="JPEG/WebP quality 1-100.")
    devices: str = Field(
        default="auto",
        description="auto | all | cpu | GPU ids 0,1,...: one worker per GPU.",
        json_schema_extra={"cli_flags": ["--devices", "--device"]},
    )
    workers: int | None = Field(
        default=None, ge=1, description="Render workers (processes or Ray actors); default: one per device."
    )
    executor: Literal["inline", "process", "ray"] = Field(
        default="inline", description="inline|process|ray (process is implied by several devices)."
    )
    address: str | None = Field(default=None, description="Ray address (auto or ray://host:port).")
    tiny_random: bool = Field(
        default=False, description="Build and use a tiny untrained pipeline in RUN/cache (offline demo)."
    )

    def chosen_backend(self) -> str:
        return "tiny-random" if self.tiny_random else self.backend

    if TYPE_CHECKING:  # the backends' options (``cfg.scheduler``, ``cfg.dtype``): fields of the section

        def __getattr__(self, key: str) -> Any: ...


class ScoreConfig(StageConfig):
    model: str | None = Field(default=None, description="CLIP model id or path.")
    batch_size: int = Field(default=64, ge=1, description="Images per forward pass.")
    device: str = Field(default="auto", description="auto|cpu|cuda.")


class PairsConfig(StageConfig):
    kinds: list[Literal["selected", "summary", "uni"]] = Field(
        default_factory=lambda: ["selected"],  # type: ignore[arg-type]
        description="Pair kinds, comma-separated: selected, summary, uni.",
    )
    include_nsfw: bool = Field(
        default=False,
        description="Keep images flagged NSFW.",
        json_schema_extra={"cli_flags": ["--include-nsfw/--exclude-nsfw"]},
    )
    min_clip_score: float | None = Field(
        default=None, description="Drop pairs whose CLIP score in RUN/scores.parquet is below this."
    )

    @field_validator("kinds", mode="before")
    @classmethod
    def _split_kinds(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v


class TrainConfig(StageConfig):
    """The train stage's own settings; the captioner family's options (``vision_model``,
    ``image_size``, ``beams``, ``decoder_style``, ...) are declared by the families
    (:mod:`icsd.backends.captioning.options`) and join this section as fields of their own
    (:mod:`icsd.options`); the stage hands them to the family as :meth:`options` gives them."""

    backend_registry: ClassVar[str | None] = "icsd.backends.registry:CAPTIONERS"
    backend_default_options: ClassVar[str | None] = "icsd.backends.captioning.options:CaptionerOptions"

    preset: str = Field(
        default="icsd",
        description="Captioner family: icsd (paper: CLIP + BERT decoder) | prefix | tiny (any registered one).",
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from .backends.registry import CAPTIONERS, known

        return known(CAPTIONERS, v)
    decode_lengths: Literal["new", "total"] = Field(
        default="new",
        description="Validation min/max_new_tokens count new tokens only, or (total) the prompt's "
        "tokens too, as the official min_length/max_length do.",
    )
    val_tokenizer: Literal["simple", "ptb"] = Field(
        default="simple",
        description="Tokenisation of validation scores: simple (lower-case, punctuation stripped) | "
        "ptb (pycocoevalcap's PTB tokenizer, as the official selection).",
    )
    lr_schedule: Literal["step", "epoch"] = Field(
        default="step",
        description="Cosine decay per step, or per epoch (the official cosine_lr_schedule: constant within an epoch).",
    )
    label_smoothing: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Label smoothing of the token loss."
    )
    lr: float | None = Field(
        default=None, gt=0, description="Peak learning rate (default per preset; icsd 1e-5)."
    )
    max_tokens: int = Field(
        default=40, ge=4, description="Longest training caption in tokens, the prompt included."
    )
    augment: bool | None = Field(
        default=None, description="RandomResizedCrop + flip (default: on, off for prefix)."
    )
    crop_scale_min: float = Field(
        default=0.5, gt=0, le=1, description="Smallest crop area of RandomResizedCrop."
    )
    precompute_features: bool = Field(
        default=True, description="Precompute frozen image features once when augmentation is off."
    )
    shuffle_buffer: int = Field(default=1000, ge=1, description="Pairs in each stream's shuffle buffer.")
    data_order: Literal["official", "streams"] = Field(
        default="streams",
        description="official: every pair once per epoch in one global shuffle (the paper's DistributedSampler; "
        "seeded by seed + epoch, the same on any GPU count, random reads from the shards) | streams: shards "
        "drawn with replacement through a shuffle buffer (sequential reads).",
    )
    group_captions: bool = Field(
        default=False,
        description="Image-grouped steps (needs data_order official): a step takes images with all their "
        "captions, the vision encoder runs once per image (one crop shared by its captions); batch_size "
        "still counts pairs on average. A deviation from the paper (docs/fidelity.md).",
    )
    data_streams: int | None = Field(
        default=None,
        ge=1,
        description="Global data streams (keep fixed across GPU counts for the same batches).",
    )
    val_max_images: int | None = Field(
        default=500, ge=1, description="Validation images used at most (null = the whole split)."
    )
    log_every: int = Field(default=10, ge=1, description="Append to metrics.jsonl every N steps.")
    restart: bool = Field(
        default=False,
        description="Discard RUN/train/last and start over (this invocation only).",
        json_schema_extra={"transient": True},
    )
    weight_decay: float = Field(default=0.05, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps before the cosine decay.")
    batch_size: int = Field(default=64, ge=1, description="Pairs per step per process.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm (0 = off).")
    epochs: int = Field(default=30, ge=1, description="Passes over the training pairs.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps (default: epochs over the pairs)."
    )
    eval_every: int = Field(default=1000, ge=1, description="Validate (and keep the best) every N steps.")
    save_every: int = Field(default=1000, ge=1, description="Write the resumable checkpoint every N steps.")
    val_images: str | None = Field(
        default=None, description="Validation image folder (never the test split)."
    )
    val_captions: str | None = Field(
        default=None, description="Its captions: COCO JSON, Karpathy JSON (split val) or JSON lines."
    )
    val_fraction: float = Field(
        default=0.02, ge=0, lt=1, description="Without val_images: share of synthetic images held out."
    )
    num_workers: int = Field(default=2, ge=0, description="Data-loading processes per rank.")
    seed: int = Field(default=0, description="Seed of model init, data order and augmentation.")
    device: str = Field(default="auto", description="auto|cpu|cuda.")
    bf16: bool = Field(default=True, description="bf16 autocast on GPU.")
    compile: bool = Field(default=False, description="torch.compile the model.")
    tensorboard: bool = Field(default=False, description="Also log to RUN/train/tensorboard.")

    def chosen_backend(self) -> str:
        return self.preset

    if TYPE_CHECKING:  # the captioner family's options (``cfg.vision_model``, ``cfg.beams``): fields of the section

        def __getattr__(self, key: str) -> Any: ...


class EvaluateConfig(StageConfig):
    benchmark: str | None = Field(
        default=None, description="Benchmark name (checks the file; names the output folder)."
    )
    annotations: str | None = Field(
        default=None,
        description="Reference captions: COCO captions JSON, Karpathy split JSON or NoCaps val JSON.",
        json_schema_extra={"cli_flags": ["--references", "--annotations"]},
    )
    images: str | None = Field(default=None, description="Folder of the benchmark's images (with --model).")
    split: str = Field(default="test", description="Karpathy split to score.")
    model: str | None = Field(
        default=None,
        description="Captioner checkpoint folder: caption the images here.",
        json_schema_extra={"transient": True},
    )
    predictions: str | None = Field(
        default=None,
        description="COCO results JSON: [{image_id, caption}, ...].",
        json_schema_extra={"transient": True},
    )
    metrics: list[str] = Field(
        default_factory=lambda: ["BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"],
        description="Comma-separated: BLEU,METEOR,ROUGE_L,CIDEr,SPICE.",
    )
    spice_jars: str | None = Field(
        default=None, description="Folder with the Stanford CoreNLP 3.6.0 jars (else $ICSD_SPICE_JARS)."
    )
    batch_size: int = Field(default=32, ge=1, description="Images per captioning batch.")
    beams: int = Field(default=3, ge=1, description="Beam width.")
    min_new_tokens: int = Field(default=5, ge=0, description="Shortest caption in tokens.")
    max_new_tokens: int = Field(default=30, ge=1, description="Longest caption in tokens.")
    decode_lengths: Literal["new", "total"] = Field(
        default="new",
        description="min/max_new_tokens count new tokens only, or (total) the prompt's tokens too, "
        "as the official min_length/max_length do.",
    )
    length_norm: Literal["new", "total"] | None = Field(
        default=None,
        description="Beam scores divided by the new tokens, or (total) by the whole sequence with the prompt, "
        "as transformers 4.15 (default: what the checkpoint records).",
    )
    decode_dtype: Literal["fp32", "bf16"] | None = Field(
        default=None, description="Decoding precision on GPU: fp32 | bf16 (default: what the checkpoint records)."
    )
    device: str = Field(default="auto", description="auto|cpu|cuda|cuda:N.")
    subset: bool = Field(default=False, description="Score only the predicted images.")
    limit: int | None = Field(
        default=None, ge=1, description="With --model: caption only the first N images."
    )

    @field_validator("metrics", mode="before")
    @classmethod
    def _split_metrics(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()]
        return v


class ReportConfig(StageConfig):
    sample_groups: int = Field(default=24, ge=0, description="Groups shown with their images.")


class RehearseConfig(StageConfig):
    """``icsd run CONFIG --rehearse``: the size of the rehearsal (``--rehearse.KEY VALUE``, or a
    ``rehearse:`` block of the config file). Read by the rehearsal only; a run ignores it."""

    captions: int | None = Field(
        default=None, ge=1, description="Corpus slice (default: 24, or 2 x group.k when that is more)."
    )
    prompts: int = Field(default=4, ge=1, description="LLM requests (candidate sets summarised).")
    images: int = Field(default=2, ge=1, description="Images rendered.")
    steps: int = Field(default=2, ge=1, description="Denoising steps per image.")
    train_steps: int = Field(default=2, ge=1, description="Optimizer steps.")
    batch: int = Field(default=4, ge=1, description="Training pairs per step.")
    eval_images: int = Field(default=2, ge=1, description="Images captioned by validation and by evaluate.")
    scale: Literal["paper", "tiny"] = Field(
        default="paper", description="paper | tiny (the same classes and code path at small widths: tests)."
    )
    corpus_size: int | None = Field(
        default=None, ge=1, description="Captions of the full corpus, when it is not readable here."
    )


#: sections of a config that are not stages: name -> model
RUN_SECTIONS: dict[str, type[StageConfig]] = {"rehearse": RehearseConfig}


class PipelineConfig(StageConfig):
    """The whole-chain settings: ``name``, ``run_dir``, one block per registered stage (its
    config model) and the :data:`RUN_SECTIONS` (``rehearse``). The model with the stage blocks is
    built from the stage registry (:func:`pipeline_model`); this base only types what every chain
    config has."""

    name: str = Field(default="run", description="Run name (the run directory defaults to runs/<name>).")
    run_dir: str | None = Field(default=None, description="Run directory.")
    notice: str | None = Field(
        default=None,
        description="What this chain is for (what it checks, what its scores mean): icsd run prints it "
        "when the chain starts and in its closing lines.",
    )

    if TYPE_CHECKING:  # a stage's block: ``cfg.render``, ``cfg.train``, ... (one per registered stage)

        def __getattr__(self, stage: str) -> Any: ...


class _StageConfigs(Mapping[str, type[StageConfig]]):
    """Stage name -> config model, in chain order, read from the registered stages' specs (so a
    stage registered by a plugin or at run time has its section like the built-in ones)."""

    def _table(self) -> dict[str, type[StageConfig]]:
        from .stages import loaded_specs

        return {spec.name: spec.config.section() for spec in loaded_specs()}

    def __getitem__(self, stage: str) -> type[StageConfig]:
        return self._table()[stage]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


STAGE_CONFIGS: Mapping[str, type[StageConfig]] = _StageConfigs()


def sections() -> dict[str, type[StageConfig]]:
    """Every section of a config: the stages' blocks, then :data:`RUN_SECTIONS`."""
    return {**STAGE_CONFIGS, **RUN_SECTIONS}


@lru_cache(maxsize=8)
def _pipeline_model(stages: tuple[tuple[str, type[StageConfig]], ...]) -> type[PipelineConfig]:
    blocks: dict[str, Any] = {
        name: (model, Field(default_factory=model)) for name, model in (*stages, *RUN_SECTIONS.items())
    }
    made: type[PipelineConfig] = create_model("PipelineConfig", __base__=PipelineConfig, **blocks)
    return made


def pipeline_model() -> type[PipelineConfig]:
    """The whole-chain config model of the stages registered now."""
    return _pipeline_model(tuple(STAGE_CONFIGS.items()))


DEFAULT_SOURCE = "default"
COMMAND_LINE = "the command line"
PKG_PREFIX = "pkg:"
SANDBOX_PREFIX = "sandbox:"  # a file of a sandbox world, written on first use (icsd.sandbox.make)
TOP_LEVEL = ("name", "run_dir", "notice")


def package_file(relative: str) -> Path:
    """A file shipped inside the icsd package (vendored sample data, bundled configs)."""
    from importlib import resources

    path = Path(str(resources.files("icsd").joinpath(relative)))
    if not path.exists():
        raise UserError(f"packaged file missing: {relative} (reinstall icsd)")
    return path


def quickstart_config_path() -> Path:
    return package_file("configs/quickstart.yaml")


def resolve_package_paths(data: Any) -> Any:
    """Replace every ``pkg:relative/path`` string in a config by the file's installed path, and
    every ``sandbox:WORLD/FILE`` by the file of that sandbox world."""
    if isinstance(data, dict):
        return {k: resolve_package_paths(v) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_package_paths(v) for v in data]
    if isinstance(data, str) and data.startswith(PKG_PREFIX):
        return str(package_file(data[len(PKG_PREFIX) :]))
    if isinstance(data, str) and data.startswith(SANDBOX_PREFIX):
        from .sandbox.make import resolve_path

        return resolve_path(data)
    return data


def field_extra(model: type[BaseModel], name: str) -> dict[str, Any]:
    extra = model.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def is_transient(stage: str, key: str) -> bool:
    """A setting that holds for one invocation only (``train.restart``, ``summarize.retry``, ...):
    it is never read back from ``RUN/config.yaml`` and does not count in a stage's fingerprint."""
    model = STAGE_CONFIGS.get(stage)
    return bool(model and key in model.model_fields and field_extra(model, key).get("transient"))


def lasting(stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the transient keys of ``stage``."""
    return {k: v for k, v in settings.items() if not is_transient(stage, k)}


# ----------------------------------------------------------------------------- reading layers


def yaml_problem(path: Path, exc: Exception) -> str:
    """``FILE line L, column C: problem (context at line L', column C')`` from a parser error, on one
    line; the parser's own text (marks drawn over several lines) for errors without a position."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"{path} line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context and exc.context_mark is not None:
            where = exc.context_mark
            text += f" ({exc.context} at line {where.line + 1}, column {where.column + 1})"
        return text
    return f"{path}: " + " ".join(str(exc).split())


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file is not valid YAML: {yaml_problem(p, exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file must hold a mapping of stage names to settings: {p}")
    return data


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(d, "render.model", "x")`` sets ``d["render"]["model"] = "x"``."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise UserError(f"cannot set {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"render": {"steps": 4}}`` -> ``{"render.steps": 4}`` (one level of sections)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if not prefix and k in sections() and isinstance(v, dict):
            out.update(leaves(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Layer:
    """One source of settings: a pipeline-shaped mapping and where it came from."""

    source: str
    data: dict[str, Any]


def file_layers(file: str | Path, stage: str | None = None, seen: tuple[Path, ...] = ()) -> list[Layer]:
    """A config file as layers, its ``base:`` chain first (``base`` is relative to the file).

    A file that holds one stage's block (no stage names at the top) is that stage's settings."""
    path = Path(file).expanduser().resolve()
    if path in seen:
        raise UserError(f"config 'base' chain loops back to {path}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if stage is not None and data and not (set(data) & (set(sections()) | set(TOP_LEVEL))):
        data = {stage: data}
    layers: list[Layer] = []
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}: 'base' must be a file name")
        layers = file_layers(path.parent / base, stage, (*seen, path))
    return [*layers, Layer(display_path(path), data)]


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_layer(run_dir: str | Path | None) -> Layer | None:
    """What a run was made with: ``RUN/config.yaml`` without its one-invocation settings."""
    if run_dir is None:
        return None
    path = Path(run_dir).expanduser() / "config.yaml"
    if not path.is_file():
        return None
    data = read_yaml(path)
    kept: dict[str, Any] = {}
    for stage, block in data.items():
        if stage in STAGE_CONFIGS and isinstance(block, dict):
            model = STAGE_CONFIGS[stage]
            kept[stage] = {k: v for k, v in lasting(stage, block).items() if k in model.model_fields}
    return Layer(display_path(path.resolve()), kept)


def override_layer(overrides: dict[str, Any] | None, source: str = COMMAND_LINE) -> Layer:
    """Dotted overrides (``{"render.model": "x"}``); string values are read as YAML scalars."""
    data: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, yaml.safe_load(value) if isinstance(value, str) else value)
    return Layer(source, data)


# ----------------------------------------------------------------------------- resolving


def check_keys(layer: Layer) -> None:
    """Every key of ``layer`` names a setting; else one line naming the source and the closest key."""
    from .registry import closest

    known_sections = sections()
    for key, value in layer.data.items():
        if key in TOP_LEVEL:
            continue
        if key not in known_sections:
            known = [*known_sections, *TOP_LEVEL]
            raise UserError(f"unknown section {key!r} (from {layer.source}){closest(key, known)}; "
                            f"sections: {', '.join(known)}")  # fmt: skip
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping of settings (from {layer.source})")
        fields = list(known_sections[key].model_fields)
        for name in value:
            if name not in fields:
                hint = closest(str(name), fields) or f"; keys of {key}: {', '.join(fields)}"
                raise UserError(f"unknown key {key}.{name} (from {layer.source}){hint}")


@dataclass
class Resolved:
    """The resolved settings and, per dotted key, the source its value came from."""

    config: PipelineConfig
    origins: dict[str, str] = field(default_factory=dict)

    def origin(self, dotted: str) -> str:
        return self.origins.get(dotted, DEFAULT_SOURCE)


def format_validation_error(exc: ValidationError, origins: dict[str, str] | None = None) -> str:
    """One line naming every bad key, why, and where its value came from."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        key = ".".join(loc) or "(root)"
        source = ""
        if origins is not None:
            for n in range(len(loc), 0, -1):
                if ".".join(loc[:n]) in origins:
                    source = f" (from {origins['.'.join(loc[:n])]})"
                    break
        parts.append(f"{key}: {err['msg']}{source}")
    return "invalid settings: " + "; ".join(parts)


def resolve_layers(layers: list[Layer]) -> Resolved:
    """Merge ``layers`` in order (later wins) over the defaults and validate the result."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer in layers:
        check_keys(layer)
        merged = deep_merge(merged, layer.data)
        origins.update({k: layer.source for k in leaves(layer.data)})
    try:
        cfg = pipeline_model().model_validate(resolve_package_paths(merged))
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, origins)) from None
    return Resolved(cfg, origins)


def resolve(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    *,
    stage: str | None = None,
    flags: dict[str, Any] | None = None,
) -> Resolved:
    """The one resolver every command uses: defaults <- ``RUN/config.yaml`` (what the run was made
    with) <- ``file`` with its ``base:`` chain <- dotted ``overrides`` (``--stage.key VALUE``) <-
    the stage command's own ``flags`` (for ``stage``; ``None`` values are not given)."""
    layers: list[Layer] = []
    from_run = run_layer(run_dir)
    if from_run is not None:
        layers.append(from_run)
    if file is not None:
        layers += file_layers(file, stage)
    layers.append(override_layer(overrides))
    if stage is not None and flags:
        layers.append(Layer(COMMAND_LINE, {stage: drop_none(flags)}))
    return resolve_layers(layers)


def stage_config(
    stage: str, file: str | Path | None, overrides: dict[str, Any], run_dir: str | Path | None = None
) -> Any:
    """One stage's resolved settings (see :func:`resolve`); ``overrides`` are that stage's flags."""
    return getattr(resolve(file, None, run_dir, stage=stage, flags=overrides).config, stage)


def to_yaml(resolved: Resolved, with_origin: bool = False) -> str:
    """The resolved settings as YAML; with ``with_origin`` each value is followed by its source."""
    data = resolved.config.model_dump(mode="json")
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)
    if not with_origin:
        return text
    out = []
    section = ""
    for line in text.splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            section = line[:-1]
            out.append(line)
            continue
        stripped = line.strip()
        indent = len(line) - len(stripped)
        key = stripped.split(":", 1)[0]
        if stripped.startswith("- ") or ":" not in stripped or (indent and indent != 2):
            out.append(line)
            continue
        dotted = f"{section}.{key}" if indent else key
        if indent == 0:
            section = ""
        out.append(f"{line}  # {resolved.origin(dotted)}")
    return "\n".join(out) + "\n"
