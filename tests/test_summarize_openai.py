"""The summarize stage against a real chat-completions HTTP server on 127.0.0.1, scripted per group."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llm_run import ScriptedResponder, answer, coco_groups, head_map, write_run

from icsd.config import SummarizeConfig
from icsd.errors import UserError
from icsd.records import Selection, from_table
from icsd.stages import summarize
from icsd.store import read_parquet
from icsd.testing.chat_server import ChatServer, Reply

REPO = Path(__file__).resolve().parents[1]

# group position -> (script of replies per attempt, expected status)
SCENARIOS: dict[str, tuple[list[Reply], str]] = {
    "valid": ([Reply(content=answer([1, 3, 5, 7, 8]))], "ok"),
    "fenced": ([Reply(content="```json\n" + answer([2, 3, 4, 5, 6]) + "\n```")], "ok"),
    "prose": ([Reply(content="Sure! Here is the answer: " + answer([1, 2, 3, 4, 5, 6]) + " Hope this helps.")], "ok"),
    "broken": ([Reply(content='{"index": [1, 2, 3, 4, 5], "summary": "a dog')], "parse_error"),
    "no_json": ([Reply(content="I cannot help with that.")], "parse_error"),
    "out_of_range": ([Reply(content=answer([1, 2, 3, 4, 99]))], "invalid"),
    "duplicate": ([Reply(content=answer([1, 1, 2, 3, 4]))], "invalid"),
    "too_few": ([Reply(content=answer([1, 2]))], "invalid"),
    "rate_limited": ([Reply(status=429, headers={"Retry-After": "1"}), Reply(content=answer([1, 2, 3, 4, 5]))], "ok"),
    "server_errors": ([Reply(status=500), Reply(status=503), Reply(content=answer([1, 2, 3, 4, 5]))], "ok"),
    "always_500": ([Reply(status=500)], "failed"),
    "dropped": ([Reply(drop=True), Reply(content=answer([1, 2, 3, 4, 5]))], "ok"),
    "slow": ([Reply(delay=2.5, content=answer([1, 2, 3, 4, 5])), Reply(content=answer([1, 2, 3, 4, 5]))], "ok"),
}


@pytest.fixture()
def scripted_run(tmp_path, coco_captions, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=len(SCENARIOS) + 3)
    run = write_run(tmp_path / "run", captions, candidates)
    names = list(SCENARIOS) + ["extra1", "extra2", "extra3"]
    gid_of = {name: c.group_id for name, c in zip(names, candidates, strict=True)}
    scripts = {gid_of[name]: script for name, (script, _) in SCENARIOS.items()}
    responder = ScriptedResponder(head_map(captions, candidates), scripts, Reply(content=answer([1, 2, 3, 4, 5])))
    with ChatServer(responder) as server:
        yield run, server, responder, gid_of, {c.group_id: c.member_ids for c in candidates}


def config(server: ChatServer, **kw) -> SummarizeConfig:
    base = {
        "backend": "openai",
        "model": "echo",
        "base_url": [server.url],
        "concurrency": 4,
        "timeout": 1.0,
        "max_retries": 2,
        "retry_backoff": 0.05,
        "part_size": 4,
    }
    return SummarizeConfig(**{**base, **kw})


def selections(run) -> list[Selection]:
    return from_table(read_parquet(run.selections), Selection)


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_every_group_gets_exactly_one_record_with_the_right_status(scripted_run, client):
    run, server, responder, gid_of, members = scripted_run
    result = summarize.run(config(server, client=client), run)

    rows = selections(run)
    assert sorted(r.group_id for r in rows) == sorted(gid_of.values())  # nothing lost or duplicated
    by_gid = {r.group_id: r for r in rows}
    for name, (_, status) in SCENARIOS.items():
        assert by_gid[gid_of[name]].status == status, (name, by_gid[gid_of[name]])
    assert result.counts["groups"] == len(gid_of)
    assert result.counts["failed"] == 1 and result.counts["parse_error"] == 2 and result.counts["invalid"] == 3

    valid = by_gid[gid_of["valid"]]
    m = members[gid_of["valid"]]
    assert valid.selected_ids == [m[0], m[2], m[4], m[6], m[7]]
    texts = {r["caption_id"]: r["text"] for r in read_parquet(run.captions).to_pylist()}
    assert valid.summary == texts[m[0]]
    assert valid.model == "echo" and len(valid.prompt_hash) == 16 and valid.raw.startswith("{")
    assert by_gid[gid_of["fenced"]].selected_ids == members[gid_of["fenced"]][1:6]
    assert "99" in by_gid[gid_of["out_of_range"]].error and "1..8" in by_gid[gid_of["out_of_range"]].error
    assert "more than once" in by_gid[gid_of["duplicate"]].error
    assert "5..8" in by_gid[gid_of["too_few"]].error
    broken = by_gid[gid_of["broken"]]
    assert broken.raw.startswith('{"index"') and broken.selected_ids == [] and broken.summary is None
    failed = by_gid[gid_of["always_500"]]
    assert failed.raw == "" and "gave up after 3 attempts" in failed.error and "500" in failed.error

    # retries: each as scripted, none more
    assert responder.requests_for(gid_of["valid"]) == 1
    assert responder.requests_for(gid_of["rate_limited"]) == 2
    first, second = responder.times_for(gid_of["rate_limited"])
    assert second - first >= 0.95  # Retry-After honoured
    assert responder.requests_for(gid_of["server_errors"]) == 3
    assert responder.requests_for(gid_of["always_500"]) == 3  # max_retries=2
    assert responder.requests_for(gid_of["dropped"]) == 2
    assert responder.requests_for(gid_of["slow"]) == 2

    # every record, part by part, holds each group once
    parts = summarize.done_parts(run.selection_parts)
    in_parts = [r.group_id for p in parts for r in from_table(read_parquet(p), Selection)]
    assert sorted(in_parts) == sorted(gid_of.values())
    manifest = run.stage_entry("summarize")
    assert manifest["prompt_hash"] == valid.prompt_hash and manifest["counts"]["ok"] == 10


def test_rerun_skips_done_groups_and_retry_redoes_only_the_others(scripted_run):
    run, server, responder, gid_of, _ = scripted_run
    summarize.run(config(server), run)
    sent = len(responder.log)

    again = summarize.run(config(server), run)
    assert len(responder.log) == sent  # nothing asked again
    assert again.counts["kept"] == len(gid_of) and again.counts["answered"] == 0

    responder.scripts.clear()  # the server now answers every group validly
    retried = summarize.run(config(server, retry=True), run)
    not_ok = {gid_of[n] for n, (_, status) in SCENARIOS.items() if status != "ok"}
    asked = {g for g, _, _ in responder.log[sent:]}
    assert asked == not_ok  # cache bypassed for retried groups, ok groups untouched
    assert retried.counts["ok"] == len(gid_of)
    rows = selections(run)
    assert len(rows) == len(gid_of) and {r.status for r in rows} == {"ok"}


def test_identical_requests_are_answered_from_the_cache(scripted_run):
    run, server, responder, gid_of, _ = scripted_run
    first = summarize.run(config(server), run)
    sent = len(responder.log)
    for p in run.selection_parts.glob("part-*"):
        p.unlink()
    second = summarize.run(config(server), run)
    # only the group whose transport failed (never cached) reached the server again
    assert {g for g, _, _ in responder.log[sent:]} == {gid_of["always_500"]}
    assert second.counts["cached"] == len(gid_of) - 1  # all but the group whose transport failed
    assert second.counts["requests"] == 1
    assert {k: first.counts[k] for k in ("ok", "invalid", "parse_error")} == {
        k: second.counts[k] for k in ("ok", "invalid", "parse_error")
    }
    assert (run.cache / "llm.sqlite").is_file()


def test_a_new_prompt_redoes_every_group(scripted_run, tmp_path):
    run, server, responder, gid_of, _ = scripted_run
    summarize.run(config(server, limit=3), run)
    sent = len(responder.log)
    prompt = tmp_path / "mine.txt"
    prompt.write_text("Pick {{ min_select }}-{{ max_select }} captions, answer JSON with index and summary.\n"
                      "{% for t in candidates %}{{ loop.index }}. {{ t }}\n{% endfor %}")
    result = summarize.run(config(server, limit=3, prompt=str(prompt)), run)
    assert len(responder.log) == sent + 3
    hashes = {r.prompt_hash for r in selections(run)}
    assert len(hashes) == 1 and result.counts["groups"] == 3
    summarize.run(config(server, limit=2), run)  # back to the bundled prompt, for 2 groups only
    assert len({r.prompt_hash for r in selections(run)}) == 2
    result = summarize.run(config(server, limit=2), run)
    assert any("1 groups outside this selection" in n for n in result.notes)


def test_limit_and_sample_pick_groups_reproducibly(scripted_run):
    run, server, _, gid_of, _ = scripted_run
    summarize.run(config(server, limit=3), run)
    order = list(gid_of.values())
    assert [r.group_id for r in selections(run)] == order[:3]
    chosen = summarize.choose_groups(len(order), limit=None, sample=4, seed=7)
    assert chosen == summarize.choose_groups(len(order), limit=None, sample=4, seed=7)
    assert chosen != summarize.choose_groups(len(order), limit=None, sample=4, seed=8)
    assert len(chosen) == 4 and chosen == sorted(chosen)


def test_first_n_mode_condenses_the_first_n_captions(tmp_path, coco_captions, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=3)
    run = write_run(tmp_path / "run", captions, candidates)
    seen: list[int] = []

    def respond(request):
        from icsd.testing.chat_server import first_caption, numbered_lines

        seen.append(numbered_lines(request))
        return Reply(content=json.dumps({"summary": first_caption(request)}))

    with ChatServer(respond) as server:
        summarize.run(config(server, mode="first-n", n=5), run)
    rows = selections(run)
    assert seen == [5, 5, 5]
    members = {c.group_id: c.member_ids for c in candidates}
    assert all(r.status == "ok" and r.selected_ids == members[r.group_id][:5] for r in rows)


def test_response_format_falls_back_when_the_server_rejects_it(tmp_path, coco_captions, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=4)
    run = write_run(tmp_path / "run", captions, candidates)
    formats: list[str | None] = []

    def respond(request):
        fmt = (request.get("response_format") or {}).get("type")
        formats.append(fmt)
        if fmt is not None:
            return Reply(status=400, content=f"response_format {fmt} is not supported by this server")
        return Reply(content=answer([1, 2, 3, 4, 5], request=request))

    with ChatServer(respond) as server:
        result = summarize.run(config(server, concurrency=1), run)
    assert result.counts["ok"] == 4
    # json_schema, json_object with the schema beside it, plain json_object: each refused once
    assert formats == ["json_schema", "json_object", "json_object", None, None, None, None]


def test_round_robin_over_several_servers(tmp_path, coco_captions, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=6)
    run = write_run(tmp_path / "run", captions, candidates)

    def respond(request):
        return Reply(content=answer([1, 2, 3, 4, 5], request=request))

    with ChatServer(respond) as a, ChatServer(respond) as b:
        result = summarize.run(SummarizeConfig(backend="openai", model="echo", base_url=f"{a.url},{b.url}"), run)
    assert result.counts["ok"] == 6 and a.count == 3 and b.count == 3


def test_a_refused_key_stops_the_run_with_one_line(tmp_path, coco_captions, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-wrong")
    captions, candidates = coco_groups(coco_captions, groups=3)
    run = write_run(tmp_path / "run", captions, candidates)
    auth: list[str] = []

    def respond(request):
        return Reply(status=401, content="Incorrect API key provided")

    with ChatServer(respond) as server:
        with pytest.raises(UserError, match="401.*MY_KEY"):
            summarize.run(config(server, api_key_env="MY_KEY"), run)
        assert server.count >= 1
    for f in run.root.rglob("*"):
        if f.is_file():
            assert b"sk-wrong" not in f.read_bytes(), f
    del auth


def test_killed_run_resumes_without_redoing_finished_groups(tmp_path, coco_captions, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=12)
    run = write_run(tmp_path / "run", captions, candidates)
    responder = ScriptedResponder(head_map(captions, candidates), {}, Reply(delay=0.25, content=answer([1, 2, 3, 4, 5])))
    with ChatServer(responder) as server:
        cmd = [sys.executable, "-m", "icsd.cli", "summarize", "--run", str(run.root), "--backend", "openai",
               "--model", "echo", "--base-url", server.url, "--concurrency", "1", "--part-size", "2"]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(summarize.done_parts(run.selection_parts)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done_before = {r.group_id for p in summarize.done_parts(run.selection_parts)
                       for r in from_table(read_parquet(p), Selection)}
        assert 4 <= len(done_before) < 12
        sent_before = len(responder.log)

        responder.scripts.clear()
        result = summarize.run(config(server), run)
    asked_after = [g for g, _, _ in responder.log[sent_before:]]
    assert not set(asked_after) & done_before  # finished groups were not asked again
    assert len(asked_after) == len(set(asked_after)) == 12 - len(done_before)
    rows = selections(run)
    assert sorted(r.group_id for r in rows) == sorted(c.group_id for c in candidates)
    assert result.counts["kept"] == len(done_before)


def test_an_error_mid_run_keeps_the_records_already_answered(scripted_run, monkeypatch):
    run, server, responder, gid_of, _ = scripted_run
    calls = {"n": 0}
    original = summarize.Job.record

    def failing(self, item, answer):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("disk full")
        return original(self, item, answer)

    monkeypatch.setattr(summarize.Job, "record", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        summarize.run(config(server, concurrency=1), run)
    kept = summarize.read_records(run.selection_parts)
    assert len(kept) == 6
    monkeypatch.setattr(summarize.Job, "record", original)
    sent = len(responder.log)
    summarize.run(config(server), run)
    asked = {g for g, _, _ in responder.log[sent:]}
    assert not asked & set(kept)
    assert len(selections(run)) == len(gid_of)


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_an_unreachable_server_stops_the_run_at_once_with_one_line(tmp_path, coco_captions, monkeypatch, client):
    import socket

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=3)
    run = write_run(tmp_path / "run", captions, candidates)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    cfg = SummarizeConfig(backend="openai", model="echo", base_url=[url], client=client)  # default retries
    start = time.monotonic()
    with pytest.raises(UserError, match=f"nothing listens at {url}"):
        summarize.run(cfg, run)
    assert time.monotonic() - start < 15  # not after six backoffs (30 s and more)


def test_missing_candidates_is_one_line_error(tmp_path):
    from icsd.store import RunDir

    with pytest.raises(UserError, match="icsd group"):
        summarize.run(SummarizeConfig(backend="openai", base_url=["http://127.0.0.1:9/v1"]), RunDir.at(tmp_path / "r"))


def test_cli_summarize_runs_and_prints_the_closing_line(tmp_path, coco_captions, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=3)
    run = write_run(tmp_path / "run", captions, candidates)
    from typer.testing import CliRunner

    from icsd.cli import app

    with ChatServer(lambda r: Reply(content=answer([1, 2, 3, 4, 5], request=r))) as server:
        out = CliRunner().invoke(app, ["summarize", "--run", str(run.root), "--backend", "openai", "--model", "echo",
                                       "--base-url", server.url, "--limit", "2", "--client", "aiohttp"])
    assert out.exit_code == 0, out.output
    assert "summarize: groups 2, ok 2" in out.output and "selections.parquet" in out.output
    help_text = CliRunner().invoke(app, ["summarize", "--help"]).output
    assert "--base-url" in help_text and "first-n" in help_text and "Examples" in help_text


def test_client_benchmark_runs_on_a_small_scale(capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("llm_client_bench", REPO / "benchmarks" / "llm_client.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "llm_client_bench", bench)
    spec.loader.exec_module(bench)
    rows = bench.main(["--groups", "24", "--k", "8", "--delay", "0.01", "--batch", "8", "--pause", "0.05",
                       "--concurrency", "16", "--captions", str(bench.TEST_COCO)])
    assert [r.lost for r in rows] == [0, 0, 0]
    out = capsys.readouterr().out
    assert "speed-up" in out and "72 requests sent, the server saw 72" in out
