"""The contract every LLM backend registered in ``icsd.llm.registry.LLM_BACKENDS`` keeps.

A backend's tests subclass :class:`LLMBackendContract` (as diffusers' pipeline tests subclass
``PipelineTesterMixin``), set ``backend_name`` and override the ``spec`` fixture with the
backend's options (``icsd.llm.llm_options(name, ...)``) that build a small instance here (a tiny
random model, a local server). Every test below then runs on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from contract_base import Contract, missing_hook

from icsd.config import SummarizeConfig
from icsd.llm import LLM_BACKENDS, ChatAnswer, ChatBackend, ChatRequest, LLMOptions, make_backend
from icsd.llm.prompts import PromptSettings, answer_schema

PROMPTS = [
    "Pick captions of one scene:\n1. a dog on a beach\n2. a brown dog runs\n3. a red bus",
    "Summarise: a man rides a wave on a surfboard",
    "Pick captions:\n1. two cats sleep\n2. a cat on a sofa\n3. a cat",
    "Say something about a kitchen with a stove",
    "Pick captions:\n1. a plate of food\n2. a sandwich on a plate",
]


def requests(schema: bool = True) -> list[ChatRequest]:
    out = []
    for i, text in enumerate(PROMPTS):
        s = answer_schema(PromptSettings(min_select=1, max_select=3), 3) if schema and i % 2 == 0 else None
        out.append(ChatRequest(messages=({"role": "user", "content": text},), schema=s))
    return out


class LLMBackendContract(Contract):
    """Subclass with ``backend_name = "..."`` and a ``spec`` fixture."""

    names = "backend_name"
    backend_name: str = ""

    @pytest.fixture()
    def spec(self) -> LLMOptions:  # pragma: no cover - always overridden
        raise missing_hook(self, "a fixture spec()", "the LLMOptions of a small instance of the backend")

    @pytest.fixture()
    def backend(self, spec: LLMOptions) -> Iterator[ChatBackend]:
        built = make_backend(spec)
        try:
            yield built
        finally:
            built.close()

    # registration ---------------------------------------------------------------------------

    def test_is_registered_under_its_name(self, spec: LLMOptions) -> None:
        assert spec.backend == self.backend_name
        assert self.backend_name in LLM_BACKENDS.names()
        cls = LLM_BACKENDS.get(self.backend_name)
        assert issubclass(cls, ChatBackend) and cls.name == self.backend_name

    def test_its_options_are_settings_of_the_stage(self) -> None:
        """Each option is a ``summarize.<key>`` setting with the same default (a key that several
        backends declare is one setting, so they must agree)."""
        options = LLM_BACKENDS.get(self.backend_name).Options
        assert issubclass(options, LLMOptions)
        section = SummarizeConfig.section().model_fields
        for key, info in options.model_fields.items():
            assert key in section, f"summarize.{key} is missing"
            mine, theirs = info.get_default(call_default_factory=True), section[key].get_default(call_default_factory=True)
            assert mine == theirs, f"{self.backend_name}'s {key} defaults to {mine!r}, the setting to {theirs!r}"

    def test_builds_from_its_spec(self, backend: ChatBackend, spec: LLMOptions) -> None:
        assert isinstance(backend, LLM_BACKENDS.get(self.backend_name))
        assert backend.model_id == spec.model_label()  # records name the model before it is loaded
        assert backend.params == spec.params

    def test_describe_names_backend_model_and_generation(self, backend: ChatBackend) -> None:
        info = backend.describe()
        assert info["backend"] == self.backend_name and info["model"] == backend.model_id
        assert info["max_new_tokens"] == backend.params.max_new_tokens
        assert info["temperature"] == backend.params.temperature
        assert "KEY" not in repr(info).upper().replace("API_KEY_ENV", "")

    # answering ------------------------------------------------------------------------------

    def test_every_key_is_answered_exactly_once(self, backend: ChatBackend) -> None:
        keys: list[Any] = [("g", i) for i in range(len(PROMPTS))]
        items = ((k, r) for k, r in zip(keys, requests(), strict=True))  # a generator, not a list
        got = list(backend.stream(items))
        assert sorted(k for k, _ in got) == sorted(keys)
        for _, answer in got:
            assert isinstance(answer, ChatAnswer)
            assert answer.ok, answer.error
            assert isinstance(answer.text, str) and answer.error is None
            assert answer.prompt_tokens >= 0 and answer.completion_tokens >= 0

    def test_requests_without_a_schema_are_answered(self, backend: ChatBackend) -> None:
        got = dict(backend.stream(enumerate(requests(schema=False))))
        assert sorted(got) == list(range(len(PROMPTS))) and all(a.ok for a in got.values())

    def test_nothing_to_answer_yields_nothing(self, backend: ChatBackend) -> None:
        assert list(backend.stream(iter(()))) == []

    def test_one_backend_serves_several_streams(self, backend: ChatBackend) -> None:
        first = dict(backend.stream(enumerate(requests()[:2])))
        second = dict(backend.stream(enumerate(requests()[2:])))
        assert sorted(first) == [0, 1] and sorted(second) == [0, 1, 2]
