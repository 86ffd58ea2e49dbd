"""Stage configs: pydantic models loaded from YAML, overridable by CLI flags.

Each stage function takes its own config model; the whole-chain config (:class:`PipelineConfig`)
holds one of each. Unknown keys, wrong types and impossible values are rejected with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_RENDER_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_LLM_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def resolved(self) -> dict[str, Any]:
        """The config as plain JSON-able data (what goes into config.yaml and the manifest)."""
        return self.model_dump(mode="json")


class IngestConfig(StageConfig):
    corpus: str | None = None
    format: Literal["auto", "coco", "karpathy", "flickr-token", "txt", "jsonl", "csv", "parquet"] = "auto"
    field: str = "caption"
    id_field: str | None = None
    image_field: str | None = None
    splits: list[str] = Field(default_factory=lambda: ["train", "restval"])
    limit: int | None = Field(default=None, ge=1)


class EmbedConfig(StageConfig):
    model: str = DEFAULT_EMBED_MODEL
    kind: Literal["auto", "sentence-transformers", "clip"] = "auto"
    batch_size: int = Field(default=256, ge=1)
    device: str = "auto"
    part_size: int = Field(default=20_000, ge=1)
    executor: Literal["inline", "process", "ray"] = "inline"
    workers: int = Field(default=1, ge=1)
    address: str | None = None


class GroupConfig(StageConfig):
    k: int = Field(default=30, ge=1)
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    block_size: int = Field(default=8192, ge=1)
    nlist: int | None = Field(default=None, ge=1)
    nprobe: int = Field(default=32, ge=1)
    hnsw_m: int = Field(default=32, ge=2)
    ef_construction: int = Field(default=80, ge=1)
    ef_search: int = Field(default=128, ge=1)
    threads: int | None = Field(default=None, ge=1)
    recall_sample: int = Field(default=0, ge=0)


class SummarizeConfig(StageConfig):
    backend: Literal["openai", "vllm", "transformers"] = "transformers"
    model: str = DEFAULT_LLM_MODEL
    gguf_file: str | None = None
    base_url: list[str] = Field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    prompt: str | None = None
    mode: Literal["select", "first-n"] = "select"
    n: int = Field(default=5, ge=1)
    min_select: int = Field(default=5, ge=1)
    max_select: int = Field(default=10, ge=1)
    max_words: int = Field(default=50, ge=1)
    max_new_tokens: int = Field(default=500, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    concurrency: int = Field(default=64, ge=1)
    timeout: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=6, ge=0)
    retry_backoff: float = Field(default=1.0, gt=0)
    client: Literal["openai", "aiohttp"] = "openai"
    batch_size: int = Field(default=8, ge=1)
    part_size: int = Field(default=1000, ge=1)
    limit: int | None = Field(default=None, ge=1)
    sample: int | None = Field(default=None, ge=1)
    seed: int = 0
    retry: bool = False
    device: str = "auto"
    executor: Literal["inline", "process", "ray"] = "inline"
    address: str | None = None

    @field_validator("base_url", mode="before")
    @classmethod
    def _split_urls(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v


class RenderConfig(StageConfig):
    model: str = DEFAULT_RENDER_MODEL
    prompts: Literal["summaries", "captions"] = "summaries"
    scheduler: str = "dpm++"
    steps: int = Field(default=20, ge=1)
    guidance: float = Field(default=7.5, ge=0.0)
    size: int = Field(default=512, ge=8)
    negative_prompt: str | None = None
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    batch_size: int = Field(default=16, ge=1)
    shard_size: int = Field(default=1000, ge=1)
    seed: int = 0
    limit: int | None = Field(default=None, ge=1)
    sample: int | None = Field(default=None, ge=1)
    image_format: Literal["jpg", "webp"] = "jpg"
    quality: int = Field(default=95, ge=1, le=100)
    safety_checker: bool = True
    devices: str = "auto"
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    fuse_qkv: bool = False
    executor: Literal["inline", "process", "ray"] = "inline"
    address: str | None = None
    tiny_random: bool = False


class ScoreConfig(StageConfig):
    model: str | None = None
    batch_size: int = Field(default=64, ge=1)
    device: str = "auto"


class PairsConfig(StageConfig):
    kinds: list[Literal["selected", "summary", "uni"]] = Field(default_factory=lambda: ["selected"])  # type: ignore[arg-type]
    include_nsfw: bool = False
    min_clip_score: float | None = None

    @field_validator("kinds", mode="before")
    @classmethod
    def _split_kinds(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v


class TrainConfig(StageConfig):
    preset: Literal["icsd", "prefix", "tiny"] = "icsd"
    # None = the preset's default (icsd: CLIP ViT-B/32 at 384 + bert-base-uncased, lr 1e-5;
    # prefix: CLIP ViT-B/32 at 224 + gpt2, lr 2e-5; tiny: random shapes at 64 px, lr 1e-3)
    vision_model: str | None = None
    text_model: str | None = None
    image_size: int | None = Field(default=None, ge=8)
    prompt: str = "a picture of "
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    lr: float | None = Field(default=None, gt=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    max_tokens: int = Field(default=40, ge=4)
    augment: bool | None = None
    crop_scale_min: float = Field(default=0.5, gt=0, le=1)
    precompute_features: bool = True
    shuffle_buffer: int = Field(default=1000, ge=1)
    data_streams: int | None = Field(default=None, ge=1)
    val_max_images: int = Field(default=500, ge=1)
    log_every: int = Field(default=10, ge=1)
    restart: bool = False
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_grad_norm: float = Field(default=1.0, ge=0)
    epochs: int = Field(default=30, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    eval_every: int = Field(default=1000, ge=1)
    save_every: int = Field(default=1000, ge=1)
    val_images: str | None = None
    val_captions: str | None = None
    val_fraction: float = Field(default=0.02, ge=0, lt=1)
    num_workers: int = Field(default=2, ge=0)
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    compile: bool = False
    beams: int = Field(default=3, ge=1)
    min_new_tokens: int = Field(default=5, ge=0)
    max_new_tokens: int = Field(default=30, ge=1)
    tensorboard: bool = False


class EvaluateConfig(StageConfig):
    benchmark: str | None = None
    annotations: str | None = None
    images: str | None = None
    split: str = "test"
    model: str | None = None
    predictions: str | None = None
    metrics: list[str] = Field(
        default_factory=lambda: ["BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
    )
    spice_jars: str | None = None
    batch_size: int = Field(default=32, ge=1)
    beams: int = Field(default=3, ge=1)
    min_new_tokens: int = Field(default=5, ge=0)
    max_new_tokens: int = Field(default=30, ge=1)
    device: str = "auto"
    subset: bool = False
    limit: int | None = Field(default=None, ge=1)

    @field_validator("metrics", mode="before")
    @classmethod
    def _split_metrics(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()]
        return v


class ReportConfig(StageConfig):
    sample_groups: int = Field(default=24, ge=0)


class PipelineConfig(StageConfig):
    name: str = "run"
    run_dir: str | None = None
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    group: GroupConfig = Field(default_factory=GroupConfig)
    summarize: SummarizeConfig = Field(default_factory=SummarizeConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "ingest": IngestConfig,
    "embed": EmbedConfig,
    "group": GroupConfig,
    "summarize": SummarizeConfig,
    "render": RenderConfig,
    "score": ScoreConfig,
    "pairs": PairsConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
}


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line naming every bad key and why."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid {source}: " + "; ".join(parts)


def build(model: type[StageConfig], data: dict[str, Any], source: str = "config") -> Any:
    """Validate ``data`` into ``model``; errors become one-line :class:`UserError`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        msg = str(exc).replace("\n", " ")
        raise UserError(f"config file is not valid YAML ({p}): {msg}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file must hold a mapping of stage names to settings: {p}")
    return data


def drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def stage_config(stage: str, file: str | Path | None, overrides: dict[str, Any]) -> Any:
    """A stage's config from an optional YAML file (either the stage's own mapping or a whole
    pipeline config, from which that stage's block is taken) with CLI overrides on top."""
    data: dict[str, Any] = {}
    if file is not None:
        loaded = read_yaml(file)
        data = dict(loaded.get(stage, {}) if stage in loaded or set(loaded) & set(STAGE_CONFIGS) else loaded)
    data.update(drop_none(overrides))
    return build(STAGE_CONFIGS[stage], data, source=f"{stage} config")


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


def read_with_base(file: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file; ``base: other.yaml`` (relative to the file) is read first and overlaid."""
    path = Path(file).resolve()
    if path in seen:
        raise UserError(f"config 'base' chain loops back to {path}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{path}: 'base' must be a file name")
    return deep_merge(read_with_base(path.parent / base, (*seen, path)), data)


def pipeline_config(file: str | Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The whole-chain config from YAML with dotted overrides (``{"render.model": "..."}``)."""
    data = read_with_base(file) if file is not None else {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, yaml.safe_load(value) if isinstance(value, str) else value)
    cfg = build(PipelineConfig, data, source=f"config {file}" if file else "config")
    assert isinstance(cfg, PipelineConfig)
    return cfg
