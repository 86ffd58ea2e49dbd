"""The `icsd` command line: one subcommand per stage, plus `run`, `report` and `compare`.

Only wiring lives here: options become a stage config, the stage function runs, the closing line
is printed. User mistakes raise :class:`icsd.errors.UserError` and end as one line with exit 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import UserError, write_failure_reason

app = typer.Typer(
    name="icsd",
    help="Train image captioners on multi-context synthetic data only (ICSD, AAAI 2024).\n\n"
    "Run `icsd run` for the offline quickstart, or one stage at a time:\n\n"
    "  icsd ingest captions.json --run runs/demo\n\n"
    "  icsd embed --run runs/demo && icsd group --run runs/demo --k 30",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RunOpt = Annotated[Path, typer.Option("--run", "-r", help="Run directory (created if missing).")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML file: a stage block or a whole pipeline config.")
]


def _done(result: Any) -> None:
    for note in getattr(result, "notes", []):
        typer.echo(note, err=True)
    typer.echo(result.summary())


def _stage(stage: str, run: Path, config: Path | None, overrides: dict[str, Any]) -> Any:
    """Build a stage's config and run its stage function on the run directory."""
    from importlib import import_module

    from .config import stage_config
    from .store import RunDir

    cfg = stage_config(stage, config, overrides)
    module = import_module(f"icsd.stages.{stage}")
    return module.run(cfg, RunDir.at(run))


# ----------------------------------------------------------------------------- text stages


