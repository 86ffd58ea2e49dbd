"""Adding a part is one module plus one registration line: an LLM backend, a text-to-image backend
(each with an option of its own), an embedder and a captioner family, registered at run time, run
through the command line like the built-in ones; a backend's options are settings of its stage."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import Field
from test_plugins import candidate_run
from typer.testing import CliRunner

from icsd.backends.captioners import TinyCaptioner
from icsd.backends.registry import CAPTIONERS, EMBEDDERS, T2I_BACKENDS
from icsd.backends.t2i import Rendered, T2IOptions
from icsd.llm import LLM_BACKENDS, ChatAnswer, ChatBackend, ChatRequest, LLMOptions

# ----------------------------------------------------------------------------- the new parts


class FirstOptions(LLMOptions):
    keep: int = Field(default=5, ge=1, description="Candidates every answer selects.")


class FirstBackend(ChatBackend):
    """Selects the first ``keep`` candidates and answers the head caption, as JSON."""

    name = "first"
    Options = FirstOptions

    @classmethod
    def from_spec(cls, spec: FirstOptions) -> FirstBackend:  # type: ignore[override]
        backend = cls(f"first-{spec.keep}", spec.params)
        backend.keep = spec.keep
        return backend

    @classmethod
    def label(cls, spec: FirstOptions) -> str:  # type: ignore[override]
        return f"first-{spec.keep}"

    def stream(self, items: Iterable[tuple[Any, ChatRequest]]) -> Iterator[tuple[Any, ChatAnswer]]:
        for key, request in items:
            prompt = "\n".join(m["content"] for m in request.messages)
            heads = re.findall(r"^\s*1[.)]\s+(.*\S)\s*$", prompt, re.M)  # the last list is the candidates
            summary = heads[-1] if heads else "a scene"
            yield key, ChatAnswer(text=json.dumps({"index": list(range(1, self.keep + 1)), "summary": summary}))


class FlatOptions(T2IOptions):
    level: int = Field(default=128, ge=0, le=255, description="Grey level of every image.")


class FlatGenerator:
    has_safety_checker = False
    pipeline_class = "FlatGenerator"
    scheduler_name = "none"

    def __init__(self, level: int, device: str) -> None:
        self.level, self.device = level, device

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance: float,
                 width: int, height: int, negative_prompt: str | None = None) -> Rendered:  # fmt: skip
        pixels = np.full((len(prompts), height, width, 3), self.level, dtype=np.uint8)
        pixels[:, 0, 0, 0] = [s % 256 for s in seeds]  # each image its own
        return Rendered(pixels=pixels, nsfw=[None] * len(prompts))


class FlatBackend:
    untrained = True
    Options = FlatOptions

    @staticmethod
    def prepare(model: str, cache: Path) -> str:
        return model

    @staticmethod
    def model_label(model: str) -> str:
        return "flat"

    @staticmethod
    def load(spec: FlatOptions, device: str) -> FlatGenerator:
        return FlatGenerator(spec.level, device)


class HashedWords:
    def __init__(self, name: str, device: str = "cpu", batch_size: int = 256) -> None:
        self.name, self.dim, self.batch_size = name, 64, batch_size

    def row(self, text: str) -> np.ndarray:
        row = np.zeros(self.dim, dtype=np.float32)
        for word in re.findall(r"[a-z]+", text.lower()) or ["<empty>"]:
            row[int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return row / np.linalg.norm(row)

    def embed(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = np.stack([self.row(t) for t in texts]).astype(np.float32) if texts else np.zeros((0, self.dim), np.float32)
        if progress is not None:
            progress(len(texts))
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "hashed", "dim": self.dim}


class SmallCaptioner(TinyCaptioner):
    name = "small"
    defaults = {**TinyCaptioner.defaults, "image_size": 32}


PARTS = ((LLM_BACKENDS, "first", FirstBackend), (T2I_BACKENDS, "flat", FlatBackend),
         (EMBEDDERS, "hashed", HashedWords), (CAPTIONERS, "small", SmallCaptioner))  # fmt: skip


@pytest.fixture()
def registered() -> Iterator[None]:
    for registry, name, part in PARTS:
        registry.register(name, part)  # the one registration line
    yield
    for registry, name, _ in PARTS:
        registry.unregister(name)


# ----------------------------------------------------------------------------- through the command line


def test_parts_registered_at_run_time_run_through_the_cli(registered: None, tmp_path: Path, coco_slice: Path) -> None:
    from icsd import cli

    app, runner = cli.build_app(), CliRunner()

    def icsd(*args: str) -> str:
        out = runner.invoke(app, list(args))
        assert out.exit_code == 0, out.output
        return out.output

    # a backend's own option is an option of its stage's command, with its description
    assert "--keep" in icsd("summarize", "--help") and "--level" in icsd("render", "--help")
    run = tmp_path / "run"
    candidate_run(run, coco_slice, groups=6, size=8)

    assert "embeddings" in icsd("embed", "--run", str(run), "--kind", "hashed", "--model", "hashed-words")
    assert json.loads((run / "manifest.json").read_text())["stages"]["embed"]["models"]["embedder"]["kind"] == "hashed"

    icsd("summarize", "--run", str(run), "--backend", "first", "--keep", "6")
    import pyarrow.parquet as pq

    rows = pq.read_table(run / "selections.parquet").to_pylist()
    assert len(rows) == 6 and all(r["status"] == "ok" and r["model"] == "first-6" for r in rows), rows[0]["error"]
    assert all(len(r["selected_ids"]) == 6 for r in rows)

    # the option is a setting: in the run's config, in config show, from a config file
    shown = icsd("config", "show", "--stage", "summarize", "-r", str(run))
    assert "summarize.keep: 6" in shown.splitlines()

    assert "render: images 6" in icsd("render", "--run", str(run), "--backend", "flat", "--size", "16", "--level", "40")
    import webdataset as wds

    samples = list(wds.WebDataset(str(run / "images" / "shard-00000.tar"), shardshuffle=False).decode("rgb8"))
    assert len(samples) == 6 and all(int(np.median(s["jpg"])) in range(36, 45) for s in samples)

    icsd("pairs", "--run", str(run))
    out = icsd("train", "--run", str(run), "--preset", "small", "--max-steps", "1", "--device", "cpu",
               "--num-workers", "0", "--batch-size", "4")  # fmt: skip
    assert "train:" in out
    card = json.loads((run / "train" / "last" / "captioner.json").read_text())
    assert card["preset"] == "small"


def test_an_option_of_another_backend_is_kept_but_not_handed_over(registered: None) -> None:
    from icsd.config import RenderConfig, SummarizeConfig

    cfg = SummarizeConfig(backend="first", keep=7, base_url="http://127.0.0.1:1/v1")
    options = cfg.options()
    assert type(options) is FirstOptions and options.keep == 7 and not hasattr(options, "base_url")
    assert cfg.base_url == ["http://127.0.0.1:1/v1"]  # still a setting of the stage
    # diffusers' checks apply to diffusers only: a flat render ignores a scheduler it does not have
    assert type(RenderConfig(backend="flat", scheduler="warp").options()) is FlatOptions
    from icsd.errors import UserError

    with pytest.raises(UserError, match="unknown scheduler 'warp'"):
        RenderConfig(scheduler="warp").options()
