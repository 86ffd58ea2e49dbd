"""Writing a sandbox world to a folder: the text-only training corpus and the val/test benchmarks.

```
DIR/
  world.json           the spec it was made from (written last: the folder is complete when present)
  train.txt            the corpus: one caption a line, shuffled (scenes stay hidden)
  train_scenes.json    the hidden train scenes with their captions (only the oracle's camera reads it)
  val.json, test.json  COCO caption files: each image's five partial captions
  val/, test/          the camera's images of the full val/test scenes (PNG)
```

Config paths ``sandbox:NAME/FILE`` (e.g. ``sandbox:default/train.txt``) name a file of the world
preset ``NAME`` (:data:`WORLDS`), ``sandbox:NAME@SEED/FILE`` the same preset with world seed SEED; the world is written on first use into ``$ICSD_SANDBOX_DIR``
(default ``~/.cache/icsd/sandbox``), deterministically and in seconds, and reused after.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image

from ..errors import UserError
from .draw import CAMERA, Style, draw_scene
from .world import random_scene, scene_captions

PREFIX = "sandbox:"
VERSION = 3  # bump when the world's generator changes what it writes
WORLD_FILE = "world.json"  # the spec a world was made from, written last


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 0
    train_scenes: int = 600
    val_scenes: int = 200
    test_scenes: int = 200
    captions_per_scene: int = 5
    image_size: int = 64
    style: Style = CAMERA

    def digest(self) -> str:
        payload = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


WORLDS: dict[str, WorldSpec] = {
    "default": WorldSpec(),
    "small": WorldSpec(train_scenes=120, val_scenes=12, test_scenes=20),
    "large": WorldSpec(train_scenes=2000),  # the same world at 10,000 captions (the corpus-size sweep)
}


def _coco(name: str, entries: list[tuple[int, str, list[str]]]) -> dict[str, object]:
    images = [{"id": i, "file_name": f} for i, f, _ in entries]
    anns = [{"id": i * 10 + j, "image_id": i, "caption": c} for i, _, cs in entries for j, c in enumerate(cs)]
    return {"info": {"description": f"sandbox world {name} benchmark"}, "images": images, "annotations": anns}


def write_world(spec: WorldSpec, out: Path) -> Path:
    """Write the world of ``spec`` into ``out`` (replaced if there); returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        rng = random.Random(spec.seed)
        train = []
        for _ in range(spec.train_scenes):
            scene = random_scene(rng)
            train.append(
                {"scene": scene.to_json(), "captions": scene_captions(scene, rng, spec.captions_per_scene)}
            )
        corpus = [c for t in train for c in t["captions"]]
        random.Random(spec.seed + 1).shuffle(corpus)
        (tmp / "train.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
        (tmp / "train_scenes.json").write_text(json.dumps({"scenes": train}), encoding="utf-8")
        for split, n, offset in (("val", spec.val_scenes, 1_000_000), ("test", spec.test_scenes, 2_000_000)):
            (tmp / split).mkdir()
            split_rng = random.Random(spec.seed * 7919 + offset)
            entries, scenes = [], []
            for k in range(n):
                scene = random_scene(split_rng)
                image_id = offset + k
                name = f"{split}_{k:05d}.png"
                pixels = draw_scene(
                    scene.background,
                    list(scene.objects),
                    size=spec.image_size,
                    seed=split_rng.getrandbits(32),
                    style=spec.style,
                )
                Image.fromarray(pixels).save(tmp / split / name)
                entries.append((image_id, name, scene_captions(scene, split_rng, spec.captions_per_scene)))
                scenes.append({"image_id": image_id, "scene": scene.to_json()})
            (tmp / f"{split}.json").write_text(json.dumps(_coco(split, entries)), encoding="utf-8")
            (tmp / f"{split}_scenes.json").write_text(json.dumps({"scenes": scenes}), encoding="utf-8")
        (tmp / WORLD_FILE).write_text(
            json.dumps({"version": VERSION, "digest": spec.digest(), **asdict(spec)}, indent=1),
            encoding="utf-8",
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_world(folder: Path) -> bool:
    """A folder :func:`write_world` finished (its spec file is written last)."""
    return (folder / WORLD_FILE).is_file()


def is_complete(folder: Path, spec: WorldSpec) -> bool:
    marker = folder / WORLD_FILE
    try:
        return bool(json.loads(marker.read_text(encoding="utf-8")).get("digest") == spec.digest())
    except (OSError, ValueError):
        return False


def sandbox_root() -> Path:
    env = os.environ.get("ICSD_SANDBOX_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "icsd" / "sandbox"


def world_spec(name: str) -> WorldSpec:
    """Preset ``name``, or ``name@SEED``: the same preset with another world seed (a world nobody
    has seen: ``sandbox:default@7/train.txt``)."""
    preset, _, seed = name.partition("@")
    if preset not in WORLDS:
        raise UserError(f"unknown sandbox world {preset!r}; worlds: {', '.join(WORLDS)}")
    if not seed:
        return WORLDS[preset]
    if not seed.isdigit():
        raise UserError(f"a sandbox world seed is a whole number: {name!r} (e.g. {preset}@7)")
    return replace(WORLDS[preset], seed=int(seed))


def ensure_world(name: str, root: Path | None = None) -> Path:
    """The folder of world preset ``name``, written now unless complete already."""
    spec = world_spec(name)
    folder = (root or sandbox_root()) / f"{name}-{spec.digest()}"
    if not is_complete(folder, spec):
        write_world(spec, folder)
    return folder


def resolve_path(value: str) -> str:
    """``sandbox:NAME/FILE`` -> the file's path in the (written on first use) world ``NAME``."""
    rest = value[len(PREFIX) :]
    name, _, relative = rest.partition("/")
    folder = ensure_world(name)
    path = folder / relative if relative else folder
    if not path.exists():
        raise UserError(
            f"{value}: the sandbox world has no {relative!r} (files: {', '.join(sorted(p.name for p in folder.iterdir()))})"
        )
    return str(path)


def custom_spec(name: str, **changes: object) -> WorldSpec:
    """Preset ``name`` with ``changes`` (None values ignored)."""
    return replace(world_spec(name), **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