@app.command(
    epilog="Examples:\n\n"
    "  icsd ingest ../data/captions_train2017.json --run runs/coco\n\n"
    "  icsd ingest dataset_coco.json --run runs/coco --format karpathy\n\n"
    "  icsd ingest corpus.txt --run runs/ss1m\n\n"
    "  icsd ingest captions.jsonl --run runs/x --field text"
)
def ingest(
    corpus: Annotated[Path, typer.Argument(help="Caption corpus file.")],
    run: RunOpt,
    format: Annotated[
        str, typer.Option("--format", "-f", help="auto|coco|karpathy|flickr-token|txt|jsonl|csv|parquet")
    ] = "auto",
    field: Annotated[str | None, typer.Option(help="Caption column/key for jsonl, csv and parquet.")] = None,
    id_field: Annotated[str | None, typer.Option(help="Id column/key (default: row number).")] = None,
    splits: Annotated[
        str | None, typer.Option(help="Karpathy splits to keep, comma-separated (default train,restval).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Keep only the first N captions.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Read a caption corpus into RUN/captions.parquet (format auto-detected)."""
    _done(
        _stage(
            "ingest",
            run,
            config,
            {
                "corpus": str(corpus),
                "format": format,
                "field": field,
                "id_field": id_field,
                "splits": splits.split(",") if splits else None,
                "limit": limit,
            },
        )
    )


@app.command(
    epilog="Examples:\n\n"
    "  icsd embed --run runs/coco\n\n"
    "  icsd embed --run runs/coco --model openai/clip-vit-base-patch16 --device cuda --batch-size 1024"
)
def embed(
    run: RunOpt,
    model: Annotated[
        str | None,
        typer.Option(help="sentence-transformers or CLIP model id or path (default: packaged all-MiniLM-L6-v2)."),
    ] = None,
    kind: Annotated[str | None, typer.Option(help="auto|sentence-transformers|clip")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Captions per forward pass.")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    part_size: Annotated[int | None, typer.Option(help="Captions per output part (unit of resume).")] = None,
    executor: Annotated[str | None, typer.Option(help="inline|process|ray")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes or Ray actors.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (auto or ray://host:port).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Embed every caption (L2-normalised float32) into RUN/embeddings/ parts."""
    _done(
        _stage(
            "embed",
            run,
            config,
            {
                "model": model,
                "kind": kind,
                "batch_size": batch_size,
                "device": device,
                "part_size": part_size,
                "executor": executor,
                "workers": workers,
                "address": address,
            },
        )
    )


@app.command(
    epilog="Examples:\n\n"
    "  icsd group --run runs/coco --k 30\n\n"
    "  icsd group --run runs/big --index hnsw --recall-sample 2000"
)
def group(
    run: RunOpt,
    k: Annotated[int | None, typer.Option("--k", help="Candidate-set size, the head included.")] = None,
    index: Annotated[str | None, typer.Option(help="flat (exact) | ivf | hnsw")] = None,
    block_size: Annotated[int | None, typer.Option(help="Queries per search block.")] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF lists probed per query.")] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW search breadth.")] = None,
    recall_sample: Annotated[
        int | None, typer.Option(help="Measure recall@K of ivf/hnsw against exact search on N queries.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Form candidate sets: each caption's top-K neighbours by cosine, duplicates dropped."""
    _done(
        _stage(
            "group",
            run,
            config,
            {
                "k": k,
                "index": index,
                "block_size": block_size,
                "nprobe": nprobe,
                "ef_search": ef_search,
                "recall_sample": recall_sample,
            },
        )
    )


# ----------------------------------------------------------------------------- later stages
# (each command below wires one stage module; keep the same shape as above)


@app.command(
    epilog="Examples:\n\n"
    "  icsd summarize --run runs/coco --limit 20            (packaged SmolLM2, CPU: a quick look)\n\n"
    "  vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000 &\n\n"
    "  icsd summarize --run runs/coco --backend openai --base-url http://127.0.0.1:8000/v1 "
    "--model Qwen/Qwen2.5-7B-Instruct --concurrency 256\n\n"
    "  OPENAI_API_KEY=... icsd summarize --run runs/coco --backend openai --model gpt-3.5-turbo\n\n"
    "  icsd summarize --run runs/coco --backend vllm --model Qwen/Qwen2.5-7B-Instruct\n\n"
    "  icsd summarize --run runs/coco --sample 100 --seed 1 --prompt my_prompt.txt\n\n"
    "  icsd summarize --run runs/coco --mode first-n --n 5      (no selection, only condense)\n\n"
    "  icsd summarize --run runs/coco --retry                   (redo groups that are not ok)"
)
def summarize(
    run: RunOpt,
    backend: Annotated[str | None, typer.Option(help="openai | vllm | transformers (default).")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model id, path or .gguf file; for openai the server's model name "
                     "(default: SmolLM2-135M-Instruct, packaged GGUF for transformers)."),
    ] = None,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file name inside --model's folder or repo.")] = None,
    base_url: Annotated[
        list[str] | None,
        typer.Option(help="OpenAI-compatible server URL; repeat or comma-separate for round-robin."),
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the API key (default OPENAI_API_KEY).")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(help="select (choose 5-10 and summarise) | first-n (condense the first N).")
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="Captions condensed in first-n mode.")] = None,
    prompt: Annotated[Path | None, typer.Option(help="Jinja2 prompt template file (default: bundled).")] = None,
    min_select: Annotated[int | None, typer.Option(help="Fewest captions a valid answer selects.")] = None,
    max_select: Annotated[int | None, typer.Option(help="Most captions a valid answer selects.")] = None,
    max_words: Annotated[int | None, typer.Option(help="Word limit of the summary.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight (openai).")] = None,
    client: Annotated[
        str | None, typer.Option(help="HTTP client of the openai backend: openai (official SDK) | aiohttp (lean).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds per request before it is retried.")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries per request on 429/5xx/timeouts.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest answer in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0 = greedy).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generate() call (transformers).")] = None,
    part_size: Annotated[int | None, typer.Option(help="Groups per output part (unit of resume).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N groups.")] = None,
    sample: Annotated[int | None, typer.Option(help="A random sample of N groups (see --seed).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of --sample.")] = None,
    retry: Annotated[
        bool | None, typer.Option("--retry/--no-retry", help="Also redo groups whose record is not ok.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N (transformers, process workers).")] = None,
    executor: Annotated[str | None, typer.Option(help="inline|process|ray (local backends).")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (auto or ray://host:port).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Ask an LLM to select captions of one scene and summarise them into RUN/selections.parquet."""
    urls = [u for item in base_url or [] for u in item.split(",") if u.strip()]
    _done(
        _stage(
            "summarize",
            run,
            config,
            {
                "backend": backend,
                "model": model,
                "gguf_file": gguf_file,
                "base_url": urls or None,
                "api_key_env": api_key_env,
                "mode": mode,
                "n": n,
                "prompt": str(prompt) if prompt else None,
                "min_select": min_select,
                "max_select": max_select,
                "max_words": max_words,
                "concurrency": concurrency,
                "client": client,
                "timeout": timeout,
                "max_retries": max_retries,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "batch_size": batch_size,
                "part_size": part_size,
                "limit": limit,
                "sample": sample,
                "seed": seed,
                "retry": retry,
                "device": device,
                "executor": executor,
                "address": address,
            },
        )
    )


@app.command(
    epilog="Examples:\n\n"
    "  icsd render --run runs/coco\n\n"
    "  icsd render --run runs/coco --model ./sd-folder --devices 0,1 --batch-size 32\n\n"
    "  icsd render --run runs/coco --compile --channels-last\n\n"
    "  icsd render --run runs/uni --prompts captions --sample 10000\n\n"
    "  icsd render --run runs/demo --tiny-random --size 64 --steps 4\n\n"
    "  icsd render --run runs/coco --no-safety-checker --format webp"
)
def render(
    run: RunOpt,
    model: Annotated[
        str | None,
        typer.Option(
            help="diffusers text-to-image pipeline: hub id or local folder (default CompVis/stable-diffusion-v1-4)."
        ),
    ] = None,
    prompts: Annotated[
        str | None,
        typer.Option(help="summaries (ok rows of selections.parquet) | captions (one image per caption)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default 20).")] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (default 7.5).")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Image width and height in pixels, a multiple of 8 (default 512).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per pipeline call (default 16).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Global seed; each image's seed derives from it and the item id.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items (sorted by id).")] = None,
    sample: Annotated[int | None, typer.Option(help="A seeded random sample of N items.")] = None,
    devices: Annotated[
        str | None,
        typer.Option("--devices", "--device", help="auto | all | cpu | GPU ids 0,1,...: one worker per GPU."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (fp16 on cuda, fp32 on cpu) | fp16 | bf16 | fp32.")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="dpm++ (default) | dpm++-karras | dpm | unipc | ddim | pndm | euler | euler-a | heun | lms | default."
        ),
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt for every image.")] = None,
    shard_size: Annotated[
        int | None, typer.Option(help="Images per webdataset shard, the unit of resume (default 1000).")
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="Image format in the shards: jpg (default) | webp.")
    ] = None,
    quality: Annotated[int | None, typer.Option(help="JPEG/WebP quality 1-100 (default 95).")] = None,
    no_safety_checker: Annotated[
        bool,
        typer.Option(
            "--no-safety-checker", help="Turn the pipeline's safety checker off (nsfw recorded as null)."
        ),
    ] = False,
    compile: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="torch.compile the UNet and VAE decoder (GPU)."),
    ] = None,
    compile_mode: Annotated[
        str | None, typer.Option(help="torch.compile mode: default | reduce-overhead | max-autotune | ...")
    ] = None,
    channels_last: Annotated[
        bool | None,
        typer.Option("--channels-last/--no-channels-last", help="channels_last memory format (GPU)."),
    ] = None,
    fuse_qkv: Annotated[
        bool | None, typer.Option("--fuse-qkv/--no-fuse-qkv", help="Fuse attention QKV projections.")
    ] = None,
    tiny_random: Annotated[
        bool,
        typer.Option(
            "--tiny-random", help="Build and use a tiny untrained pipeline in RUN/cache (offline demo)."
        ),
    ] = False,
    executor: Annotated[
        str | None, typer.Option(help="inline|process|ray (process is implied by several devices).")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (auto or ray://host:port).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Render one image per ok summary (or per caption) into RUN/images/ webdataset shards."""
    _done(
        _stage(
            "render",
            run,
            config,
            {
                "model": model,
                "prompts": prompts,
                "steps": steps,
                "guidance": guidance,
                "size": size,
                "batch_size": batch_size,
                "seed": seed,
                "limit": limit,
                "sample": sample,
                "devices": devices,
                "dtype": dtype,
                "scheduler": scheduler,
                "negative_prompt": negative_prompt,
                "shard_size": shard_size,
                "image_format": format,
                "quality": quality,
                "safety_checker": False if no_safety_checker else None,
                "compile": compile,
                "compile_mode": compile_mode,
                "channels_last": channels_last,
                "fuse_qkv": fuse_qkv,
                "tiny_random": True if tiny_random else None,
                "executor": executor,
                "address": address,
            },
        )
    )
@app.command(
    epilog="Examples:\n\n"
    "  icsd pairs --run runs/coco\n\n"
    "  icsd pairs --run runs/coco --kinds selected,summary\n\n"
    "  icsd pairs --run runs/uni --kinds uni\n\n"
    "  icsd pairs --run runs/coco --min-clip-score 0.25 --include-nsfw"
)
def pairs(
    run: RunOpt,
    kinds: Annotated[
        str | None,
        typer.Option(help="Pair kinds, comma-separated: selected (default), summary, uni."),
    ] = None,
    include_nsfw: Annotated[
        bool | None, typer.Option("--include-nsfw/--exclude-nsfw", help="Keep images flagged NSFW.")
    ] = None,
    min_clip_score: Annotated[
        float | None, typer.Option(help="Drop pairs whose CLIP score in RUN/scores.parquet is below this.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Pair each rendered image with its selected captions (and/or summary) into RUN/pairs.parquet."""
    _done(
        _stage(
            "pairs",
            run,
            config,
            {"kinds": kinds, "include_nsfw": include_nsfw, "min_clip_score": min_clip_score},
        )
    )


@app.command(
    epilog="Examples:\n\n"
    "  icsd train --run runs/coco --val-images coco/val2014 --val-captions dataset_coco.json\n\n"
    "  icsd train --run runs/demo --preset tiny --max-steps 200 --device cpu\n\n"
    "  icsd train --run runs/coco --preset prefix --text-model gpt2 --batch-size 128\n\n"
    "One process per GPU (the same command resumes after a stop; --restart starts over). Under\n"
    "torchrun/accelerate write -r RUN and -c FILE: their parsers take --run/--config as their own.\n\n"
    "  torchrun --nproc_per_node 8 -m icsd.cli train -r runs/coco\n\n"
    "  accelerate launch --multi_gpu --num_processes 8 -m icsd.cli train -r runs/coco\n\n"
    "  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 "
    "-m icsd.cli train -r /shared/runs/coco"
)
def train(
    run: RunOpt,
    preset: Annotated[str | None, typer.Option(help="icsd (paper: CLIP + BERT decoder) | prefix | tiny")] = None,
    vision_model: Annotated[str | None, typer.Option(help="CLIP id or path (default per preset).")] = None,
    text_model: Annotated[
        str | None, typer.Option(help="BERT (icsd) or causal LM (prefix) id or path (default per preset).")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="Input size (icsd: 384, position embeddings interpolated).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: --epochs over the pairs).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training pairs (default 30).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per step per process (default 64).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default per preset; icsd 1e-5).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps before the cosine decay.")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda")] = None,
    num_workers: Annotated[int | None, typer.Option(help="Data-loading processes per rank.")] = None,
    data_streams: Annotated[
        int | None, typer.Option(help="Global data streams (keep fixed across GPU counts for the same batches).")
    ] = None,
    val_images: Annotated[str | None, typer.Option(help="Validation image folder (never the test split).")] = None,
    val_captions: Annotated[
        str | None, typer.Option(help="Its captions: COCO JSON, Karpathy JSON (split val) or JSON lines.")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Without --val-images: share of synthetic images held out.")
    ] = None,
    val_max_images: Annotated[int | None, typer.Option(help="Validation images used at most.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Validate (and keep the best) every N steps.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Write the resumable checkpoint every N steps.")] = None,
    log_every: Annotated[int | None, typer.Option(help="Append to metrics.jsonl every N steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of model init, data order and augmentation.")] = None,
    augment: Annotated[
        bool | None, typer.Option("--augment/--no-augment", help="RandomResizedCrop + flip (default: on, off for prefix).")
    ] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast on GPU.")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard", help="Also log to RUN/train/tensorboard.")] = None,
    restart: Annotated[bool | None, typer.Option("--restart", help="Discard RUN/train/last and start over.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train a captioner on RUN/pairs.parquet; checkpoints in RUN/train/ (resumes from RUN/train/last)."""
    _done(
        _stage(
            "train",
            run,
            config,
            {
                "preset": preset,
                "vision_model": vision_model,
                "text_model": text_model,
                "image_size": image_size,
                "max_steps": max_steps,
                "epochs": epochs,
                "batch_size": batch_size,
                "grad_accum": grad_accum,
                "lr": lr,
                "warmup_steps": warmup_steps,
                "device": device,
                "num_workers": num_workers,
                "data_streams": data_streams,
                "val_images": val_images,
                "val_captions": val_captions,
                "val_fraction": val_fraction,
                "val_max_images": val_max_images,
                "eval_every": eval_every,
                "save_every": save_every,
                "log_every": log_every,
                "seed": seed,
                "augment": augment,
                "bf16": bf16,
                "compile": compile,
                "tensorboard": tensorboard,
                "restart": restart,
            },
        )
    )


@app.command(
    epilog="Examples:\n\n"
    "  icsd caption --model runs/coco/train/best photo.jpg\n\n"
    "  icsd caption --model runs/coco/train/best 'photos/*.jpg' --out captions.jsonl\n\n"
    "  icsd caption --model runs/coco/train/best coco/val2014 --format coco --out predictions.json"
)
def caption(
    images: Annotated[list[str], typer.Argument(help="Image files, globs or folders.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint folder (e.g. RUN/train/best).")],
    beams: Annotated[int, typer.Option(help="Beam width.")] = 3,
    min_new_tokens: Annotated[int, typer.Option(help="Shortest caption in tokens.")] = 5,
    max_new_tokens: Annotated[int, typer.Option(help="Longest caption in tokens.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    format: Annotated[str, typer.Option("--format", "-f", help="jsonl | coco (results format)")] = "jsonl",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file (default: stdout).")] = None,
) -> None:
    """Caption images with a trained checkpoint; unreadable files are reported and skipped."""
    from .caption import caption_files

    result = caption_files(
        model,
        images,
        beams=beams,
        min_new_tokens=min_new_tokens,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        fmt=format,  # type: ignore[arg-type]
        out=out,
    )
    typer.echo(result.summary(), err=out is None)


@app.command(
    epilog="Examples:\n\n"
    "  icsd score --run runs/coco --model openai/clip-vit-base-patch32\n\n"
    "  icsd pairs --run runs/coco --min-clip-score 0.25"
)
def score(
    run: RunOpt,
    model: Annotated[str | None, typer.Option(help="CLIP model id or path.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass.")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda")] = None,
    config: ConfigOpt = None,
) -> None:
    """Optional: CLIP image-text similarity of each image with its summary and selected captions."""
    _done(_stage("score", run, config, {"model": model, "batch_size": batch_size, "device": device}))


# ----------------------------------------------------------------------------- whole chain


def split_run_args(args: list[str]) -> tuple[Path | None, dict[str, str]]:
    """``[CONFIG] [--stage.key VALUE | --stage.key=VALUE ...]`` in any order -> (config, overrides)."""
    config: Path | None = None
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            if config is not None:
                raise UserError(f"unexpected argument {arg!r}: give one CONFIG; overrides look like --stage.key VALUE")
            config = Path(arg)
            i += 1
            continue
        key, eq, value = arg.lstrip("-").partition("=")
        if "." not in key:
            raise UserError(f"unknown option {arg!r}; overrides look like --stage.key VALUE (see icsd run --help)")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"override {arg} needs a value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return config, out


@app.command(
    "run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    options_metavar="[CONFIG] [OPTIONS] [--stage.key VALUE ...]",
    epilog="Examples:\n\n"
    "  icsd run                                    # the offline quickstart (CPU, no downloads)\n\n"
    "  icsd run configs/icsd_coco.yaml --run runs/coco\n\n"
    "  icsd run configs/icsd_coco.yaml --from render --to train\n\n"
    "  icsd run --render.model CompVis/stable-diffusion-v1-4 --render.size 512\n\n"
    "  icsd run configs/icsd_coco.yaml --force summarize",
)
def run_chain(
    ctx: typer.Context,
    run: Annotated[Path | None, typer.Option("--run", "-r", help="Run directory (default runs/<name>).")] = None,
    start: Annotated[str | None, typer.Option("--from", help="First stage to run.")] = None,
    stop: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Redo this stage from scratch (repeatable).")
    ] = None,
) -> None:
    """icsd run [CONFIG] [--stage.key VALUE ...]: the whole chain.

    CONFIG is a pipeline YAML (default: the bundled offline quickstart). Unchanged stages are
    skipped, interrupted ones resume. Any config key can be overridden as --stage.key VALUE
    (e.g. --render.model ID).
    """
    from . import pipeline

    config_file, overrides = split_run_args(list(ctx.args))
    cfg = pipeline.load_config(config_file, overrides)
    result = pipeline.run(cfg, run, start=start, stop=stop, force=force or [], echo=typer.echo)
    root = result.run.root
    typer.echo(
        f"run: {len(result.ran)} stage(s) ran, {len(result.skipped)} skipped in {result.seconds:.1f}s -> {root}"
    )
    typer.echo(f"  report:  {root / 'report.html'}")
    if (root / "train").exists():
        typer.echo(f"  model:   {root / 'train'}")
    evals = sorted((root / "eval").glob("*/scores.json")) if (root / "eval").exists() else []
    for f in evals:
        typer.echo(f"  scores:  {f}")
    if config_file is None:
        typer.echo(
            "This was the offline quickstart with tiny models. For the paper's setting on a GPU machine:\n"
            "  icsd run configs/icsd_coco.yaml   (see configs/README.md for the keys you must set)"
        )


@app.command(epilog="Example:\n\n  icsd report --run runs/quickstart && xdg-open runs/quickstart/report.html")
def report(
    run: RunOpt,
    sample_groups: Annotated[int | None, typer.Option(help="Groups shown with their images.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write RUN/report.html: one self-contained page of the run (counts, groups, images, curves, scores)."""
    _done(_stage("report", run, config, {"sample_groups": sample_groups}))


@app.command(
    epilog="Examples:\n\n"
    "  icsd evaluate --predictions preds.json --references captions_val2017.json\n\n"
    "  icsd evaluate --predictions preds.json --references dataset_coco.json --split test --out scores.json\n\n"
    "  icsd evaluate --predictions preds.json --references nocaps_val_4500_captions.json --benchmark nocaps-val\n\n"
    "  icsd evaluate --model runs/coco/train/best --benchmark coco-karpathy-test "
    "--annotations dataset_coco.json --images data/coco --run runs/coco\n\n"
    "  icsd evaluate --model runs/coco/train/best --benchmark flickr30k-karpathy-test "
    "--annotations dataset_flickr30k.json --images data/flickr30k-images --run runs/coco\n\n"
    "  ICSD_SPICE_JARS=~/stanford-corenlp-full-2015-12-09 icsd evaluate --predictions p.json --references r.json\n\n"
    "Benchmarks: coco-karpathy-test, coco-karpathy-val, flickr30k-karpathy-test, flickr30k-karpathy-val, "
    "nocaps-val (scored per domain), coco-captions. Scores are pycocoevalcap's (0-1 in JSON, x100 in the table)."
)
def evaluate(
    predictions: Annotated[
        Path | None, typer.Option(help="COCO results JSON: [{image_id, caption}, ...].")
    ] = None,
    references: Annotated[
        Path | None,
        typer.Option(
            "--references",
            "--annotations",
            help="Reference captions: COCO captions JSON, Karpathy split JSON or NoCaps val JSON.",
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="Karpathy split to score (default test).")] = None,
    benchmark: Annotated[
        str | None, typer.Option(help="Benchmark name (checks the file; names the output folder).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Captioner checkpoint folder: caption the images here.")] = None,
    images: Annotated[Path | None, typer.Option(help="Folder of the benchmark's images (with --model).")] = None,
    run: Annotated[
        Path | None, typer.Option("--run", "-r", help="Run directory: write RUN/eval/<benchmark>/.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write scores.json here.")] = None,
    metrics: Annotated[
        str | None, typer.Option(help="Comma-separated: BLEU,METEOR,ROUGE_L,CIDEr,SPICE (default all).")
    ] = None,
    spice_jars: Annotated[
        str | None, typer.Option(help="Folder with the Stanford CoreNLP 3.6.0 jars (else $ICSD_SPICE_JARS).")
    ] = None,
    subset: Annotated[
        bool | None, typer.Option("--subset/--no-subset", help="Score only the predicted images.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="With --model: caption only the first N images.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per captioning batch.")] = None,
    beams: Annotated[int | None, typer.Option(help="Beam width (default 3).")] = None,
    min_new_tokens: Annotated[int | None, typer.Option(help="Shortest caption in tokens (default 5).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest caption in tokens (default 30).")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    config: ConfigOpt = None,
) -> None:
    """Score captions with BLEU, METEOR, ROUGE-L, CIDEr and SPICE exactly as pycocoevalcap does."""
    from .config import stage_config
    from .stages import evaluate as evaluate_stage

    cfg = stage_config(
        "evaluate",
        config,
        {
            "predictions": str(predictions) if predictions else None,
            "annotations": str(references) if references else None,
            "split": split,
            "benchmark": benchmark,
            "model": model,
            "images": str(images) if images else None,
            "metrics": metrics,
            "spice_jars": spice_jars,
            "subset": subset,
            "limit": limit,
            "batch_size": batch_size,
            "beams": beams,
            "min_new_tokens": min_new_tokens,
            "max_new_tokens": max_new_tokens,
            "device": device,
        },
    )
    result = evaluate_stage.main(cfg, run, out)
    typer.echo(result.table)
    _done(result)

@app.command(
    epilog="Examples:\n\n"
    "  icsd compare runs/icsd_coco runs/uni_coco\n\n"
    "  icsd compare runs/* --metric CIDEr --csv > table.csv"
)
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories.")],
    metric: Annotated[str | None, typer.Option(help="Show only this metric (e.g. CIDEr) and sort by it.")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV instead of Markdown.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of Markdown.")] = False,
) -> None:
    """One table across runs: the settings that differ, synthetic-data counts and every score."""
    from . import compare as cmp

    columns, rows = cmp.compare_rows(runs, metric)
    if as_json:
        typer.echo(cmp.to_json(columns, rows))
    elif as_csv:
        typer.echo(cmp.to_csv(columns, rows), nl=False)
    else:
        typer.echo(cmp.to_markdown(columns, rows))


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)  # closing lines reach logs as they happen
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished parts are kept; run the same command again to resume", err=True)
        sys.exit(130)
    except Exception as exc:
        reason = write_failure_reason(exc)
        if reason is None:
            raise
        typer.echo(f"error: cannot write to disk ({reason}); finished parts are kept: "
                   "free space (or fix the disk) and run the same command again", err=True)  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
