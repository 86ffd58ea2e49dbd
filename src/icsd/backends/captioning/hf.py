"""Loading transformers models quietly, and refusing checkpoints that leave weights uninitialised."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ...errors import UserError


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (unused CLIP text weights etc.) while loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def check_all_weights_loaded(name: str, info: dict[str, Any], what: str) -> None:
    """A one-line error when a checkpoint left weights of the model uninitialised (weights of another
    model, or a model of another kind), instead of going on with random weights."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(m[0]) if isinstance(m, tuple | list) else str(m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        example = (missing or mismatched)[0]
        raise UserError(
            f"{name} is not a usable {what}: {len(missing)} weights missing and {len(mismatched)} of another "
            f"shape (e.g. {example}); is it a checkpoint of another model?"
        )
