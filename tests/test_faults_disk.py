"""Disk full while writing: a clear one-line error, finished work intact, and the same command
finishes the run once space is freed.

The run directory lies on a small tmpfs filled up to a chosen number of free bytes (real ENOSPC).
Where mounting is not permitted (or ICSD_TEST_NO_MOUNT=1), the `icsd` command runs in a subprocess whose file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored) makes the first too-large write fail with EFBIG instead.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faults import QUICKSTART_CAPTIONS, cli_env, digest, icsd_cmd, leftovers, record_figures, snapshot
from llm_run import coco_groups, write_run

from icsd.config import EmbedConfig, IngestConfig, RenderConfig, SummarizeConfig
from icsd.records import Selection, from_table, to_table
from icsd.stages import embed, ingest, render, summarize
from icsd.store import RunDir, is_done, read_embeddings, read_parquet, write_parquet
from icsd.testing.chat_server import ChatServer, Reply, first_caption

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAGE = 4096




def pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


@dataclass
class SmallDisk:
    """A folder whose writes fail part-way: a tmpfs with little free space, or (where mounting is
    not permitted) a subprocess file-size limit."""

    root: Path
    mounted: bool
    max_file: int | None = None

    def leave_free(self, budget: int) -> None:
        """tmpfs: fill the disk until ``budget`` bytes are free."""
        if not self.mounted:
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        assert free > budget, (free, budget)
        (self.root / "ballast").write_bytes(b"\0" * (free - budget))

    def free_space(self) -> None:
        (self.root / "ballast").unlink(missing_ok=True)
        self.max_file = None

    def run_icsd(self, args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
        """Run `icsd ARGS` on the small disk: (exit code, stderr)."""
        if self.mounted:
            from icsd.cli import main

            capsys.readouterr()
            old = sys.argv
            sys.argv = ["icsd", *args]
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
            finally:
                sys.argv = old
            return code, capsys.readouterr().err
        limit = self.max_file

        def limit_file_size() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        proc = subprocess.run(icsd_cmd(*args), env=cli_env(OPENAI_API_KEY=""), capture_output=True, text=True,
                              preexec_fn=limit_file_size, timeout=300)  # fmt: skip
        return proc.returncode, proc.stderr


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    root = tmp_path / "disk"
    root.mkdir()
    mounted = not os.environ.get("ICSD_TEST_NO_MOUNT") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(root)], capture_output=True
    ).returncode == 0
    try:
        yield SmallDisk(root, mounted)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], check=False)


def assert_disk_full_line(code: int, stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = lines[-1]
    assert last.startswith("error: cannot write to disk (") and "run the same command again" in last, last
    reasons = ("No space left on device", "File too large", "database or disk is full", "disk I/O error")
    assert any(r in last for r in reasons), last
    return last


# ----------------------------------------------------------------------------- embed (parquet parts)

PARTS = 6
PER_PART = 100
FAIL_AT = 3  # the part that does not fit


def growing_ids_corpus(path: Path) -> None:
    """Captions whose ids grow longer part by part (random hex), so later parts are larger files."""
    texts = [a["caption"] for a in json.loads(QUICKSTART_CAPTIONS.read_text())["annotations"]]
    rows = [{"id": secrets.token_hex(10 + 60 * (i // PER_PART)), "caption": texts[i]} for i in range(PARTS * PER_PART)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_embed_on_a_full_disk(
    tmp_path: Path, small_disk: SmallDisk, tiny_sentence_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    growing_ids_corpus(corpus)
    reference = RunDir.at(tmp_path / "reference")
    ingest.run(IngestConfig(corpus=str(corpus), id_field="id"), reference)
    run = RunDir.at(small_disk.root / "run")
    shutil.copy(reference.captions, run.captions)
    cfg = EmbedConfig(model=str(tiny_sentence_model), part_size=PER_PART, batch_size=50, device="cpu")
    embed.run(cfg, reference)
    want = snapshot(reference.embeddings, "part-*.parquet")
    sizes = [(reference.embeddings / n).stat().st_size for n in sorted(want)]
    assert sizes == sorted(sizes) and sizes[FAIL_AT] > sizes[FAIL_AT - 1] * 1.2

    run.embeddings.mkdir()
    small_disk.leave_free(sum(pages(s) + PAGE for s in sizes[:FAIL_AT]) + pages(sizes[FAIL_AT]) - PAGE)
    small_disk.max_file = (sizes[FAIL_AT - 1] + sizes[FAIL_AT]) // 2
    args = ["embed", "--run", str(run.root), "--model", cfg.model, "--part-size", str(PER_PART),
            "--batch-size", "50", "--device", "cpu"]  # fmt: skip
    code, stderr = small_disk.run_icsd(args, capsys)
    line = assert_disk_full_line(code, stderr)

    done = sorted(p.name for p in run.embeddings.glob("part-*.parquet") if is_done(p))
    assert done == sorted(want)[:FAIL_AT]  # what finished before the disk filled up is complete
    assert {n: digest(run.embeddings / n) for n in done} == {n: want[n] for n in done}
    assert not leftovers(run.root) and len(list(run.embeddings.glob("part-*.parquet"))) == FAIL_AT

    small_disk.free_space()
    result = embed.run(cfg, run)
    assert result.counts["parts_skipped"] == FAIL_AT and result.counts["parts_computed"] == PARTS - FAIL_AT
    assert snapshot(run.embeddings, "part-*.parquet") == want
    ids, _ = read_embeddings(run.embeddings)
    assert len(ids) == len(set(ids)) == PARTS * PER_PART
    record_figures("disk/embed", mode="tmpfs" if small_disk.mounted else "rlimit", error=line,
                   parts_kept=FAIL_AT, records_checked=len(ids), lost=0)  # fmt: skip


# ----------------------------------------------------------------------------- summarize (parts + cache)

GROUPS = 40


def long_answer(request: dict[str, Any]) -> Reply:
    words = " ".join(["word"] * 25)
    summary = f"{first_caption(request)} {secrets.token_hex(100)} {words}"
    return Reply(content=json.dumps({"index": [1, 2, 3, 4, 5], "summary": summary}))


def test_summarize_on_a_full_disk(
    tmp_path: Path, small_disk: SmallDisk, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(QUICKSTART_CAPTIONS, groups=GROUPS)
    run = write_run(small_disk.root / "run", captions, candidates)
    with ChatServer(long_answer) as server:
        args = ["summarize", "--run", str(run.root), "--backend", "openai", "--model", "echo", "--base-url",
                server.url, "--part-size", "5", "--concurrency", "1", "--client", "aiohttp"]  # fmt: skip
        small_disk.leave_free(160 * 1024)
        small_disk.max_file = 64 * 1024  # above SQLite's 32 KiB WAL index
        code, stderr = small_disk.run_icsd(args, capsys)
        line = assert_disk_full_line(code, stderr)

        kept = summarize.read_records(run.selection_parts)  # parts finished before the disk filled up
        assert 0 < len(kept) < GROUPS
        assert all(r.status == "ok" for r in kept.values())
        assert not leftovers(run.root)

        small_disk.free_space()
        sent = server.count
        cfg = SummarizeConfig(backend="openai", model="echo", base_url=[server.url], part_size=5, concurrency=1)
        result = summarize.run(cfg, run)
        assert result.counts["kept"] == len(kept) and result.counts["ok"] == GROUPS
        assert server.count - sent <= GROUPS - len(kept)  # finished groups are not asked again
    rows = from_table(read_parquet(run.selections), Selection)
    assert [r.group_id for r in rows] == [c.group_id for c in candidates]
    assert all(rows[i] == kept[r.group_id] for i, r in enumerate(rows) if r.group_id in kept)
    record_figures("disk/summarize", mode="tmpfs" if small_disk.mounted else "rlimit", error=line,
                   groups_kept=len(kept), records_checked=len(rows), lost=0)  # fmt: skip


# ----------------------------------------------------------------------------- render (tar shards)


def test_render_on_a_full_disk(tmp_path: Path, small_disk: SmallDisk, capsys: pytest.CaptureFixture[str]) -> None:
    from icsd.backends.t2i import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "tiny-sd")
    reference = RunDir.at(tmp_path / "reference")
    rows = [Selection(f"g{i}", "ok", [f"c{i}"], f"a blue boat number {i}") for i in range(6)]
    write_parquet(to_table(rows, Selection), reference.selections)
    cfg = RenderConfig(model=str(model), steps=1, size=64, shard_size=2, batch_size=2, devices="cpu",
                       safety_checker=False)  # fmt: skip
    render.run(cfg, reference)
    want = snapshot(reference.images, "shard-*.tar")
    sizes = [(reference.images / n).stat().st_size for n in sorted(want)]

    run = RunDir.at(small_disk.root / "run")
    shutil.copy(reference.selections, run.selections)
    run.images.mkdir()
    small_disk.leave_free(pages(sizes[0]) + PAGE + pages(sizes[1]) // 2)
    small_disk.max_file = min(sizes) // 2
    args = ["render", "--run", str(run.root), "--model", cfg.model, "--steps", "1", "--size", "64",
            "--shard-size", "2", "--batch-size", "2", "--devices", "cpu", "--no-safety-checker"]  # fmt: skip
    code, stderr = small_disk.run_icsd(args, capsys)
    line = assert_disk_full_line(code, stderr)
    done = [p.name for p in sorted(run.images.glob("shard-*.tar")) if is_done(p)]
    assert {n: digest(run.images / n) for n in done} == {n: want[n] for n in done}
    assert not leftovers(run.root) and len(list(run.images.glob("shard-*.tar"))) == len(done)

    small_disk.free_space()
    result = render.run(cfg, run)
    assert result.counts["skipped_shards"] == len(done) and result.counts["images"] == 6
    assert snapshot(run.images, "shard-*.tar") == want
    record_figures("disk/render", mode="tmpfs" if small_disk.mounted else "rlimit", error=line,
                   shards_kept=len(done), records_checked=6, lost=0)  # fmt: skip
