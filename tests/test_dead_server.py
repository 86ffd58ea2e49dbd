"""A dead or refusing LLM server ends `icsd summarize` with exactly one line on stderr.

Each case runs the real command in a subprocess (what a user sees, warnings printed at exit and
"Task exception was never retrieved" included) against a closed port, a server refusing the key,
a server that does not know the model, and a server that dies after answering a few requests,
with both HTTP clients.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from llm_run import answer, coco_groups, write_run

from icsd.testing.chat_server import ChatServer, Reply

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ICSD_TEST_KEY": "sk-test"}
ENV.pop("OPENAI_API_KEY", None)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    return f"http://127.0.0.1:{port}/v1"


def summarize(run: Path, url: str, client: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["summarize", "--run", str(run), "--backend", "openai", "--model", "echo", "--base-url", url,
            "--client", client, "--api-key-env", "ICSD_TEST_KEY", "--timeout", "5", *extra]  # fmt: skip
    return subprocess.run([sys.executable, "-m", "icsd.cli", *args], env=ENV, capture_output=True, text=True, timeout=120)


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture
def run_dir(tmp_path: Path, coco_captions: Path) -> Path:
    captions, candidates = coco_groups(coco_captions, groups=24)
    return write_run(tmp_path / "run", captions, candidates).root


FAULTS = ["closed port", "refused key", "unknown model", "dies mid-run"]


@pytest.mark.parametrize("client", ["openai", "aiohttp"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_dead_or_refusing_server_is_one_line(run_dir: Path, fault: str, client: str) -> None:
    expected = {
        "closed port": "nothing listens at",
        "refused key": "HTTP 401",
        "unknown model": "HTTP 404",
        "dies mid-run": "stopped answering",
    }[fault]
    if fault == "closed port":
        proc = summarize(run_dir, closed_port_url(), client)
    else:
        served = {"n": 0}
        died = threading.Event()

        def respond(request: dict) -> Reply:
            if fault == "refused key":
                return Reply(status=401, content="Incorrect API key provided")
            if fault == "unknown model":
                return Reply(status=404, content="The model `echo` does not exist")
            served["n"] += 1
            if served["n"] > 3:
                died.set()
                return Reply(drop=True)
            return Reply(content=answer([1, 2, 3, 4, 5], request=request))

        server = ChatServer(respond).start()
        try:
            if fault == "dies mid-run":
                threading.Thread(target=lambda: died.wait(60) and server.stop(), daemon=True).start()
            proc = summarize(run_dir, server.url, client, "--max-retries", "2", "--retry-backoff", "0.2")
        finally:
            server.stop()
    lines = stderr_lines(proc)
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and "never retrieved" not in proc.stderr
    if fault == "dies mid-run":
        assert "ok 3" not in proc.stdout  # no closing line: the run stopped
