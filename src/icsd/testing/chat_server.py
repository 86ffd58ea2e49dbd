"""A small OpenAI-compatible chat-completions server with scripted answers.

For tests, client benchmarks and dry runs of the summarize stage without a model: it speaks
HTTP/1.1 with keep-alive on asyncio streams, answers ``POST .../chat/completions`` through a
``responder(request_json) -> Reply`` callable, lists one model at ``GET .../models`` and reports
how many requests it saw at ``GET /stats``. A reply can be an answer, an error status with
headers (``Retry-After``), a delay, or a dropped connection.

    python -m icsd.chat_server --port 8000 --delay 0.2
    icsd summarize --run RUN --backend openai --base-url http://127.0.0.1:8000/v1 --model echo
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any


@dataclass
class Reply:
    status: int = 200
    content: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    body: dict[str, Any] | None = None


Responder = Callable[[dict[str, Any]], Reply]

_NUMBERED = re.compile(r"^\s*(\d+)\.\s", re.MULTILINE)


def user_text(request: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content", "")) for m in request.get("messages", []) if m.get("role") == "user")


def numbered_lines(request: dict[str, Any]) -> int:
    """How many items the last numbered list (``1. ...``, ``2. ...``) of the user message holds."""
    count = 0
    for number in (int(n) for n in _NUMBERED.findall(user_text(request))):
        count = 1 if number == 1 else (count + 1 if number == count + 1 else count)
    return count


_FIRST_LINE = re.compile(r"^\s*1\.\s+(.+)$", re.MULTILINE)
_FIRST_OFFICIAL = re.compile(r"<1> (.+?) (?:<2> |$)")


def first_caption(request: dict[str, Any]) -> str:
    """The text of caption 1 of a prompt: item 1 of its last numbered list (``1. text``), or the
    official ``<1> text <2>``."""
    text = user_text(request)
    lines = _FIRST_LINE.findall(text)
    if lines:
        return str(lines[-1]).strip()
    found = _FIRST_OFFICIAL.search(text)
    return found.group(1).strip() if found else ""


def echo_responder(delay: float = 0.0, pick: int = 5) -> Responder:
    """Answers every selection prompt validly: the first ``pick`` captions, summarised as the first
    of them."""

    def respond(request: dict[str, Any]) -> Reply:
        k = numbered_lines(request) or user_text(request).count("> ")
        answer: dict[str, Any] = {"summary": first_caption(request) or "A scene described by several captions."}
        if "index" in user_text(request):
            answer["index"] = list(range(1, min(pick, k) + 1))
        return Reply(content=json.dumps(answer), delay=delay)

    return respond


def completion_body(request: dict[str, Any], content: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "echo"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": len(user_text(request).split()),
            "completion_tokens": len(content.split()),
            "total_tokens": len(user_text(request).split()) + len(content.split()),
        },
    }


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    return {"error": {"message": message or phrase, "type": "server_error" if status >= 500 else "invalid_request_error", "code": status}}


class ChatServer:
    """Serve ``responder`` on ``host:port`` (0 = any free port) from a background thread."""

    def __init__(self, responder: Responder, host: str = "127.0.0.1", port: int = 0, model: str = "echo") -> None:
        self.responder = responder
        self.host = host
        self.port = port
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.keep_requests = True

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> ChatServer:
        self._thread = threading.Thread(target=self._serve_forever, name="chat-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("chat server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve_forever(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port, backlog=4096))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(self._server.wait_closed())
            loop.close()

    async def serve(self) -> None:
        """Serve in the running event loop until cancelled (the command-line entry point)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    # HTTP ------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                reply = self._route(method, path, body)
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                if reply.drop:
                    break
                writer.write(self._encode(reply))
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # server shutting down: end this connection quietly
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _route(self, method: str, path: str, body: bytes) -> Reply:
        path = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and path == "/stats":
            return Reply(body={"requests": self.count})
        if method == "GET" and path.endswith("/models"):
            return Reply(body={"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "icsd"}]})
        if method != "POST" or not path.endswith("/chat/completions"):
            return Reply(status=404, body=error_body(404, f"no route {method} {path}"))
        try:
            request = json.loads(body)
        except json.JSONDecodeError:
            return Reply(status=400, body=error_body(400, "body is not JSON"))
        self.count += 1
        if self.keep_requests:
            self.requests.append(request)
        reply = self.responder(request)
        if reply.status == 200 and reply.body is None:
            reply.body = completion_body(request, reply.content or "")
        elif reply.body is None:
            reply.body = error_body(reply.status, reply.content)
        return reply

    @staticmethod
    def _encode(reply: Reply) -> bytes:
        payload = json.dumps(reply.body).encode("utf-8")
        phrase = HTTPStatus(reply.status).phrase if reply.status in HTTPStatus._value2member_map_ else "Status"
        head = [f"HTTP/1.1 {reply.status} {phrase}", "Content-Type: application/json", f"Content-Length: {len(payload)}"]
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icsd.chat_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--model", default="echo")
    args = parser.parse_args(argv)
    server = ChatServer(echo_responder(args.delay), host=args.host, port=args.port, model=args.model)
    server.keep_requests = False

    async def announce() -> None:
        task = asyncio.create_task(server.serve())
        await asyncio.get_running_loop().run_in_executor(None, server._ready.wait)
        print(f"listening on {server.url}", flush=True)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(announce())


if __name__ == "__main__":
    main()
