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

from .errors import UserError

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


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished parts are kept; run the same command again to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
