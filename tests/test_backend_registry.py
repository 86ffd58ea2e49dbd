"""The registries of backends, embedders and captioner families: light to list, checked by configs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from icsd.backends.registry import CAPTIONERS, EMBEDDERS, T2I_BACKENDS
from icsd.config import EmbedConfig, RenderConfig, TrainConfig


def test_listing_and_validating_names_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from icsd.backends.registry import CAPTIONERS, EMBEDDERS, T2I_BACKENDS\n"
        "from icsd.config import TrainConfig\n"
        "TrainConfig(preset='prefix')\n"
        "print(CAPTIONERS.names(), EMBEDDERS.names(), T2I_BACKENDS.names())\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'sentence_transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_every_lazy_entry_resolves_to_its_part() -> None:
    from icsd.backends.captioners import CaptionerFamily

    for name in CAPTIONERS.names():
        family = CAPTIONERS.get(name)
        assert issubclass(family, CaptionerFamily) and family.name == name and family.model_type
    for name in EMBEDDERS.names():
        cls = EMBEDDERS.get(name)
        assert callable(getattr(cls, "embed", None)) and callable(getattr(cls, "describe", None))
    for name in T2I_BACKENDS.names():
        entry = T2I_BACKENDS.get(name)
        assert all(callable(getattr(entry, m, None)) for m in ("prepare", "model_label", "load"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(preset="blip"), "unknown captioner preset 'blip'; known: icsd, prefix, tiny"),
        (lambda: TrainConfig(preset="tinny"), "did you mean 'tiny'"),
        (lambda: EmbedConfig(kind="clpi"), "unknown embedder kind 'clpi' (did you mean 'clip'?)"),
        (lambda: RenderConfig(backend="difusers"), "did you mean 'diffusers'"),
    ],
)
def test_configs_reject_unknown_names_listing_the_known_ones(make, message) -> None:
    with pytest.raises(ValidationError) as info:
        make()
    assert message in str(info.value)


def test_configs_take_every_registered_name() -> None:
    assert [TrainConfig(preset=n).preset for n in CAPTIONERS] == CAPTIONERS.names()
    assert [EmbedConfig(kind=n).kind for n in ["auto", *EMBEDDERS]] == ["auto", *EMBEDDERS.names()]
    assert [RenderConfig(backend=n).backend for n in T2I_BACKENDS] == T2I_BACKENDS.names()
