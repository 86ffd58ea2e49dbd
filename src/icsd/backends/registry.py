"""The registries of the swappable model parts: text-to-image backends, embedders, captioner families.

Entries are registered lazily as ``"module:attribute"``: listing the names or validating a config
against them imports no torch and no backend. Adding a part is its module plus one line here, or an
entry point in another package (groups ``icsd.t2i_backends``, ``icsd.embedders``, ``icsd.captioners``;
see docs/plugins.md).

- a text-to-image backend is a class with ``prepare(model, cache) -> str`` (what to load, checked
  or built now) and ``load(spec, device)`` returning a generator whose
  ``generate(prompts, seeds, steps=, guidance=, width=, height=, negative_prompt=)`` gives a
  :class:`~icsd.backends.t2i.Rendered` (see :class:`~icsd.backends.t2i.DiffusersBackend`);
- an embedder is a class ``(name, device=, batch_size=)`` with ``embed(texts, progress)`` (float32,
  L2-normalised rows) and ``describe()``; its optional ``claims(path)`` lets ``kind: auto`` pick it;
- a captioner family is a :class:`~icsd.backends.captioning.base.CaptionerFamily` subclass (build, loss,
  text batch, generate, save, load); its name is the ``train.preset`` value.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..registry import Registry

T2I_BACKENDS: Registry[Any] = Registry("text-to-image backend", "icsd.t2i_backends")
T2I_BACKENDS.register("diffusers", "icsd.backends.t2i:DiffusersBackend")
T2I_BACKENDS.register("tiny-random", "icsd.backends.t2i:TinyRandomBackend")
T2I_BACKENDS.register("sandbox", "icsd.sandbox.renderer:SandboxRenderer")
T2I_BACKENDS.register("sandbox-camera", "icsd.sandbox.renderer:SandboxCamera")

EMBEDDERS: Registry[Any] = Registry("embedder kind", "icsd.embedders")
EMBEDDERS.register("sentence-transformers", "icsd.backends.embedders:SentenceTransformerEmbedder")
EMBEDDERS.register("clip", "icsd.backends.embedders:CLIPTextEmbedder")

CAPTIONERS: Registry[Any] = Registry("captioner preset", "icsd.captioners")
# each with its options model, importable without torch (the train section lists their fields)
_CAPTIONER_OPTIONS = "icsd.backends.captioning.options:CaptionerOptions"
CAPTIONERS.register("icsd", "icsd.backends.captioning.icsd:IcsdCaptioner", options=_CAPTIONER_OPTIONS)
CAPTIONERS.register(
    "prefix", "icsd.backends.captioning.prefix:PrefixCaptioner", options="icsd.backends.captioning.options:PrefixOptions"
)
CAPTIONERS.register("tiny", "icsd.backends.captioning.tiny:TinyCaptioner", options=_CAPTIONER_OPTIONS)
CAPTIONERS.register("sandbox", "icsd.sandbox.captioner:SandboxCaptioner", options=_CAPTIONER_OPTIONS)


def known(registry: Registry[Any], name: str, *also: str) -> str:
    """``name`` if registered (or one of ``also``), else ValueError listing the known names; for
    pydantic validators, which report ValueErrors as field errors."""
    if name in also:
        return name
    try:
        return registry.check(name)
    except UserError as exc:
        message = str(exc)
        if also:
            message += ", " + ", ".join(also)
        raise ValueError(message) from None
