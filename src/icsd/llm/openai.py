"""Any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, Ollama, TGI, LM Studio,
OpenAI itself), through the official ``openai`` async client or, with ``client="aiohttp"``, a lean
aiohttp session sending the same requests.

N requests in flight from one event loop, round-robin over base URLs, retries with exponential
backoff and jitter (``Retry-After`` honoured) for what may pass on a second try (408, 409, 429,
connection faults, 5xx that look transient) and none for what cannot (a request the server
rejects: the same error body twice, a 4xx). JSON output is asked for through ``response_format``:
with ``auto`` the first request to each server probes json_schema, then json_object, then plain
text, stepping down whenever an error answer names the format or the schema, and the server's
answer is remembered for the rest of the run. ``docs/llm-servers.md`` lists what each server accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import importlib.util
import itertools
import json
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Literal, Protocol

from pydantic import BeforeValidator, Field

from ..errors import UserError
from .base import (
    RESPONSE_FORMATS,
    ChatAnswer,
    ChatBackend,
    ChatRequest,
    FatalBackendError,
    GenerationParams,
    K,
    LLMOptions,
)

HANDOFF_SECONDS = 0.02
OPENAI_URL = "https://api.openai.com/v1"
RESPONSE_FORMAT_CHOICES: tuple[str, ...] = ("auto", *RESPONSE_FORMATS)
# What is tried, in order, per --response-format. "json_object+schema" is json_object with the
# answer's schema beside it (llama-cpp-python constrains its JSON grammar to it; servers that
# ignore unknown keys get plain JSON mode; a server that refuses the key gets plain json_object).
LADDERS: dict[str, tuple[str, ...]] = {
    "auto": ("json_schema", "json_object+schema", "json_object", "text"),
    "json_schema": ("json_schema",),
    "json_object": ("json_object+schema", "json_object"),
    "text": ("text",),
}
STOP_AFTER_SAME_FAILURES = 8


# ----------------------------------------------------------------------------- openai-compatible


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, doubling per attempt."""
    ceiling = min(cap, base * (2**attempt))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def names_response_format(message: str) -> bool:
    """Whether an error message is about the ``response_format`` (or the JSON schema in it)."""
    text = message.lower()
    return any(w in text for w in ("response_format", "response format", "json_schema", "json_object", "schema"))


# Words of error bodies that say "busy, try later" rather than "this request is wrong".
_TRANSIENT_WORDS = (
    "overload", "busy", "timeout", "timed out", "try again", "unavailable", "capacity", "rate limit",
    "too many", "temporarily", "out of memory", "loading", "queue", "connection", "server error",
    "internal error",
)  # fmt: skip


def looks_transient(status: int, message: str) -> bool:
    """Whether an error answer may pass on a second try: 408/409/429 always; a 5xx whose body is
    empty, only its status phrase, or says the server is busy, overloaded or loading, and is no
    request validation error (llama-cpp-python reports those as 500)."""
    if status in (408, 409, 429):
        return True
    if status < 500:
        return False
    text = message.strip().lower()
    if "validation error" in text:
        return False
    phrase = HTTPStatus(status).phrase.lower() if status in HTTPStatus._value2member_map_ else ""
    return not text or text == phrase or any(w in text for w in _TRANSIENT_WORDS)


def error_signature(error: str) -> str:
    """An error with its numbers masked: two requests rejected "the same way" (say, prompts too
    long by different amounts) share it."""
    return re.sub(r"\d+", "#", error)[:300]


def short(message: str, limit: int = 160) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def redact(text: str | None, secret: str) -> str | None:
    """``text`` with the API key masked: servers and proxies may repeat it in error messages, and
    those are recorded, cached and printed."""
    if text is None or len(secret) < 8:
        return text
    return text.replace(secret, "[redacted]")


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:500]


