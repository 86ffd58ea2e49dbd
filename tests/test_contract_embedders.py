"""The embedder contract (tests/contracts.py) run on every registered embedder kind."""

from __future__ import annotations

from pathlib import Path

import pytest
from contracts import EmbedderContract, contract_subclasses

from icsd.backends.registry import EMBEDDERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TestSentenceTransformerEmbedder(EmbedderContract):
    kind = "sentence-transformers"

    @pytest.fixture(scope="class")
    def model(self, tiny_sentence_model: Path) -> str:
        return str(tiny_sentence_model)


class TestCLIPTextEmbedder(EmbedderContract):
    kind = "clip"

    @pytest.fixture(scope="class")
    def model(self, tiny_clip_model: Path) -> str:
        return str(tiny_clip_model)


def test_every_registered_kind_has_a_contract_test() -> None:
    tested = {cls.kind for cls in contract_subclasses(EmbedderContract)}
    assert set(EMBEDDERS.names()) <= tested
