"""How often the packaged SmolLM2-135M gives an answer judged ``ok`` (parsed, and making sense: no
copied placeholder, a summary sharing words with what it selected) on real COCO candidate sets.

The candidate sets are made by the real pipeline: ``ingest`` of
``tests/data/coco/captions_val2017_subset.json``, ``embed`` with the packaged MiniLM, ``group``
(top-K, self first); then ``summarize`` on a seeded sample of them with the best local path
(llama-cpp with its JSON-schema grammar when ``llama-cpp-python`` is installed, else transformers
with the prefilled answer opening). Printed per mode: the share of ``ok`` answers, the count of
each status and reason, and examples (the captions shown, the summary).

    python benchmarks/llm_ok_share.py                          # 50 sets, select and first-n modes
    python benchmarks/llm_ok_share.py --groups 10 --modes first-n --backend transformers
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections import Counter
from pathlib import Path

from icsd import pipeline
from icsd.config import SummarizeConfig
from icsd.llm.answers import error_reason
from icsd.records import Selection, from_table
from icsd.stages import summarize
from icsd.store import RunDir, read_parquet

ROOT = Path(__file__).resolve().parents[1]
TEST_COCO = ROOT / "tests" / "data" / "coco" / "captions_val2017_subset.json"


def candidate_sets(root: Path, k: int) -> RunDir:
    cfg = pipeline.load_config(
        None,
        {
            "ingest.corpus": str(TEST_COCO),
            "ingest.format": "coco",
            "embed.model": "sentence-transformers/all-MiniLM-L6-v2",
            "embed.device": "cpu",
            "group.k": k,
        },
    )
    return pipeline.run(cfg, root, stop="group", echo=lambda _: None).run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--k", type=int, default=30, help="candidate-set size (the paper's K)")
    ap.add_argument("--modes", default="select,first-n")
    ap.add_argument("--backend", default="auto", help="auto | llama-cpp | transformers")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    backend = args.backend
    if backend == "auto":
        backend = "llama-cpp" if importlib.util.find_spec("llama_cpp") else "transformers"

    with tempfile.TemporaryDirectory() as tmp:
        run = candidate_sets(Path(tmp) / "run", args.k)
        texts = {r["caption_id"]: r["text"] for r in read_parquet(run.captions).to_pylist()}
        members = {r["group_id"]: r["member_ids"] for r in read_parquet(run.candidates).to_pylist()}
        print(f"{len(members)} candidate sets of K={args.k} from {TEST_COCO.name}; {args.groups} sampled; "
              f"SmolLM2-135M through {backend}")  # fmt: skip
        for mode in args.modes.split(","):
            cfg = SummarizeConfig(backend=backend, mode=mode, sample=args.groups, seed=args.seed,
                                  max_new_tokens=args.max_new_tokens, device="cpu", batch_size=4)  # fmt: skip
            for part in run.selection_parts.glob("*"):
                part.unlink()
            start = time.monotonic()
            summarize.run(cfg, run)
            seconds = time.monotonic() - start
            rows = from_table(read_parquet(run.selections), Selection)
            statuses = Counter(r.status for r in rows)
            reasons = Counter((r.status, error_reason(r.error)) for r in rows if r.status != "ok")
            ok = [r for r in rows if r.status == "ok"]
            print(f"\n## mode {mode} (prompt {cfg.prompt or 'default'}, answers {cfg.answers}): "
                  f"ok {len(ok)}/{len(rows)} = {100 * len(ok) / max(1, len(rows)):.0f}% in {seconds:.0f} s")  # fmt: skip
            print("statuses:", dict(statuses))
            for (status, reason), n in reasons.most_common():
                print(f"  {status}: {reason} x{n}")
                raw = next(r.raw for r in rows if r.status == status and error_reason(r.error) == reason)
                print(f"    e.g. the answer: {raw[-300:]!r}")
            for r in ok[: args.examples]:
                shown = members[r.group_id][: cfg.n] if mode == "first-n" else members[r.group_id]
                chosen = set(r.selected_ids)
                print(f"\n- group {r.group_id}: summary: {r.summary}")
                for i, cid in enumerate(shown, 1):
                    print(f"    {'*' if cid in chosen else ' '} {i}. {texts[cid]}")


if __name__ == "__main__":
    main()