def resolve_api_key(api_key_env: str, base_urls: Sequence[str]) -> str:
    """The API key from the named environment variable. Local servers accept any key, so a
    placeholder is used when base URLs are given and the variable is unset."""
    key = os.environ.get(api_key_env)
    if key:
        return key
    if base_urls:
        return "EMPTY"
    raise UserError(
        f"no API key: set the environment variable {api_key_env} (or pass --base-url for a local server)"
    )


@dataclass
class HttpResult:
    """One HTTP exchange with a chat-completions server, whatever client made it."""

    status: int
    headers: Any = None
    message: str = ""
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TransportError(Exception):
    """No HTTP answer: connection refused or dropped, timeout, unreadable body. ``reached`` says
    whether a server was there at all (a dropped connection or a bad body proves one was);
    ``refused`` whether the connection was refused (nothing listens at that address)."""

    def __init__(self, message: str, reached: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.reached = reached
        self.refused = refused


def connection_refused(exc: BaseException) -> bool:
    """Whether a client error comes from a refused connection (somewhere in its chain)."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, ConnectionRefusedError) or getattr(node, "errno", None) == errno.ECONNREFUSED:
            return True
        os_error = getattr(node, "os_error", None)  # aiohttp keeps it there
        if isinstance(os_error, ConnectionRefusedError):
            return True
        if "connection refused" in str(node).lower():
            return True
        node = node.__cause__ or node.__context__
    return False


def transport_error(exc: BaseException, message: str) -> TransportError:
    return TransportError(message, reached=server_reached(exc), refused=connection_refused(exc))


_UNREACHED = ("Connect", "DNS", "gaierror", "Timeout")  # refused, no such host, no answer in time


def server_reached(exc: BaseException) -> bool:
    """Whether a client error shows that a server accepted the connection (dropped it, or sent
    something unreadable), as opposed to a refused connection, a bad host name or a timeout.
    The innermost error decides: HTTP clients wrap a dropped connection in their own timeout or
    connect errors."""
    seen = {id(exc)}
    root = exc
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        root = nxt
    if isinstance(root, ConnectionRefusedError | TimeoutError):
        return False
    return not any(word in type(root).__name__ for word in _UNREACHED)


def _content_of(data: Any) -> tuple[str | None, int, int, str]:
    """(content, prompt tokens, completion tokens, problem) from a chat.completion JSON body."""
    try:
        choice = data["choices"][0]
        content = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, 0, 0, "the server answered without choices"
    usage = data.get("usage") or {}
    return (
        content if content is not None else "",
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        "",
    )


class OfficialTransport:
    """Requests through ``openai.AsyncOpenAI`` (one client per base URL; its own retries off).

    Uses the openai package's aiohttp transport when that is installed, else its default one.
    """

    def __init__(self, base_urls: Sequence[str], api_key: str, connections: int, timeout: float) -> None:
        from openai import AsyncOpenAI

        urls: list[str | None] = list(base_urls) or [None]
        per_url = max(1, -(-connections // len(urls)))
        self.clients = [
            AsyncOpenAI(
                api_key=api_key,
                base_url=url,
                max_retries=0,
                timeout=timeout,
                http_client=official_http_client(per_url, timeout),
            )
            for url in urls
        ]

    async def post(self, turn: int, body: dict[str, Any], timeout: float) -> HttpResult:
        import openai

        client = self.clients[turn % len(self.clients)]
        try:
            response = await client.chat.completions.create(**body, timeout=timeout)
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            message = body.get("message") if isinstance(body.get("message"), str) else None
            if message is None:  # no OpenAI-style error object: the raw body, as the aiohttp client reports it
                message = exc.response.text[:300] if exc.body is None else str(exc.message)
            return HttpResult(status=exc.status_code, headers=exc.response.headers, message=message)
        except openai.APIError as exc:  # connection, timeout, unreadable response
            raise transport_error(exc, _error_text(exc)) from None
        choices = getattr(response, "choices", None) or []
        if not choices:
            return HttpResult(status=200, message="the server answered without choices")
        usage = getattr(response, "usage", None)
        return HttpResult(
            status=200,
            text=choices[0].message.content or "",
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        )

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()


def official_http_client(connections: int, timeout: float) -> Any:
    """The openai package's async HTTP client keeping ``connections`` connections alive (its
    default keeps 100, so higher concurrency would reconnect on every request)."""
    import importlib

    import openai

    base = openai.DefaultAsyncHttpxClient
    # The openai package has moved between HTTP libraries (httpx, httpx2): use its own Limits.
    http_module = importlib.import_module(base.__mro__[1].__module__.split(".")[0])
    limits = http_module.Limits(max_connections=connections, max_keepalive_connections=connections)
    aio = getattr(openai, "DefaultAioHttpClient", None)
    if aio is not None and importlib.util.find_spec("aiohttp") is not None:
        with contextlib.suppress(Exception):
            return aio(limits=limits, timeout=timeout)
    return base(limits=limits, timeout=timeout)


class AiohttpTransport:
    """Plain HTTP/1.1 keep-alive requests with aiohttp: the same protocol at a fraction of the
    client CPU per request, for runs where the client, not the server, is the limit."""

    def __init__(self, base_urls: Sequence[str], api_key: str, connections: int, timeout: float) -> None:
        import aiohttp

        self.urls = [u.rstrip("/") + "/chat/completions" for u in (base_urls or [OPENAI_URL])]
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, limit_per_host=0, ttl_dns_cache=300),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )
        self._aiohttp = aiohttp

    async def post(self, turn: int, body: dict[str, Any], timeout: float) -> HttpResult:
        aiohttp = self._aiohttp
        url = self.urls[turn % len(self.urls)]
        try:
            async with self.session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except (TimeoutError, aiohttp.ClientError) as exc:
            message = _error_text(exc) if str(exc) else f"{type(exc).__name__}: no answer in {timeout}s"
            raise transport_error(exc, message) from None
        try:
            data = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            if status == 200:
                raise TransportError("the server answered 200 with a body that is not JSON", reached=True) from None
            data = None
        if status != 200:
            message = raw.decode("utf-8", "replace")[:300]
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                message = str(data["error"].get("message", message))
            return HttpResult(status=status, headers=headers, message=message)
        content, prompt_tokens, completion_tokens, problem = _content_of(data)
        if content is None:
            return HttpResult(status=200, message=problem)
        return HttpResult(status=200, text=content, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    async def close(self) -> None:
        await self.session.close()


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for every one to end, retrieving each outcome."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Transport(Protocol):
    async def post(self, turn: int, body: dict[str, Any], timeout: float) -> HttpResult: ...

    async def close(self) -> None: ...


TRANSPORTS: dict[str, Callable[[Sequence[str], str, int, float], Transport]] = {
    "openai": OfficialTransport,
    "aiohttp": AiohttpTransport,
}


@dataclass
class ServerState:
    """What the client has learnt about one server during a run: which response format it takes
    and whether it has answered at all."""

    url: str
    ladder: tuple[str, ...]  # the formats to try, best first
    step: int = 0
    settled: bool = False  # the format is known to work (or nothing else is left to try): no probing
    reached: bool = False
    rejected: list[str] = field(default_factory=list)  # formats it refused, in order
    rejection: str = ""  # how it refused the last one
    announced: bool = False
    lock: asyncio.Lock | None = None

    @property
    def fmt(self) -> str:
        return self.ladder[self.step]

    def can_step_down(self) -> bool:
        return self.step + 1 < len(self.ladder)


def format_name(step: str) -> str:
    """The response_format type a ladder step sends."""
    return step.partition("+")[0]


class FailureWatch:
    """Holds back the first answers while they all fail the same permanent way; raises once
    ``first`` of them have, so a run that cannot succeed stops at once with the cause instead of
    grinding through the corpus (and writes no records for it). Any other answer releases them."""

    def __init__(self, first: int) -> None:
        self.first = first
        self.held: list[tuple[Any, ChatAnswer]] = []
        self.signature: str | None = None
        self.open = first > 0

    def add(self, key: Any, answer: ChatAnswer) -> list[tuple[Any, ChatAnswer]]:
        if not self.open:
            return [(key, answer)]
        signature = error_signature(answer.error or "") if answer.permanent and not answer.ok else None
        if signature is None or (self.signature is not None and signature != self.signature):
            return self.release() + [(key, answer)]
        self.signature = signature
        self.held.append((key, answer))
        if len(self.held) >= self.first:
            raise FatalBackendError(
                f"stopped: the first {len(self.held)} requests all failed the same way: {short(answer.error or '', 300)}"
            )
        return []

    def release(self) -> list[tuple[Any, ChatAnswer]]:
        self.open = False
        held, self.held = self.held, []
        return held


def print_note(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def split_urls(value: Any) -> Any:
    """``"http://a/v1, http://b/v1"`` -> the two URLs (a list is kept as it is)."""
    if isinstance(value, str):
        return [u.strip() for u in value.split(",") if u.strip()]
    return value


class OpenAIOptions(LLMOptions):
    """``--backend openai``: any OpenAI-compatible server."""

    base_url: Annotated[list[str], BeforeValidator(split_urls)] = Field(
        default_factory=list, description="OpenAI-compatible server URL; repeat or comma-separate for round-robin."
    )
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Environment variable holding the API key.")
    concurrency: int = Field(default=64, ge=1, description="Requests in flight.")
    timeout: float = Field(default=120.0, gt=0, description="Seconds per request before it is retried.")
    max_retries: int = Field(default=6, ge=0, description="Retries per request on 429/5xx/timeouts.")
    retry_backoff: float = Field(default=1.0, gt=0, description="Seconds before the first retry (doubles each time).")
    client: Literal["openai", "aiohttp"] = Field(
        default="openai", description="HTTP client: openai (official SDK) | aiohttp (lean)."
    )
    response_format: Literal["auto", "json_schema", "json_object", "text"] = Field(
        default="auto",
        description="How JSON is asked for: auto (probe each server once, stepping down "
        "json_schema > json_object > text, and remember) | json_schema | json_object | text.",
    )


class OpenAIBackend(ChatBackend):
    """An OpenAI-compatible chat-completions server: N requests in flight from one event loop.

    ``client="openai"`` sends through the official ``openai.AsyncOpenAI`` client;
    ``client="aiohttp"`` through a plain aiohttp session (same requests, less CPU).
    ``response_format="auto"`` probes each server once (json_schema, json_object, text) and
    remembers what it takes; a named format is sent as is and never stepped down.
    """

    Options = OpenAIOptions
    remote = True  # one client in the stage's process streams every answer

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_urls: Sequence[str] = (),
        api_key_env: str = "OPENAI_API_KEY",
        params: GenerationParams = GenerationParams(),
        concurrency: int = 64,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        response_format: str = "auto",
        client: str = "openai",
        seed: int | None = None,
        stop_after: int = STOP_AFTER_SAME_FAILURES,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(model, params)
        if client not in TRANSPORTS:
            raise UserError(f"unknown HTTP client {client!r}: use {' or '.join(TRANSPORTS)}")
        if client == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
            raise UserError("--client aiohttp needs aiohttp: pip install aiohttp")
        if response_format not in RESPONSE_FORMAT_CHOICES:
            raise UserError(f"unknown response format {response_format!r}: use {' | '.join(RESPONSE_FORMAT_CHOICES)}")
        self.base_urls = list(base_urls)
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.response_format = response_format
        self.client = client
        self.stop_after = stop_after
        self.notify = notify or print_note
        self._rng = random.Random(seed)
        ladder = LADDERS[response_format]
        self.servers = [
            ServerState(url, ladder, settled=len(ladder) == 1) for url in (self.base_urls or [OPENAI_URL])
        ]
        resolve_api_key(api_key_env, self.base_urls)  # fail early, before any request

    @classmethod
    def from_spec(cls, spec: OpenAIOptions) -> OpenAIBackend:  # type: ignore[override]
        return cls(
            spec.model,
            base_urls=list(spec.base_url),
            api_key_env=spec.api_key_env,
            params=spec.params,
            concurrency=spec.concurrency,
            timeout=spec.timeout,
            max_retries=spec.max_retries,
            backoff=spec.retry_backoff,
            response_format=spec.response_format,
            client=spec.client,
            seed=spec.seed,
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "base_urls": self.base_urls,
            "client": self.client,
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "response_format": self.response_format,
            "response_formats": {s.url: s.fmt for s in self.servers},  # what each server ended on
        }

    # The client runs on its own event loop in a helper thread; answers come back through a
    # queue, so the caller's writing and parsing never stall the requests in flight.
    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        done = object()
        holder: dict[str, Any] = {}

        def runner() -> None:
            loop = asyncio.new_event_loop()
            holder["loop"] = loop
            try:
                holder["task"] = loop.create_task(self._run(iter(items), out))
                loop.run_until_complete(holder["task"])
            except BaseException as exc:  # handed to the consuming thread
                out.put(exc)
            finally:
                loop.close()
                out.put(done)

        thread = threading.Thread(target=runner, name="icsd-llm-client", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            if thread.is_alive() and "task" in holder:
                with contextlib.suppress(RuntimeError):
                    holder["loop"].call_soon_threadsafe(holder["task"].cancel)
            thread.join(timeout=10)

    async def _run(self, items: Iterator[tuple[K, ChatRequest]], out: queue.SimpleQueue[Any]) -> None:
        key = resolve_api_key(self.api_key_env, self.base_urls)
        transport = TRANSPORTS[self.client](self.base_urls, key, self.concurrency, self.timeout)
        turn = itertools.count()
        for server in self.servers:
            server.lock = asyncio.Lock()
        watch = FailureWatch(self.stop_after)
        batch: list[tuple[K, ChatAnswer]] = []

        def hand_over() -> None:
            nonlocal batch
            if batch:
                out.put(batch)
                batch = []

        async def pump() -> None:  # answers cross threads in small batches, not one wake-up each
            while True:
                await asyncio.sleep(HANDOFF_SECONDS)
                hand_over()

        async def worker() -> None:
            for k, request in items:  # one shared iterator: each item is taken exactly once
                try:
                    answer = await self._answer(request, transport, turn)
                except FatalBackendError as exc:
                    raise FatalBackendError(redact(str(exc), key) or "") from None
                answer.error = redact(answer.error, key)
                answer.text = redact(answer.text, key)
                try:
                    batch.extend(watch.add(k, answer))
                except FatalBackendError as exc:
                    raise FatalBackendError(redact(str(exc), key) or "") from None

        pumping = asyncio.create_task(pump())
        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*workers)
            batch.extend(watch.release())  # fewer answers than the watch waits for
        finally:
            # one worker failed (or the run was cancelled): stop the others and wait until they
            # have stopped, so none is left using the client once it is closed, nor unretrieved
            await cancel_all([*workers, pumping])
            hand_over()
            await transport.close()

    def request_body(self, request: ChatRequest, fmt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": list(request.messages),
            "max_tokens": self.params.max_new_tokens,
        }
        if self.params.temperature is not None:  # None: the server's default, as the official code
            body["temperature"] = self.params.temperature
        if request.seed is not None:
            body["seed"] = request.seed
        if fmt == "json_schema" and request.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.schema, "strict": True},
            }
        elif fmt == "json_object+schema" and request.schema is not None:
            body["response_format"] = {"type": "json_object", "schema": request.schema}
        elif fmt != "text":
            body["response_format"] = {"type": "json_object"}
        return body

    async def _send(self, request: ChatRequest, transport: Transport, index: int) -> tuple[HttpResult, str]:
        """Post ``request`` to server ``index`` in the format it takes, stepping down (auto only)
        while its error answers name the format. Until the server has answered once, one request
        at a time probes it, so a format it lacks is learnt from one request, not from all in flight."""
        server = self.servers[index]
        if not server.settled and server.lock is not None:
            async with server.lock:
                if not server.settled:
                    return await self._post_stepping_down(request, transport, index)
        return await self._post_stepping_down(request, transport, index)

    async def _post_stepping_down(self, request: ChatRequest, transport: Transport, index: int) -> tuple[HttpResult, str]:
        server = self.servers[index]
        while True:
            fmt = server.fmt
            res = await transport.post(index, self.request_body(request, fmt), self.timeout)
            server.reached = True
            if res.status == 200:
                server.settled = True
                self._announce(server)
                return res, fmt
            if server.fmt != fmt:  # another request learnt meanwhile that the server lacks fmt
                continue
            if not server.can_step_down() or not names_response_format(res.message):
                return res, fmt
            server.rejected.append(format_name(fmt))
            server.rejection = f"HTTP {res.status}: {short(res.message)}"
            server.step += 1

    def _announce(self, server: ServerState) -> None:
        if server.rejected and not server.announced:
            server.announced = True
            refused = " or ".join(dict.fromkeys(server.rejected))
            now = format_name(server.fmt) + (" (with the answer's schema)" if server.fmt.endswith("+schema") else "")
            self.notify(
                f"note: {server.url} does not support response_format {refused} "
                f"({server.rejection}); asking for {now} for the rest of the run"
            )

    async def _answer(self, request: ChatRequest, transport: Transport, turn: Iterator[int]) -> ChatAnswer:
        attempt = 0
        previous = ""  # the body of the last error answer, to tell a rejection from a hiccup
        while True:
            wait: float | None = None
            index = next(turn) % len(self.servers)
            server = self.servers[index]
            refused = False
            try:
                res, fmt = await self._send(request, transport, index)
            except TransportError as exc:
                last_error = str(exc)
                refused = exc.refused
                if exc.refused and not server.reached:
                    raise FatalBackendError(f"nothing listens at {server.url} (connection refused): is the server running?") from None
                server.reached = server.reached or exc.reached
            else:
                if res.status == 200:
                    if res.text is None:
                        return ChatAnswer(error=res.message, attempts=attempt + 1)
                    return ChatAnswer(
                        text=res.text,
                        attempts=attempt + 1,
                        prompt_tokens=res.prompt_tokens,
                        completion_tokens=res.completion_tokens,
                    )
                last_error = f"HTTP {res.status}: {res.message}"[:500]
                if res.status in (401, 403, 404):
                    raise FatalBackendError(
                        f"the server refused the request ({last_error}); "
                        f"check --model, --base-url and the key in ${self.api_key_env}"
                    )
                if fmt != "text" and names_response_format(res.message):
                    hint = "try --response-format auto" if self.response_format != "auto" else "no plainer format left"
                    return ChatAnswer(
                        error=f"response_format {format_name(fmt)} refused ({hint}): {last_error}",
                        attempts=attempt + 1,
                        permanent=True,
                    )
                if not looks_transient(res.status, res.message) and (
                    res.status < 500 or res.message == previous or "validation error" in res.message.lower()
                ):  # the server rejects this request: asking again cannot help
                    return ChatAnswer(error=last_error, attempts=attempt + 1, permanent=True)
                previous = res.message
                wait = retry_after_seconds(res.headers)
            if attempt >= self.max_retries:
                if not any(s.reached for s in self.servers):
                    urls = ", ".join(s.url for s in self.servers)
                    raise FatalBackendError(f"cannot reach the server at {urls}: {last_error}; is it running?")
                if refused:  # it answered before and listens no more: every request left would fail
                    raise FatalBackendError(
                        f"the server at {server.url} stopped answering (connection refused): is it still "
                        "running? finished groups are kept; run the same command to resume"
                    )
                return ChatAnswer(error=f"gave up after {attempt + 1} attempts: {last_error}", attempts=attempt + 1)
            if wait is None:
                wait = backoff_delay(attempt, self.backoff, self.max_backoff, self._rng)
            else:
                wait = min(wait, 600.0) * (1 + self._rng.uniform(0, 0.1))
            attempt += 1
            await asyncio.sleep(wait)
