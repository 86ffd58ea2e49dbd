"""Ctrl-C and SIGTERM: stop cleanly, keep what is done, say where, exit 130 / 143.

The first SIGINT or SIGTERM raises :class:`Interrupted` (a ``KeyboardInterrupt``) where the
program is, so the unit in flight (a shard, a part, a batch of requests) is dropped and the
finished ones, each behind its done-marker, are kept. Inside :func:`deferred` the first signal only
sets a flag that the code polls at a safe point (the trainer: the end of an optimizer step, where
it writes a checkpoint that holds everything the next step depends on). A second signal exits at
once, whatever is running. :func:`at` records what is running, so the closing line says where the
command stopped ("interrupted at train step 160 of 600 ...; run the same command to resume").
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by the first SIGINT or SIGTERM (a ``KeyboardInterrupt``, so ``except Exception`` lets it through)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    signum: int | None = None  # the first signal received, until reset()
    defer = 0  # >0: inside deferred(): the first signal sets the flag only
    where = ""
    installed = False


_state = _State()


def _handle(signum: int, frame: Any) -> None:
    if _state.signum is not None:  # the second signal: no more cleaning up
        with contextlib.suppress(Exception):
            sys.stderr.write(f"\ninterrupted again ({signal.Signals(signum).name}): exiting now\n")
            sys.stderr.flush()
        os._exit(128 + _state.signum)
    _state.signum = signum
    if not _state.defer:
        raise Interrupted(signum)


def install() -> dict[int, Any]:
    """Handle SIGINT and SIGTERM (the CLI calls this first); returns the handlers replaced, for
    :func:`restore` (a caller that runs the CLI in its own process gets its handlers back)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _handle)
    _state.installed = True
    return previous


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if previous:
        _state.installed = False


def reset() -> None:
    """Forget a received signal and the position (for a process that goes on after one)."""
    _state.signum, _state.where = None, ""


def received() -> int | None:
    """The signal received so far (``SIGINT``/``SIGTERM`` number), or None."""
    return _state.signum


def pending() -> bool:
    return _state.signum is not None


def check() -> None:
    """Raise :class:`Interrupted` when a signal came in meanwhile (at a safe point inside :func:`deferred`)."""
    if _state.signum is not None:
        raise Interrupted(_state.signum)


def at(where: str) -> None:
    """Record what is running now, for the closing line."""
    _state.where = where


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, the first signal is only recorded; poll :func:`pending` / :func:`check`. The handlers
    are installed for the duration when nobody installed them (the Python API, in the main thread)."""
    previous = None
    if not _state.installed and threading.current_thread() is threading.main_thread():
        previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        for sig in SIGNALS:
            signal.signal(sig, _handle)
        reset()
    _state.defer += 1
    try:
        yield
    finally:
        _state.defer -= 1
        if previous is not None:  # the caller goes on (a notebook, a test): the next Ctrl-C is a first one
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _state.signum = None


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Inside :func:`deferred`, a stretch that a signal may cut short (raised at once, as outside)."""
    saved = _state.defer
    _state.defer = 0
    try:
        check()
        yield
    finally:
        _state.defer = saved


def exit_code(signum: int | None = None) -> int:
    """130 for SIGINT, 143 for SIGTERM (the shell's 128 + signal number)."""
    return 128 + (signum if signum is not None else _state.signum or signal.SIGINT)


def closing_line() -> str:
    """The one line a command prints when a signal stopped it."""
    where = _state.where or "the start"
    name = signal.Signals(_state.signum or signal.SIGINT).name
    return f"interrupted at {where} ({name}); finished work is kept: run the same command to resume"
