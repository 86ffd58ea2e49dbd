"""LLM client throughput: our summarize client against the reference batching approach.

A local OpenAI-compatible server (``python -m icsd.chat_server``, its own process, so its CPU is
not counted as the client's) answers every request after ``--delay`` seconds. The same candidate
sets, built from the shared COCO captions into the stage's own prompts, are sent by:

- reference: the approach of the paper's script: batches of ``--batch`` concurrent requests
  through the official ``openai`` async client, ``--pause`` seconds of sleep after each batch;
- ours (client=openai): :class:`icsd.llm.openai.OpenAIBackend`, ``--concurrency`` requests in
  flight, official ``openai`` client;
- ours (client=aiohttp): the same backend with its lean aiohttp transport;
- with ``--stage``: the whole ``icsd summarize`` stage (parsing, parts, cache) on the aiohttp client.

Printed per row: wall seconds, requests/s, client CPU seconds per 1,000 requests, requests lost
(sent but without a valid answer), and the speed-up over the reference.

    python benchmarks/llm_client.py                      # 5,000 sets, 200 ms, concurrency 256
    python benchmarks/llm_client.py --groups 200 --delay 0.02 --pause 0.1   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icsd.llm import ChatRequest, GenerationParams
from icsd.llm.answers import parse_answer
from icsd.llm.openai import OpenAIBackend
from icsd.llm.prompts import PromptSettings, answer_schema, load_template

ROOT = Path(__file__).resolve().parents[1]
COCO = Path(os.environ.get("ICSD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "coco" / "captions_val2017.json"
TEST_COCO = ROOT / "tests" / "data" / "coco" / "captions_val2017_subset.json"  # ships with the repository


@dataclass
class Row:
    name: str
    wall: float
    cpu: float
    sent: int
    answered: int

    @property
    def lost(self) -> int:
        return self.sent - self.answered


def candidate_sets(groups: int, k: int, captions: Path = COCO) -> list[list[str]]:
    """``groups`` sets of ``k`` real COCO captions (consecutive windows over the corpus)."""
    texts = [a["caption"].strip() for a in json.loads(captions.read_text())["annotations"]]
    return [[texts[(g * 5 + j) % len(texts)] for j in range(k)] for g in range(groups)]


def build_requests(sets: list[list[str]]) -> list[ChatRequest]:
    settings = PromptSettings()
    template = load_template(settings)
    return [
        ChatRequest(messages=({"role": "user", "content": template.render(s)},), schema=answer_schema(settings, len(s)))
        for s in sets
    ]


def valid(text: str | None, k: int) -> bool:
    return text is not None and parse_answer(text, PromptSettings(), k).status == "ok"


def measure(name: str, sent: int, k: int, work: Callable[[], list[str | None]]) -> Row:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    texts = work()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return Row(name, wall, cpu, sent, sum(valid(t, k) for t in texts))


def run_ours(url: str, requests: list[ChatRequest], concurrency: int, client: str, timeout: float) -> list[str | None]:
    backend = OpenAIBackend("echo", base_urls=[url], params=GenerationParams(), concurrency=concurrency,
                            timeout=timeout, client=client)
    texts: list[str | None] = [None] * len(requests)
    for i, answer in backend.stream(enumerate(requests)):
        texts[i] = answer.text
    return texts


def run_reference(url: str, requests: list[ChatRequest], batch: int, pause: float) -> list[str | None]:
    """Batches of ``batch`` concurrent requests, then a pause: the paper script's approach."""
    from openai import AsyncOpenAI

    async def main() -> list[str | None]:
        client = AsyncOpenAI(base_url=url, api_key="EMPTY")

        async def one(req: ChatRequest) -> str | None:
            try:
                r = await client.chat.completions.create(
                    model="echo", messages=list(req.messages), max_tokens=500, temperature=0.0  # type: ignore[arg-type]
                )
                return r.choices[0].message.content
            except Exception:
                return None

        out: list[str | None] = []
        for start in range(0, len(requests), batch):
            out += await asyncio.gather(*(one(r) for r in requests[start : start + batch]))
            await asyncio.sleep(pause)
        await client.close()
        return out

    return asyncio.run(main())


