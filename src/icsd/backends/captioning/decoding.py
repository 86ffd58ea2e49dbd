"""How a captioner decodes: beam-score normalisation and the precision of decoding.

``length_norm`` names what a finished beam's summed log-probability is divided by:

- ``new``: the tokens generated after the prompt, the end token included (transformers 5's beam
  search, unchanged);
- ``total``: the whole sequence, the decoder's prompt included (``[DEC] a picture of`` and the
  caption), the end token not counted; a beam cut at the length limit counts all its tokens.
  That is transformers 4.15's ``BeamHypotheses.add`` (``sum_logprobs / hyp.shape[-1]``, ``hyp``
  being the sequence before the end token), the version the official code decodes with; its
  early-stopping bound divides the best running score by the same full length
  (``BeamHypotheses.is_done``).

``total`` is applied around ``model.generate`` by rescaling the two places where transformers 5
divides by the generated length (``_update_finished_beams`` and ``_check_early_stop_heuristic``),
for this model only and only while decoding: the search itself (top-k, caches, stopping) is
transformers' own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ...errors import UserError

LENGTH_NORMS = ("new", "total")
DECODE_DTYPES = ("fp32", "bf16")
_HOOKS = ("_update_finished_beams", "_check_early_stop_heuristic")


def _eos_ids(model: Any) -> torch.Tensor:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return torch.tensor(ids, dtype=torch.long)


@contextlib.contextmanager
def full_length_beam_scores(model: Any) -> Iterator[None]:
    """While active, ``model.generate``'s beam search normalises by the full sequence length
    (``length_norm: total``), as transformers 4.15 did."""
    missing = [h for h in _HOOKS if not hasattr(model, h)]
    if missing:
        raise UserError(
            f"length_norm total needs transformers' beam-search hooks {missing}; this transformers "
            "version lacks them (use length_norm: new)"
        )
    update, early = model._update_finished_beams, model._check_early_stop_heuristic
    eos = _eos_ids(model)

    def update_finished(**kw: Any) -> Any:
        cur_len, prompt_len, penalty = kw["cur_len"], kw["decoder_prompt_len"], kw["length_penalty"]
        last = kw["topk_running_sequences"][:, :, cur_len]
        ended = torch.isin(last, eos.to(last.device))
        full = torch.where(ended, float(cur_len), float(cur_len + 1))  # the end token is not counted
        # transformers divides by (cur_len + 1 - prompt_len) ** penalty: pre-scale so that the
        # quotient is the score over the full length instead
        scale = float(cur_len + 1 - prompt_len) ** penalty / full**penalty
        return update(**{**kw, "topk_log_probs": kw["topk_log_probs"] * scale})

    def early_stop(**kw: Any) -> Any:
        # transformers divides the best running score by (cur_len - prompt_len); 4.15 by the full
        # length before the newest token, cur_len - 1 here (cur_len has already moved on)
        return early(**{**kw, "decoder_prompt_len": 1})

    model._update_finished_beams = update_finished
    model._check_early_stop_heuristic = early_stop
    try:
        yield
    finally:
        for hook in _HOOKS:
            delattr(model, hook)


def decode_autocast(device: str, decode_dtype: str) -> tuple[str, torch.dtype] | None:
    """The autocast (device type, dtype) of decoding: bf16 on a GPU when asked for, else none."""
    if decode_dtype not in DECODE_DTYPES:
        raise UserError(f"unknown decode_dtype {decode_dtype!r}: one of {', '.join(DECODE_DTYPES)}")
    return ("cuda", torch.bfloat16) if decode_dtype == "bf16" and device.startswith("cuda") else None


def decoding_context(model: Any, device: str, length_norm: str, decode_dtype: str) -> contextlib.ExitStack:
    """Everything around one ``generate`` call: inference mode, the beam normalisation, and bf16
    autocast when asked for on a GPU (``fp32``: full precision, as the official evaluation)."""
    if length_norm not in LENGTH_NORMS:
        raise UserError(f"unknown length_norm {length_norm!r}: one of {', '.join(LENGTH_NORMS)}")
    autocast = decode_autocast(device, decode_dtype)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if autocast is not None:
        stack.enter_context(torch.autocast(autocast[0], dtype=autocast[1]))
    if length_norm == "total":
        stack.enter_context(full_length_beam_scores(model))
    return stack
