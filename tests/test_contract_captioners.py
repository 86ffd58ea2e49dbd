"""The captioner contract (tests/contracts.py) run on every registered family."""

from __future__ import annotations

from pathlib import Path

import pytest
from contracts import CaptionerContract, contract_subclasses

from icsd.backends.captioners import CaptionerSpec
from icsd.backends.registry import CAPTIONERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TestIcsdCaptioner(CaptionerContract):
    preset = "icsd"

    def make_spec(self, parts: dict[str, Path]) -> CaptionerSpec:
        return CaptionerSpec(
            preset="icsd", vision_model=str(parts["clip"]), text_model=str(parts["bert"]), image_size=48
        )


class TestPrefixCaptioner(CaptionerContract):
    preset = "prefix"

    def make_spec(self, parts: dict[str, Path]) -> CaptionerSpec:
        return CaptionerSpec(preset="prefix", vision_model=str(parts["clip"]), text_model=str(parts["gpt2"]))


class TestTinyCaptioner(CaptionerContract):
    preset = "tiny"

    def make_spec(self, parts: dict[str, Path]) -> CaptionerSpec:
        return CaptionerSpec(preset="tiny", image_size=32)


class TestSandboxCaptioner(CaptionerContract):
    preset = "sandbox"

    def make_spec(self, parts: dict[str, Path]) -> CaptionerSpec:
        return CaptionerSpec(preset="sandbox")  # the packaged pretrained encoder, frozen, 64 px


def test_every_registered_family_has_a_contract_test() -> None:
    tested = {cls.preset for cls in contract_subclasses(CaptionerContract)}
    assert set(CAPTIONERS.names()) <= tested


def test_unknown_preset_is_an_error_listing_the_known_ones() -> None:
    from icsd.backends.captioners import build_caption_model
    from icsd.errors import UserError

    with pytest.raises(
        UserError,
        match=r"unknown captioner preset 'prefx' \(did you mean 'prefix'\?\); known: icsd, prefix, tiny, sandbox",
    ):
        build_caption_model(CaptionerSpec(preset="prefx"))
