"""``icsd sandbox make``: write a sandbox world (corpus + val/test benchmarks) into a folder;
``icsd sandbox encoder``: pretrain the sandbox captioner's image encoder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .make import WORLDS, custom_spec, write_world
from .pretrain import PretrainSettings

app = typer.Typer(
    help="The sandbox world (docs/sandbox.md): write its corpus and benchmarks, pretrain its encoder.", no_args_is_help=True
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


@app.command(
    "encoder",
    epilog="Examples:\n\n"
    "  icsd sandbox encoder --out encoders/world          # the packaged encoder's recipe (about 6 min on 2 cores)\n\n"
    "  icsd sandbox encoder --out encoders/short --steps 1000\n\n"
    "  icsd run --train.vision_model encoders/short",
)
def encoder(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (config.json, model.safetensors).")],
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = PretrainSettings.steps,
    images: Annotated[int, typer.Option(min=1, help="Renderer pictures of random scenes to train on.")] = (
        PretrainSettings.images
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Pictures per step.")] = PretrainSettings.batch_size,
    seed: Annotated[int, typer.Option(help="Seed of the weights, the batches and the train scenes.")] = 0,
) -> None:
    """Pretrain the sandbox captioner's image encoder (the world's stand-in for CLIP): multi-label
    kinds, colours and background on the renderer's pictures of random scenes, scored on camera
    pictures of other scenes. The packaged encoder is this command with its defaults."""
    from ..console import progress_bar
    from .pretrain import pretrain_encoder

    settings = PretrainSettings(images=images, steps=steps, batch_size=batch_size, seed=seed)
    with progress_bar(steps, "pretrain", "step") as bar:

        def progress(step: int, total: int, info: dict[str, float]) -> None:
            bar.update(1)
            if step % 50 == 0 or step == total:
                bar.set_postfix(loss=f"{info['loss']:.3f}")

        record = pretrain_encoder(out, settings, progress)
    probe, chance = record["camera_probe"], record["camera_probe_chance"]
    found = ", ".join(f"{k} {probe[k]:.2f} (chance {chance[k]:.2f})" for k in probe)
    typer.echo(f"sandbox encoder: camera pictures, share of true labels found: {found}; {record['seconds']}s -> {out}")
