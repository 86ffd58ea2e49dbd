"""Security: secrets never reach the run directory or the logs; no eval/exec/pickle on data.

A planted API key is in the environment of a real `icsd summarize` run against a local server that
checks the key arrives and, like some proxies, echoes it back in its error messages. Afterwards
every byte of the run directory (parts, consolidated file, cache, manifest, config, report) and
every line the commands printed are searched for it. An AST scan of src/ finds eval, exec,
pickle, marshal, unsafe YAML and numpy loads, and torch.load without weights_only=True.
"""

from __future__ import annotations

import ast
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from faults import QUICKSTART_CAPTIONS, REPO, cli_env, record_figures, run_cli
from llm_run import coco_groups, write_run

from icsd.config import ReportConfig
from icsd.records import Selection, from_table
from icsd.stages import report
from icsd.store import read_parquet

SECRET = "sk-test-planted-" + secrets.token_hex(20)
ECHO_GROUPS = 2  # the first groups' requests fail with an error that repeats the request's headers


class KeyCheckingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen_keys: list[str] = []
    echo_heads: set[str] = set()
    refuse = False

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        auth = self.headers.get("Authorization", "")
        type(self).seen_keys.append(auth)
        prompt = body["messages"][-1]["content"]
        if type(self).refuse:
            self.reply(401, {"error": {"message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"}})
        elif any(f"1. {head}\n" in prompt for head in type(self).echo_heads):
            self.reply(500, {"error": {"message": f"upstream failed; request headers were {dict(self.headers)}"}})
        else:
            answer = json.dumps({"index": [1, 2, 3, 4, 5], "summary": "Two dogs run on a beach."})
            self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                          "finish_reason": "stop"}], "usage": {}})  # fmt: skip

    def reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass


@pytest.fixture()
def key_server() -> Iterator[tuple[str, type[KeyCheckingHandler]]]:
    handler = type("Handler", (KeyCheckingHandler,), {"seen_keys": [], "echo_heads": set(), "refuse": False})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


def files_holding(root: Path, needle: bytes) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("client", ["openai", "aiohttp"])
def test_a_planted_key_never_reaches_the_run_directory_or_the_logs(
    tmp_path: Path, key_server: tuple[str, type[KeyCheckingHandler]], client: str
) -> None:
    url, handler = key_server
    captions, candidates = coco_groups(QUICKSTART_CAPTIONS, groups=8)
    run = write_run(tmp_path / "run", captions, candidates)
    text = {c.caption_id: c.text for c in captions}
    handler.echo_heads = {text[c.member_ids[0]] for c in candidates[:ECHO_GROUPS]}
    env = cli_env(OPENAI_API_KEY=SECRET)
    args = ["summarize", "--run", str(run.root), "--backend", "openai", "--model", "gpt-test", "--base-url", url,
            "--client", client, "--max-retries", "1", "--timeout", "10"]  # fmt: skip

    done = run_cli(args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert handler.seen_keys and set(handler.seen_keys) == {f"Bearer {SECRET}"}  # the key was really used
    rows = {r.group_id: r for r in from_table(read_parquet(run.selections), Selection)}
    failed = [rows[c.group_id] for c in candidates[:ECHO_GROUPS]]
    assert all(r.status == "failed" and "HTTP 500" in (r.error or "") for r in failed)  # reason kept ...
    report_done = run_cli(["report", "--run", str(run.root)], env=env)
    assert report_done.returncode == 0, report_done.stderr[-2000:]

    handler.refuse = True  # a server that refuses the key and repeats it in its message
    refused = run_cli([*args, "--retry"], env=env)
    assert refused.returncode == 2 and "401" in refused.stderr, refused.stderr[-2000:]

    secret = SECRET.encode()
    middle = SECRET[len("sk-test-planted-") + 4 : -4].encode()  # no fragment of it either
    leaks = files_holding(run.root, secret) + files_holding(run.root, middle)
    assert not leaks, f"the planted key was written to {leaks}"  # ... but the key is not
    for proc in (done, report_done, refused):
        assert SECRET not in proc.stdout + proc.stderr and middle.decode() not in proc.stdout + proc.stderr
    assert (run.root / "manifest.json").is_file() and run.report.is_file() and (run.cache / "llm.sqlite").is_file()
    manifest = json.loads((run.root / "manifest.json").read_text())
    assert manifest["stages"]["summarize"]["config"]["api_key_env"] == "OPENAI_API_KEY"  # the name, not the value
    report.run(ReportConfig(), run)
    assert not files_holding(run.root, secret)
    record_figures(f"security/planted_key/{client}", requests=len(handler.seen_keys),
                   files_checked=sum(1 for p in run.root.rglob("*") if p.is_file()), leaks=0)  # fmt: skip


# ----------------------------------------------------------------------------- code scan

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "cloudpickle", "shelve", "joblib"}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Lines of ``source`` that evaluate code or deserialise with pickle (directly or through
    torch.load without weights_only=True, yaml.load without a safe loader, numpy with pickles)."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in ("eval", "exec", "__import__"):
            found.append(f"{where}: {name}()")
        elif owner in UNSAFE_MODULES:
            found.append(f"{where}: {owner}.{name}()")
        elif owner == "torch" and name == "load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
            loader = keywords.get("Loader")
            if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                found.append(f"{where}: yaml.{name} without a safe loader")
        elif name in ("load", "read_pickle") and owner in ("np", "numpy", "pd", "pandas"):
            flag = keywords.get("allow_pickle")
            if name == "read_pickle" or (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: {owner}.{name} with pickles")
    return found


def test_the_scan_finds_what_it_looks_for() -> None:
    planted = """
import pickle
from marshal import loads
import torch, yaml, numpy as np
eval("1 + 1")
exec("x = 1")
torch.load("ckpt.pt")
torch.load("ckpt.pt", weights_only=False)
yaml.load(open("c.yaml"))
np.load("x.npy", allow_pickle=True)
"""
    safe = """
import torch, yaml, numpy as np, json
torch.load("ckpt.pt", weights_only=True, map_location="cpu")
yaml.safe_load(open("c.yaml"))
yaml.load(open("c.yaml"), Loader=yaml.SafeLoader)
np.load("x.npy", allow_pickle=False)
json.loads("{}")
model.eval()
"""
    assert len(unsafe_calls(planted)) == 8, unsafe_calls(planted)
    assert unsafe_calls(safe) == []


def test_no_eval_exec_or_pickle_in_the_package() -> None:
    files = sorted((REPO / "src" / "icsd").rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert not found, found
    record_figures("security/scan", files=len(files), findings=0)


def test_checkpoints_hold_no_pickles(tmp_path: Path) -> None:
    import torch

    from icsd.backends.captioners import CaptionerSpec, build_caption_model
    from icsd.training import checkpoint as ckpt

    cm = build_caption_model(CaptionerSpec(preset="tiny", max_new_tokens=4))
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-3)
    loss = sum(p.float().pow(2).sum() for p in cm.trainable_parameters()[:3])
    loss.backward()  # type: ignore[union-attr]
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    cm.save(tmp_path)
    ckpt.save_optimizer(tmp_path, opt)
    ckpt.save_scheduler(tmp_path, sched)
    ckpt.save_rng(tmp_path, 0)
    for f in tmp_path.rglob("*"):
        if not f.is_file():
            continue
        head = f.read_bytes()[:4]
        assert f.suffix in (".safetensors", ".json", ".txt", ".model"), f.name
        assert head[:1] != b"\x80" and head[:2] != b"PK", f"{f.name} looks like a pickle or a torch.save zip"
