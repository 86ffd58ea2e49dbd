"""Render stage: a tiny random Stable Diffusion pipeline saved with save_pretrained, rendered through
the same stage function and CLI a user runs with a real model path."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from icsd.backends import t2i
from icsd.config import RenderConfig
from icsd.records import Caption, SampleMeta, Selection, to_table
from icsd.stages import render
from icsd.store import RunDir, is_done, read_marker, safe_key, write_parquet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32
STEPS = 2
ODD_ID = "grp/7 a..b"  # not file-name safe: stored under store.safe_key




@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return t2i.build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def flagging_sd(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with its safety checker's concept thresholds lowered below any cosine
    similarity, so the checker itself flags every image."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.safety_checker.concept_embeds_weights.data.fill_(-2.0)
    dest = tmp_path_factory.mktemp("models") / "flagging-sd"
    pipe.save_pretrained(dest)
    return dest


def ok_rows(ids: list[str]) -> list[Selection]:
    return [
        Selection(group_id=g, status="ok", selected_ids=[g, f"{g}-b"], summary=f"a photo of {g} on a table")
        for g in ids
    ]


def write_selections(run: RunDir, rows: list[Selection]) -> None:
    write_parquet(to_table(rows, Selection), run.selections)


def cfg_for(model: Path, **kw: Any) -> RenderConfig:
    base: dict[str, Any] = {
        "model": str(model),
        "steps": STEPS,
        "size": SIZE,
        "shard_size": 2,
        "batch_size": 2,
    }
    return RenderConfig(**{**base, **kw})


def read_samples(run: RunDir) -> dict[str, tuple[SampleMeta, np.ndarray]]:
    """key -> (sample json, decoded pixels) over every done shard."""
    from PIL import Image

    out: dict[str, tuple[SampleMeta, np.ndarray]] = {}
    for shard in sorted(run.images.glob("shard-*.tar")):
        assert is_done(shard)
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        for name, data in members.items():
            key, ext = name.rsplit(".", 1)
            if ext == "json":
                continue
            meta = SampleMeta.from_json(members[f"{key}.json"], key)
            out[key] = (meta, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


class CallCounter:
    """Wraps T2IPipeline.generate: counts rendered items and can fail on a given call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_on: int | None = None, exc: type = RuntimeError):
        self.items = 0
        self.calls = 0
        original = t2i.T2IPipeline.generate
        counter = self

        def generate(self_: t2i.T2IPipeline, prompts: Any, seeds: Any, **kw: Any) -> t2i.Rendered:
            counter.calls += 1
            if fail_on is not None and counter.calls == fail_on:
                raise exc("injected failure")
            counter.items += len(prompts)
            return original(self_, prompts, seeds, **kw)

        monkeypatch.setattr(t2i.T2IPipeline, "generate", generate)


# ----------------------------------------------------------------------------- layout and records


