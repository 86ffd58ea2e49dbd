"""``icsd data list | download | check`` and ``icsd export``: the commands, wiring only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError

app = typer.Typer(
    help="The paper's data sets: what they are, fetch them into the layout the configs expect, "
    "check what a config needs.",
    no_args_is_help=True,
)


@app.command(
    "list",
    epilog="Examples:\n\n  icsd data list\n\n  icsd data list --root /mnt/data",
)
def list_datasets(
    root: Annotated[Path, typer.Option(help="Data root the configs' data/ paths point at.")] = Path("data"),
) -> None:
    """Every data set: what it is, its size, its licence, where it comes from, what uses it, and
    whether it is in place under ROOT."""
    from .catalogue import DATASETS, GROUPS
    from .download import state

    for d in DATASETS.values():
        where = ", ".join(f"{root / t.path}{'/' if t.kind == 'folder' else ''}" for t in d.targets)
        typer.echo(f"{d.name}  [{state(root, d)}]  {d.title}")
        typer.echo(f"    size: {d.size}")
        typer.echo(f"    licence: {d.licence}")
        source = ", ".join(s.url for s in d.sources) or "by request form (see below)"
        checksum = "published SHA-256 checked" if any(s.sha256 for s in d.sources) else "integrity checked, SHA-256 recorded"
        typer.echo(f"    from: {source} ({checksum}); {d.homepage}")
        typer.echo(f"    lands in: {where}")
        typer.echo(f"    used by: {d.used_by}")
        if d.manual:
            typer.echo(f"    by hand: {d.manual.replace('ROOT', str(root))}")
    typer.echo("groups: " + "; ".join(f"{g} = {' '.join(m)}" for g, m in GROUPS.items() if g != "all") + "; all")


@app.command(
    "download",
    epilog="Examples:\n\n"
    "  icsd data download karpathy-splits coco-val2014       # what configs/icsd_coco.yaml needs\n\n"
    "  icsd data download coco nocaps --root /mnt/data       # groups: coco, flickr30k, nocaps, all\n\n"
    "  ICSD_DATA_MIRROR=http://mirror.lan/datasets icsd data download coco2017-captions\n\n"
    "An interrupted download resumes where it stopped when the same command runs again.",
)
def download_command(
    names: Annotated[list[str], typer.Argument(help="Data sets or groups (icsd data list).")],
    root: Annotated[Path, typer.Option(help="Data root (the bundled configs read data/...).")] = Path("data"),
    jobs: Annotated[int, typer.Option(help="Files fetched at once (NoCaps images: 4x this).")] = 4,
    retries: Annotated[int, typer.Option(help="Resumes of a broken connection before giving up.")] = 3,
    mirror: Annotated[
        str | None, typer.Option(help="Fetch from MIRROR/<host>/<path> instead (default: $ICSD_DATA_MIRROR).")
    ] = None,
    keep_archives: Annotated[bool, typer.Option(help="Keep the archives in ROOT/downloads/ after unpacking.")] = False,
) -> None:
    """Fetch data sets (resumable, checksummed, in parallel) and lay them out under ROOT as the
    bundled configs expect; nothing half-unpacked is left behind on failure."""
    from .download import DownloadError, download

    summary = download(names, root, mirror=mirror, jobs=jobs, retries=retries, keep_archives=keep_archives,
                       echo=typer.echo)  # fmt: skip
    typer.echo(summary.line())
    for line in summary.failed[1:]:
        typer.echo(f"error: {line}", err=True)
    if summary.failed:
        raise DownloadError(summary.failed[0])
    if summary.manual:
        raise DownloadError(f"{', '.join(summary.manual)} must be fetched by hand (see above); then run the same "
                            "command again or `icsd data check CONFIG`")  # fmt: skip


@app.command(
    "check",
    epilog="Examples:\n\n"
    "  icsd data check configs/icsd_coco.yaml\n\n"
    "  icsd data check configs/coco_to_nocaps.yaml --evaluate.images /mnt/nocaps/validation",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def check_command(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="Pipeline config (its data paths are checked).")],
) -> None:
    """One table of every path CONFIG needs: in place, missing or corrupt, and which data set
    provides it. Exits 1 when anything is missing or corrupt."""
    from .. import pipeline
    from ..cli import split_run_args
    from .check import check_paths, download_hint, table

    overrides = split_run_args(list(ctx.args), allow_config=False)[1]
    cfg = pipeline.load_config(config, overrides, None)
    checks = check_paths(cfg)
    typer.echo(table(checks))
    bad = [c for c in checks if not c.ok]
    missing = sum(1 for c in bad if c.status == "missing")
    typer.echo(f"check: {len(checks)} paths needed, {len(checks) - len(bad)} in place, {missing} missing, "
               f"{len(bad) - missing} corrupt or incomplete")  # fmt: skip
    hint = download_hint(checks)
    if hint:
        typer.echo(hint)
    if bad:
        raise typer.Exit(1)


EXPORT_EPILOG = (
    "Examples:\n\n"
    "  icsd export --run runs/quickstart --out exports/quickstart\n\n"
    "  icsd export --run runs/icsd_coco --out exports/icsd_coco --shard-rows 20000\n\n"
    "  icsd export --run runs/icsd_coco --out exports/wds --format webdataset\n\n"
    "  huggingface-cli upload USER/icsd-coco exports/icsd_coco . --repo-type dataset\n\n"
    "The folder loads with datasets.load_dataset(FOLDER) and uploads unchanged."
)


def export_command(
    run: Annotated[Path, typer.Option("--run", "-r", help="Run directory (after the pairs stage).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (must be new or empty).")],
    format: Annotated[str, typer.Option("--format", "-f", help="hf (parquet + dataset card) | webdataset")] = "hf",
    shard_rows: Annotated[int, typer.Option(help="Pairs per output shard.")] = 10_000,
) -> None:
    """The run's image-caption pairs as a Hugging Face dataset folder (parquet shards with the
    image bytes, a dataset card), or as webdataset shards."""
    from .export import export

    if format not in ("hf", "webdataset"):
        raise UserError(f"--format must be hf or webdataset, not {format!r}")
    if shard_rows < 1:
        raise UserError("--shard-rows must be at least 1")
    start = time.perf_counter()
    result = export(run, out, fmt=format, shard_rows=shard_rows)
    typer.echo(
        f"export: {result.pairs:,} pairs of {result.images:,} images in {result.shards} shard(s) "
        f"in {time.perf_counter() - start:.1f}s -> {out}"
    )
