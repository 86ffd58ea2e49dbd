"""The Ray executor writes exactly what the inline executor writes (local Ray, 2 CPUs)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from icsd.config import EmbedConfig, IngestConfig
from icsd.stages import embed, ingest
from icsd.store import RunDir, read_embeddings, sha256_file

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # long: kept in the default run (deselect with -m 'not slow')


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def make_run(root: Path, corpus: Path) -> RunDir:
    run = RunDir.at(root)
    ingest.run(IngestConfig(corpus=str(corpus)), run)
    return run


def test_embed_on_ray_equals_inline_byte_for_byte(local_ray, tmp_path: Path, coco_slice: Path, tiny_sentence_model: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = EmbedConfig(model=str(tiny_sentence_model), part_size=64, device="cpu")
    inline = make_run(tmp_path / "inline", coco_slice)
    on_ray = make_run(tmp_path / "ray", coco_slice)
    embed.run(cfg, inline)
    res = embed.run(cfg.model_copy(update={"executor": "ray", "workers": 2}), on_ray)
    assert res.counts["parts_computed"] == 5
    a_parts = sorted(inline.embeddings.glob("part-*.parquet"))
    b_parts = sorted(on_ray.embeddings.glob("part-*.parquet"))
    assert [p.name for p in a_parts] == [p.name for p in b_parts]
    assert [sha256_file(p) for p in a_parts] == [sha256_file(p) for p in b_parts]
    ids_a, a = read_embeddings(inline.embeddings)
    ids_b, b = read_embeddings(on_ray.embeddings)
    assert ids_a == ids_b and np.array_equal(a, b)
    again = embed.run(cfg.model_copy(update={"executor": "ray", "workers": 2}), on_ray)
    assert again.counts["parts_computed"] == 0 and again.counts["parts_skipped"] == 5


def test_render_on_two_ray_actors_equals_inline_pixel_for_pixel(local_ray, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import io
    import os

    import torch
    from PIL import Image

    from icsd import ray_executor
    from icsd.backends import t2i
    from icsd.config import RenderConfig
    from icsd.records import Selection, to_table
    from icsd.stages import render
    from icsd.store import done_shards, iter_shard_samples, write_parquet

    model = t2i.build_tiny_pipeline(tmp_path / "tiny-sd")
    rows = [Selection(f"g{i}", "ok", [f"g{i}"], f"a photo of thing {i} on a table") for i in range(5)]
    cfg = RenderConfig(model=str(model), steps=2, size=32, shard_size=2, batch_size=2, devices="cpu")
    ray_results: list[dict] = []
    real_run_ray = ray_executor.run_ray

    def spy_run_ray(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real_run_ray(*args, **kwargs)
        ray_results.extend(out)
        return out

    monkeypatch.setattr(ray_executor, "run_ray", spy_run_ray)
    threads = torch.get_num_threads()
    runs = {}
    try:
        # each of the 2 actors computes on cpu_count // 2 threads: the inline run does the same
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        for name, cfg_run in [("inline", cfg), ("ray", RenderConfig(**{**cfg.model_dump(), "executor": "ray", "workers": 2}))]:
            rd = RunDir.at(tmp_path / name)
            write_parquet(to_table(rows, Selection), rd.selections)
            render.run(cfg_run, rd)
            runs[name] = rd
    finally:
        torch.set_num_threads(threads)
    assert len(ray_results) == 3 and len({r["_pid"] for r in ray_results}) == 2  # two actors really rendered
    pixels = {}
    for name, rd in runs.items():
        shards, unfinished = done_shards(rd.images)
        assert len(shards) == 3 and unfinished == 0
        pixels[name] = {
            s.item_id: np.asarray(Image.open(io.BytesIO(s.image or b""))) for sh in shards for s in iter_shard_samples(sh)
        }
    assert sorted(pixels["ray"]) == [f"g{i}" for i in range(5)]
    for item, img in pixels["inline"].items():
        assert np.array_equal(img, pixels["ray"][item]), item
    a = sorted(runs["inline"].images.glob("shard-*.tar"))
    b = sorted(runs["ray"].images.glob("shard-*.tar"))
    assert [sha256_file(p) for p in a] == [sha256_file(p) for p in b]


def test_ray_actors_are_ended_after_a_failed_shard(local_ray, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A shard that raises on an actor: the error names it in one line, nothing queued is
    dispatched any more, and every actor is ended (calling one afterwards fails as a dead actor)."""
    from icsd import ray_executor
    from icsd.executor import ShardFailed, ShardTask, run_tasks

    folder = tmp_path

    def factory(index: int):  # type: ignore[no-untyped-def]  # pickled by value for the actors
        def work(task, progress):  # type: ignore[no-untyped-def]
            (folder / f"started-{task.key}").touch()
            if task.key == "t01":
                raise ValueError("broken shard on purpose")
            while not (folder / "started-t01").exists():  # nothing finishes before the failure happened
                time.sleep(0.01)
            if task.key != "t00":
                # a task dispatched before the driver saw t01's error (on a loaded machine the error
                # can arrive after t00's result) stays in flight until it has: queued ones never start
                time.sleep(1.0)
            return {"key": task.key}

        return work

    actors: list = []
    real_actor_class = ray_executor._actor_class

    class Recording:
        def __init__(self, cls) -> None:  # type: ignore[no-untyped-def]
            self.cls = cls

        def options(self, **kw):  # type: ignore[no-untyped-def]
            return Recording(self.cls.options(**kw))

        def remote(self, *args):  # type: ignore[no-untyped-def]
            handle = self.cls.remote(*args)
            actors.append(handle)
            return handle

    monkeypatch.setattr(ray_executor, "_actor_class", lambda r: Recording(real_actor_class(r)))
    tasks = [ShardTask(key=f"t{i:02d}", output=tmp_path / f"t{i:02d}.out", size=1) for i in range(8)]
    with pytest.raises(ShardFailed, match=r"^shard t01 failed: ValueError: broken shard on purpose$"):
        run_tasks(tasks, factory, executor="ray", workers=2, quiet=True)
    assert len(actors) == 2
    ran = sorted(p.name for p in tmp_path.glob("started-*"))
    assert ran[:2] == ["started-t00", "started-t01"] and len(ran) <= 4, ran  # the queued ones never started
    for actor in actors:
        assert actor_ends(actor), f"actor {actor} still answers after the failed run"


def actor_ends(actor, tries: int = 600) -> bool:  # type: ignore[no-untyped-def]
    """True once a call to ``actor`` fails as a dead actor (ray.kill is asynchronous: a call sent
    right after it may still be served, so ask until the death shows, up to ``tries`` calls)."""
    for _ in range(tries):
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.05)
    return False
