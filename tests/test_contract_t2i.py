"""The text-to-image contract (tests/contracts.py) run on every registered backend."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from contracts import T2IContract, contract_subclasses

from icsd.backends import t2i
from icsd.backends.registry import T2I_BACKENDS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TestDiffusersBackend(T2IContract):
    backend = "diffusers"

    @pytest.fixture(scope="class")
    def model(self, tiny_sd_model: Path) -> str:
        return str(tiny_sd_model)


class TestTinyRandomBackend(T2IContract):
    backend = "tiny-random"

    @pytest.fixture(scope="class")
    def model(self) -> str:
        return "ignored"


class TestSandboxRenderer(T2IContract):
    backend = "sandbox"

    @pytest.fixture(scope="class")
    def model(self) -> str:
        return "world"


class TestSandboxCamera(T2IContract):
    backend = "sandbox-camera"

    @pytest.fixture(scope="class")
    def model(self, tmp_path_factory: pytest.TempPathFactory) -> str:
        from icsd.sandbox.make import WORLDS, write_world

        return str(write_world(WORLDS["small"], tmp_path_factory.mktemp("world") / "small"))


def test_every_registered_backend_has_a_contract_test() -> None:
    tested = {cls.backend for cls in contract_subclasses(T2IContract)}
    assert set(T2I_BACKENDS.names()) <= tested


def test_tiny_random_builds_once_into_the_cache(tiny_sd_model: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_sd_model, tmp_path / t2i.TINY_CACHE_NAME)
    stamp = (tmp_path / t2i.TINY_CACHE_NAME / "model_index.json").stat().st_mtime_ns
    assert t2i.TinyRandomBackend.prepare("anything", tmp_path) == str(
        (tmp_path / t2i.TINY_CACHE_NAME).resolve()
    )
    assert (tmp_path / t2i.TINY_CACHE_NAME / "model_index.json").stat().st_mtime_ns == stamp
    assert t2i.TinyRandomBackend.model_label("anything") == t2i.TINY_MODEL_NAME


def test_diffusers_backend_rejects_a_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    from icsd.errors import UserError

    with pytest.raises(UserError, match="model_index.json"):
        t2i.DiffusersBackend.prepare(str(tmp_path), tmp_path)
