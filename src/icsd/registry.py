"""Named registries of swappable parts (LLM backends, text-to-image backends, embedders, captioner
families, stages).

An entry is registered either as an object or lazily as ``"module:attribute"``, so a registry can be
listed and a config validated against its names without importing torch or any heavy backend.
Asking for an unknown name is a one-line :class:`~icsd.errors.UserError` that lists the known ones
and suggests the closest.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from importlib import import_module
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


def closest(name: str, choices: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


class Registry(Generic[T]):
    """An ordered name -> entry table; ``what`` names the kind of entry in error messages."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, entry: T | str | None = None) -> Callable[[T], T]:
        """Register ``entry`` (an object, or ``"module:attr"`` to import on first use) under ``name``.

        Without ``entry`` it returns a decorator: ``@REG.register("name")``.
        """
        if entry is not None:
            self._add(name, entry)

        def decorate(obj: T) -> T:
            self._add(name, obj)
            return obj

        return decorate

    def _add(self, name: str, entry: T | str) -> None:
        current = self._entries.get(name)
        if current is not None and not isinstance(current, str) and current is not entry:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        if isinstance(current, str) or current is None or not isinstance(entry, str):
            self._entries[name] = entry

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def check(self, name: str) -> str:
        """``name`` if registered, else a :class:`UserError` listing the known names."""
        if name not in self._entries:
            known = ", ".join(self._entries)
            raise UserError(f"unknown {self.what} {name!r}{closest(name, self.names())}; known: {known}")
        return name

    def get(self, name: str) -> T:
        """The entry registered under ``name`` (imported now if it was registered lazily)."""
        entry = self._entries[self.check(name)]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            loaded: T = getattr(import_module(module), attr)
            self._entries[name] = loaded
            return loaded
        return entry
