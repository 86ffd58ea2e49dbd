"""``icsd sandbox make``: write a sandbox world (corpus + val/test benchmarks) into a folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .make import WORLDS, custom_spec, write_world

app = typer.Typer(
    help="The sandbox world (docs/sandbox.md): write its corpus and benchmarks.", no_args_is_help=True
)


@app.command(
    "make",
    epilog="Examples:\n\n"
    "  icsd sandbox make --out worlds/default\n\n"
    "  icsd sandbox make --out worlds/big --train-scenes 5000 --test-scenes 1000 --seed 3\n\n"
    "  icsd run --ingest.corpus worlds/big/train.txt --evaluate.annotations worlds/big/test.json "
    "--evaluate.images worlds/big/test --train.val_images worlds/big/val --train.val_captions worlds/big/val.json",
)
def make(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (replaced if there).")],
    world: Annotated[str, typer.Option(help=f"World preset to start from: {', '.join(WORLDS)}.")] = "default",
    seed: Annotated[int | None, typer.Option(help="World seed (scenes and captions).")] = None,
    train_scenes: Annotated[
        int | None, typer.Option(help="Hidden train scenes (5 corpus captions each).")
    ] = None,
    val_scenes: Annotated[int | None, typer.Option(help="Validation images.")] = None,
    test_scenes: Annotated[int | None, typer.Option(help="Test images.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Benchmark image size in pixels.")] = None,
) -> None:
    """Write train.txt (the text-only corpus), val/test COCO caption files and their camera images."""
    start = time.perf_counter()
    spec = custom_spec(world, seed=seed, train_scenes=train_scenes, val_scenes=val_scenes,
                       test_scenes=test_scenes, image_size=image_size)  # fmt: skip
    folder = write_world(spec, out)
    typer.echo(
        f"sandbox make: {spec.train_scenes * spec.captions_per_scene} corpus captions, {spec.val_scenes} val "
        f"and {spec.test_scenes} test images in {time.perf_counter() - start:.1f}s -> {folder}"
    )
