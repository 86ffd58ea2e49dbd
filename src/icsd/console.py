"""A quiet console: icsd's own progress bars and closing lines stay, the libraries' chatter goes.

transformers, diffusers, huggingface_hub and sentence-transformers print warnings (torchvision
notices, deprecations), "Loading weights" and "Writing model shards" bars from their internals.
Set ``ICSD_VERBOSE=1`` to see them again.

Progress: :func:`progress_bar` draws a bar on a terminal and, when the output is a file or a pipe,
prints a plain line every ``ICSD_PROGRESS_SECONDS`` seconds (default 20) instead of a bar's
carriage-return frames.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import IO, Any

NOISY = ("transformers", "diffusers", "huggingface_hub", "sentence_transformers", "accelerate", "webdataset", "timm")


def quiet_libraries() -> None:
    """Silence library warnings and internal progress bars (unless ``ICSD_VERBOSE`` is set). Call it
    before tqdm is imported: tqdm reads its ``TQDM_*`` settings then."""
    if os.environ.get("ICSD_VERBOSE"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # huggingface_hub's switch; transformers and diffusers read it for their own tqdm bars too.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # tqdm's own switch, for the bars libraries draw with plain tqdm (transformers' GGUF loading);
    # icsd's bars (progress_bar) pass ``disable`` themselves
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{name}(\..*)?$")
    warnings.filterwarnings("ignore", message=r".*torchvision.*")
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")


# ----------------------------------------------------------------------------- progress

# Seconds between two plain progress lines when the output is not a terminal (a log file, CI).
PLAIN_INTERVAL_ENV = "ICSD_PROGRESS_SECONDS"
PLAIN_INTERVAL = 20.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress:
    """The progress bar's stand-in for logs: one plain line every ``interval`` seconds
    (``train: 120/600 step (20%), 0:45 elapsed, about 3:00 left``), never a carriage return.

    It answers the calls icsd makes on a tqdm bar (``update``, ``set_postfix``,
    ``set_postfix_str``, ``close``, use as a context manager)."""

    def __init__(
        self,
        total: float | None,
        desc: str,
        unit: str,
        initial: float = 0,
        file: IO[str] | None = None,
        interval: float | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.file = file
        self.interval = interval if interval is not None else _interval()
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.emit(now)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = f"{self.n:,.0f}"
        if self.total:
            done += f"/{self.total:,.0f} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done += f" {self.unit}"
        text = f"{self.desc}: {done}, {_clock(elapsed)} elapsed"
        new = self.n - self.initial
        if self.total and new > 0 and self.n < self.total:
            text += f", about {_clock(elapsed / new * (self.total - self.n))} left"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def emit(self, now: float) -> None:
        print(self.line(now), file=self.file or sys.stderr, flush=True)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(dict(ordered_dict) if ordered_dict else {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def refresh(self) -> None:
        pass

    def write(self, s: str) -> None:
        print(s, file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(PLAIN_INTERVAL_ENV, PLAIN_INTERVAL)))
    except ValueError:
        return PLAIN_INTERVAL


def progress_bar(
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    *,
    initial: float = 0,
    disable: bool = False,
    file: IO[str] | None = None,
) -> Any:
    """icsd's one progress display: a tqdm bar on a terminal, :class:`PlainProgress` lines when the
    output goes to a file or a pipe, nothing with ``disable``."""
    from tqdm.auto import tqdm

    stream = file or sys.stderr
    if disable:
        return tqdm(total=total, disable=True)
    if not _is_terminal(stream):
        return PlainProgress(total, desc, unit, initial, file)
    # smoothing 0: the estimate is the average over the whole stage, not over the last few units
    # (the first steps of training, which load data and models, make a short-window estimate wild).
    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True, smoothing=0, disable=False
    )


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