def prepare_stage_run(root: Path, sets: list[list[str]]) -> Any:
    """A run directory holding the candidate sets (written before the timing starts)."""
    from icsd.records import Candidate, Caption, to_table
    from icsd.store import RunDir, write_parquet

    run = RunDir.at(root)
    captions = [Caption(f"{g}-{j}", t, "coco") for g, s in enumerate(sets) for j, t in enumerate(s)]
    cands = [Candidate(f"{g}-0", [f"{g}-{j}" for j in range(len(s))], [1.0] * len(s)) for g, s in enumerate(sets)]
    write_parquet(to_table(captions, Caption), run.captions)
    write_parquet(to_table(cands, Candidate), run.candidates)
    return run


def run_stage(run: Any, url: str, concurrency: int, timeout: float) -> list[str | None]:
    """The whole summarize stage; returns the raw answers of the rows it judged ok."""
    from icsd.config import SummarizeConfig
    from icsd.records import Selection, from_table
    from icsd.stages import summarize
    from icsd.store import read_parquet

    cfg = SummarizeConfig(backend="openai", model="echo", base_url=[url], concurrency=concurrency,
                          timeout=timeout, client="aiohttp")
    summarize.run(cfg, run)
    return [r.raw if r.status == "ok" else None for r in from_table(read_parquet(run.selections), Selection)]


def server_count(url: str) -> int:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as resp:
        return int(json.load(resp)["requests"])


def start_server(delay: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "icsd.chat_server", "--port", "0", "--delay", str(delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"chat server did not start: {line!r}")
    return proc, line.split()[-1]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=5000)
    parser.add_argument("--k", type=int, default=30, help="captions per candidate set")
    parser.add_argument("--delay", type=float, default=0.2, help="server seconds per answer")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--batch", type=int, default=100, help="reference: requests per batch")
    parser.add_argument("--pause", type=float, default=1.0, help="reference: seconds after each batch")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--stage", action="store_true", help="also time the whole summarize stage")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--captions", type=Path, default=COCO if COCO.is_file() else TEST_COCO,
                        help="COCO captions file (default: the full val2017 file, else the tests' subset)")  # fmt: skip
    args = parser.parse_args(argv)

    sets = candidate_sets(args.groups, args.k, args.captions)
    requests = build_requests(sets)
    proc, url = start_server(args.delay)
    rows: list[Row] = []
    tmp = tempfile.TemporaryDirectory()
    try:
        # warm-up (imports, first connections) and inputs, outside the timings
        run_reference(url, requests[:8], 8, 0.0)
        for client in ("openai", "aiohttp"):
            run_ours(url, requests[:8], 8, client, args.timeout)
        if args.stage:
            run_stage(prepare_stage_run(Path(tmp.name) / "warm", sets[:8]), url, 8, args.timeout)
            stage_run = prepare_stage_run(Path(tmp.name) / "run", sets)
        before = server_count(url)
        if not args.skip_reference:
            rows.append(measure(f"reference: batches of {args.batch}, {args.pause:g} s pause", len(requests), args.k,
                                lambda: run_reference(url, requests, args.batch, args.pause)))
        for client in ("openai", "aiohttp"):
            rows.append(measure(f"ours: concurrency {args.concurrency}, client={client}", len(requests), args.k,
                                lambda c=client: run_ours(url, requests, args.concurrency, c, args.timeout)))  # type: ignore[misc]
        if args.stage:
            rows.append(measure("ours: whole icsd summarize stage, client=aiohttp", len(sets), args.k,
                                lambda: run_stage(stage_run, url, args.concurrency, args.timeout)))
        seen = server_count(url) - before
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        tmp.cleanup()

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{args.groups} candidate sets of {args.k} COCO captions, server answers after {args.delay * 1000:.0f} ms "
          f"(separate process); {sum(r.sent for r in rows)} requests sent, the server saw {seen}")
    ref = rows[0] if not args.skip_reference else None
    header = f"{'client':52s} {'wall s':>8s} {'req/s':>8s} {'CPU s/1k':>9s} {'lost':>5s} {'speed-up':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{ref.wall / r.wall:8.1f}x" if ref else "      n/a"
        print(f"{r.name:52s} {r.wall:8.2f} {r.sent / r.wall:8.1f} {r.cpu / r.sent * 1000:9.2f} {r.lost:5d} {ratio}")
    return rows


if __name__ == "__main__":
    main()