def test_shards_layout_and_sample_json(tiny_sd: Path, tmp_path: Path) -> None:
    import webdataset as wds

    run = RunDir.at(tmp_path / "run")
    ids = ["g0", "g1", "g2", "g3", ODD_ID]
    write_selections(run, ok_rows(ids) + [Selection(group_id="g9", status="parse_error", error="no JSON")])
    result = render.run(cfg_for(tiny_sd), run)

    assert result.counts["images"] == 5 and result.counts["shards"] == 3 and result.counts["nsfw"] == 0
    assert "render: images 5" in result.summary() and str(run.images) in result.summary()
    names = sorted(p.name for p in run.images.iterdir())
    assert names == [f"shard-0000{i}.{ext}" for i in range(3) for ext in ("done.json", "tar")]
    marker = read_marker(run.images / "shard-00000.tar")
    assert marker is not None and marker["count"] == 2 and marker["model"] == str(tiny_sd)
    assert marker["settings"]["steps"] == STEPS and marker["seconds"] > 0

    samples = list(wds.WebDataset(sorted(str(p) for p in run.images.glob("*.tar")), shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(safe_key(i) for i in ids)  # sorted ids, parse_error dropped
    by_id = {json.loads(s["json"])["id"]: s for s in samples}
    meta = json.loads(by_id[ODD_ID]["json"])
    assert by_id[ODD_ID]["__key__"] == safe_key(ODD_ID) != ODD_ID
    assert meta == {
        "id": ODD_ID,
        "prompt_source": "summary",
        "summary": f"a photo of {ODD_ID} on a table",
        "seed": t2i.item_seed(0, ODD_ID),
        "model": str(tiny_sd),
        "scheduler": "dpm++",
        "steps": STEPS,
        "guidance": 7.5,
        "width": SIZE,
        "height": SIZE,
        "negative_prompt": None,
        "nsfw": False,
        "safety_checker": True,
        "untrained": False,
    }
    assert SampleMeta.from_json(by_id[ODD_ID]["json"]).to_json() == by_id[ODD_ID]["json"]  # one record, both ways
    from PIL import Image

    image = Image.open(io.BytesIO(by_id["g0"]["jpg"]))
    assert image.format == "JPEG" and image.size == (SIZE, SIZE)
    entry = run.stage_entry("render")
    assert entry and entry["complete"] and entry["counts"]["images"] == 5
    assert not list(run.images.glob(".*.tmp"))


# ----------------------------------------------------------------------------- per-sample seeds


@pytest.fixture(scope="module")
def reference_run(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = RunDir.at(tmp_path_factory.mktemp("ref") / "run")
    write_selections(run, ok_rows([f"g{i}" for i in range(5)]))
    render.run(cfg_for(tiny_sd, batch_size=1, shard_size=10), run)
    return read_samples(run)


def assert_same_images(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key][0].seed == b[key][0].seed
        # Batched matmuls round differently in the last float bit, which may move a pixel by one
        # level before JPEG; anything seed-related would differ by tens of levels.
        diff = np.abs(a[key][1].astype(int) - b[key][1].astype(int))
        assert diff.mean() < 0.5 and diff.max() <= 12, (key, diff.mean(), diff.max())


def test_same_item_same_pixels_whatever_batch_size_and_order(
    tiny_sd: Path, reference_run: dict[str, Any], tmp_path: Path
) -> None:
    run = RunDir.at(tmp_path / "run")
    write_selections(run, ok_rows([f"g{i}" for i in (4, 2, 0, 3, 1)]))  # another order on disk
    render.run(cfg_for(tiny_sd, batch_size=3, shard_size=3), run)
    samples = read_samples(run)
    assert_same_images(reference_run, samples)
    # distinct items really get distinct noise
    assert np.abs(samples["g0"][1].astype(int) - samples["g1"][1].astype(int)).mean() > 10


def test_backend_pixels_do_not_depend_on_the_batch(tiny_sd: Path) -> None:
    pipe = t2i.load_pipeline(t2i.T2ISpec(model=str(tiny_sd)), "cpu")
    seeds = [t2i.item_seed(0, g) for g in ("a", "b", "c")]
    kw: dict[str, Any] = {"steps": STEPS, "guidance": 7.5, "width": SIZE, "height": SIZE}
    three = pipe.generate(["a cat", "a dog", "a bus"], seeds, **kw)
    one = pipe.generate(["a dog"], seeds[1:2], **kw)
    assert three.pixels.shape == (3, SIZE, SIZE, 3) and three.pixels.dtype == np.uint8
    assert np.abs(one.pixels[0].astype(int) - three.pixels[1].astype(int)).max() <= 1
    again = pipe.generate(["a dog"], seeds[1:2], **kw)
    assert np.array_equal(one.pixels, again.pixels)


def test_two_workers_give_the_same_images(
    tiny_sd: Path, reference_run: dict[str, Any], tmp_path: Path
) -> None:
    """Two workers built by the render factory (as each pool process builds its own), each rendering
    every other shard, last shard first: the same pixels as one worker in order."""
    import pickle

    from icsd.executor import ShardTask, run_tasks

    run = RunDir.at(tmp_path / "run")
    write_selections(run, ok_rows([f"g{i}" for i in range(5)]))
    cfg = cfg_for(tiny_sd, devices="cpu,cpu", shard_size=1, batch_size=2)
    settings = render._settings(cfg)
    spec = t2i.T2ISpec(model=str(tiny_sd))
    factory = render.RenderWorkerFactory(spec, settings, cfg.batch_size, cfg.devices, workers=2)
    items = render.choose_items(render.summary_items(run), limit=None, sample=None, seed=0)
    tasks = [
        ShardTask(key=str(i), output=run.images / render.shard_name(i), size=1, payload=shard)
        for i, shard in enumerate(render.plan_shards(items, 1))
    ]
    assert pickle.dumps(factory)  # the process pool ships the factory to each worker
    for index in (1, 0):
        mine = [t for i, t in enumerate(tasks) if i % 2 == index][::-1]
        run_tasks(mine, lambda _i, w=index: factory(w), quiet=True)
    assert_same_images(reference_run, read_samples(run))


# ----------------------------------------------------------------------------- resume


def test_failure_between_shards_keeps_done_shards_and_resumes(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir.at(tmp_path / "run")
    write_selections(run, ok_rows([f"g{i}" for i in range(6)]))
    CallCounter(monkeypatch, fail_on=3)  # shards of 2, batches of 2: dies starting the third shard
    with pytest.raises(RuntimeError, match="injected"):
        render.run(cfg_for(tiny_sd), run)
    assert is_done(run.images / "shard-00000.tar") and is_done(run.images / "shard-00001.tar")
    assert not (run.images / "shard-00002.tar").exists() and not list(run.images.glob(".*.tmp"))
    before = [read_marker(run.images / f"shard-0000{i}.tar") for i in range(2)]

    monkeypatch.undo()
    counter = CallCounter(monkeypatch)
    result = render.run(cfg_for(tiny_sd), run)
    assert counter.items == 2 and result.counts["skipped_shards"] == 2 and result.counts["images"] == 6
    assert [read_marker(run.images / f"shard-0000{i}.tar") for i in range(2)] == before
    assert len(read_samples(run)) == 6


def test_interrupt_inside_a_shard_leaves_no_partial_tar(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir.at(tmp_path / "run")
    write_selections(run, ok_rows([f"g{i}" for i in range(8)]))
    CallCounter(monkeypatch, fail_on=4, exc=KeyboardInterrupt)  # shards of 4: second batch of shard 1
    with pytest.raises(KeyboardInterrupt):
        render.run(cfg_for(tiny_sd, shard_size=4), run)
    assert is_done(run.images / "shard-00000.tar")
    assert sorted(p.name for p in run.images.iterdir()) == ["shard-00000.done.json", "shard-00000.tar"]
    monkeypatch.undo()
    counter = CallCounter(monkeypatch)
    render.run(cfg_for(tiny_sd, shard_size=4), run)
    assert counter.items == 4 and len(read_samples(run)) == 8


def test_truncated_shard_is_redone(tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir.at(tmp_path / "run")
    write_selections(run, ok_rows([f"g{i}" for i in range(6)]))
    render.run(cfg_for(tiny_sd), run)
    untouched = read_marker(run.images / "shard-00000.tar")

    shard = run.images / "shard-00001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # marker kept: its size no longer matches
    (run.images / "shard-00002.done.json").unlink()  # a tar without its marker
    assert not is_done(shard)

    counter = CallCounter(monkeypatch)
    result = render.run(cfg_for(tiny_sd), run)
    assert counter.items == 4 and result.counts["skipped_shards"] == 1
    assert read_marker(run.images / "shard-00000.tar") == untouched
    assert shard.read_bytes() != data[: len(data) // 2] and len(read_samples(run)) == 6


def test_changed_settings_rerender_and_stale_shards_go(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir.at(tmp_path / "run")
    write_selections(run, ok_rows([f"g{i}" for i in range(5)]))
    render.run(cfg_for(tiny_sd), run)
    counter = CallCounter(monkeypatch)
    render.run(cfg_for(tiny_sd, batch_size=1), run)  # batch size does not change images
    assert counter.items == 0
    render.run(cfg_for(tiny_sd, steps=1, limit=3), run)
    assert counter.items == 3
    assert sorted(p.name for p in run.images.glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    assert {m.steps for m, _ in read_samples(run).values()} == {1}


# ----------------------------------------------------------------------------- NSFW


def test_safety_checker_flag_is_recorded(flagging_sd: Path, tiny_sd: Path, tmp_path: Path) -> None:
    run = RunDir.at(tmp_path / "flagged")
    write_selections(run, ok_rows(["g0", "g1", "g2"]))
    result = render.run(cfg_for(flagging_sd), run)
    samples = read_samples(run)
    assert result.counts["nsfw"] == 3
    assert all(m.nsfw is True and m.safety_checker is True for m, _ in samples.values())
    assert all(px.max() <= 8 for _, px in samples.values())  # the pipeline blacks flagged images out
    assert read_marker(run.images / "shard-00000.tar")["nsfw"] == 2  # type: ignore[index]

    off = RunDir.at(tmp_path / "off")
    write_selections(off, ok_rows(["g0", "g1", "g2"]))
    result = render.run(cfg_for(flagging_sd, safety_checker=False), off)
    samples = read_samples(off)
    assert "nsfw" not in result.counts
    assert all(m.nsfw is None and m.safety_checker is False for m, _ in samples.values())
    assert all(px.max() > 8 for _, px in samples.values())


# ----------------------------------------------------------------------------- prompt sources


def test_caption_prompts_limit_sample_and_webp(tiny_sd: Path, tmp_path: Path) -> None:
    run = RunDir.at(tmp_path / "run")
    caps = [
        Caption(caption_id=f"c{i}", text=f"caption number {i}", source="test") for i in (5, 3, 1, 0, 4, 2)
    ]
    write_parquet(to_table(caps, Caption), run.captions)
    render.run(cfg_for(tiny_sd, prompts="captions", limit=3, image_format="webp", quality=80), run)
    samples = read_samples(run)
    assert sorted(samples) == ["c0", "c1", "c2"]
    meta = samples["c1"][0]
    assert meta.prompt_source == "caption" and meta.summary == "caption number 1"
    assert meta.seed == t2i.item_seed(0, "c1")
    with tarfile.open(run.images / "shard-00000.tar") as tar:
        assert sorted(tar.getnames()) == ["c0.json", "c0.webp", "c1.json", "c1.webp"]

    picked = render.choose_items(
        [render.RenderItem(c.caption_id, c.text) for c in caps], limit=None, sample=3, seed=7
    )
    again = render.choose_items(
        [render.RenderItem(c.caption_id, c.text) for c in reversed(caps)], limit=None, sample=3, seed=7
    )
    assert picked == again and len(picked) == 3 and picked == sorted(picked, key=lambda it: it.item_id)


def test_tiny_random_builds_into_the_run_cache(tmp_path: Path) -> None:
    run = RunDir.at(tmp_path / "run")
    write_selections(run, ok_rows(["g0"]))
    result = render.run(RenderConfig(tiny_random=True, steps=1, size=SIZE, batch_size=1), run)
    assert (run.cache / t2i.TINY_CACHE_NAME / "model_index.json").is_file()
    meta = read_samples(run)["g0"][0]
    assert meta.untrained is True and meta.model == t2i.TINY_MODEL_NAME
    assert any("untrained" in n for n in result.notes)


# ----------------------------------------------------------------------------- command line


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    return subprocess.run(
        [sys.executable, "-m", "icsd.cli", "render", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("case", "extra", "expected"),
    [
        ("missing", [], "selections not found"),
        ("empty", [], "no ok summaries"),
        ("ok", ["--model", "/nonexistent/sd-model"], "model path not found"),
        ("ok", ["--model", "nobody-here/no-such-model"], "cannot be fetched from the Hugging Face Hub"),
        ("ok", ["--scheduler", "warp"], "unknown scheduler"),
        ("ok", ["--prompts", "captions"], "captions not found"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(case: str, extra: list[str], expected: str, tmp_path: Path) -> None:
    run = RunDir.at(tmp_path / "run")
    if case == "empty":
        write_selections(run, [Selection(group_id="g0", status="failed", error="timeout")])
    elif case == "ok":
        write_selections(run, ok_rows(["g0"]))
    proc = run_cli(["--run", str(run.root), *extra], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def test_cli_renders_with_a_model_path(
    tiny_sd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from icsd import cli

    run = RunDir.at(tmp_path / "run")
    write_selections(run, ok_rows(["g0", "g1", "g2"]))
    argv = ["icsd", "render", "--run", str(run.root), "--model", str(tiny_sd), "--steps", "2", "--size", "32"]
    argv += [
        "--shard-size",
        "2",
        "--batch-size",
        "3",
        "--seed",
        "5",
        "--no-safety-checker",
        "--format",
        "webp",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("render: images 3") and out[-1].endswith(str(run.images))
    meta = read_samples(run)["g2"][0]
    assert meta.seed == t2i.item_seed(5, "g2") and meta.nsfw is None and meta.safety_checker is False
