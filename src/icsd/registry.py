"""Named registries of swappable parts (LLM backends, text-to-image backends, embedders, captioner
families, stages), each open to plugins through an entry-point group.

An entry is registered either as an object or lazily as ``"module:attribute"``, so a registry can be
listed and a config validated against its names without importing torch or any heavy backend.
Installed packages add entries through the registry's entry-point group (``icsd.llm_backends``,
``icsd.t2i_backends``, ``icsd.embedders``, ``icsd.captioners``, ``icsd.stages``), each entry
``name = "module:attribute"``: listing names reads only the packages' metadata; the plugin's module
is imported on first use, and one that fails to import is a one-line :class:`~icsd.errors.UserError`
naming the package and the entry point. Asking for an unknown name is a one-line error that lists
the known ones and suggests the closest.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from .errors import UserError

T = TypeVar("T")

PLUGIN_GROUPS = ("icsd.llm_backends", "icsd.t2i_backends", "icsd.embedders", "icsd.captioners", "icsd.stages")


def closest(name: str, choices: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass(frozen=True)
class Plugin:
    """Where an entry came from: the installed distribution and its entry point."""

    package: str
    group: str
    name: str
    value: str

    def __str__(self) -> str:
        return f"{self.package} (entry point {self.name} = {self.value!r} in group {self.group})"


@lru_cache(maxsize=1)
def _installed_entry_points() -> tuple[tuple[EntryPoint, str], ...]:
    """Every icsd entry point of the installed packages with its distribution's name (metadata only)."""
    found = []
    for group in PLUGIN_GROUPS:
        for ep in entry_points(group=group):
            dist = getattr(ep, "dist", None)
            found.append((ep, dist.name if dist is not None else "an unknown package"))
    return tuple(found)


def _keys(installed: tuple[tuple[EntryPoint, str], ...]) -> set[tuple[str, str, str]]:
    return {(ep.group, ep.name, ep.value) for ep, _ in installed}


def rescan_plugins() -> None:
    """Forget what was found installed (after installing a package in a running interpreter)."""
    _installed_entry_points.cache_clear()


def import_entry(value: str) -> object:
    """The object ``"module:attribute"`` (dots in the attribute walk into it)."""
    module, _, attr = value.partition(":")
    obj: object = import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """An ordered name -> entry table; ``what`` names the kind of entry in error messages and
    ``group`` is the entry-point group whose entries it also lists (after its own)."""

    def __init__(self, what: str, group: str | None = None) -> None:
        self.what = what
        self.group = group
        self._entries: dict[str, T | str] = {}
        self._options: dict[str, str] = {}
        self._plugins: dict[str, Plugin] = {}
        self._scanned: tuple[tuple[EntryPoint, str], ...] | None = None

    def register(self, name: str, entry: T | str | None = None, *, options: str | None = None) -> Callable[[T], T]:
        """Register ``entry`` (an object, or ``"module:attr"`` to import on first use) under ``name``.

        Without ``entry`` it returns a decorator: ``@REG.register("name")``. ``options``
        (``"module:attr"``) names the entry's options model where importing the entry itself is
        heavy, so that a config section can list its options without importing it (the entry's
        ``Options`` must be that model: the contract tests check it).
        """
        if options is not None:
            self._options[name] = options
        if entry is not None:
            self._add(name, entry)

        def decorate(obj: T) -> T:
            self._add(name, obj)
            return obj

        return decorate

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a part for a while)."""
        self._entries.pop(name, None)
        self._options.pop(name, None)
        self._plugins.pop(name, None)

    def options_entry(self, name: str) -> str | None:
        """The ``"module:attr"`` of ``name``'s options model given at registration, if any."""
        return self._options.get(name)

    def _add(self, name: str, entry: T | str) -> None:
        current = self._entries.get(name)
        if current is not None and not isinstance(current, str) and current is not entry:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        if isinstance(current, str) or current is None or not isinstance(entry, str):
            self._entries[name] = entry

    def _scan(self) -> None:
        """Add the entry points of ``group`` not registered yet (a built-in name wins)."""
        if self.group is None:
            return
        installed = _installed_entry_points()
        if installed is self._scanned:
            return
        self._scanned = installed
        for gone in [n for n, p in self._plugins.items() if (p.group, p.name, p.value) not in _keys(installed)]:
            self.unregister(gone)  # its package was uninstalled (or its folder left sys.path)
        for ep, package in installed:
            if ep.group == self.group and ep.name not in self._entries:
                self._entries[ep.name] = ep.value
                self._plugins[ep.name] = Plugin(package, ep.group, ep.name, ep.value)

    def names(self) -> list[str]:
        self._scan()
        return list(self._entries)

    def plugin(self, name: str) -> Plugin | None:
        """Where ``name`` came from when an installed package registered it, else None."""
        self._scan()
        return self._plugins.get(name)

    def __contains__(self, name: object) -> bool:
        self._scan()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check(self, name: str) -> str:
        """``name`` if registered, else a :class:`UserError` listing the known names."""
        if name not in self:
            known = ", ".join(self._entries)
            raise UserError(f"unknown {self.what} {name!r}{closest(name, self.names())}; known: {known}")
        return name

    def get(self, name: str) -> T:
        """The entry registered under ``name`` (imported now if it was registered lazily); a plugin
        that fails to import is a one-line error naming its package and entry point."""
        entry = self._entries[self.check(name)]
        if not isinstance(entry, str):
            return entry
        plugin = self._plugins.get(name)
        if plugin is None:
            loaded: T = import_entry(entry)  # type: ignore[assignment]
        else:
            try:
                loaded = import_entry(entry)  # type: ignore[assignment]
            except Exception as exc:  # any failure inside a third-party module means the same here
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                raise UserError(
                    f"{self.what} {name!r} from plugin {plugin} failed to import: "
                    f"{type(exc).__name__}{': ' + reason if reason else ''}"
                ) from None
        self._entries[name] = loaded
        return loaded

    def loadable(self, warn: Callable[[str], None]) -> Iterator[tuple[str, T]]:
        """Every entry that loads, in order; a plugin that does not is reported through ``warn``
        (one line) and left out, so that one broken package cannot take the rest down."""
        for name in self.names():
            loaded = self.get_or_warn(name, warn)
            if loaded is not None:
                yield name, loaded

    def get_or_warn(self, name: str, warn: Callable[[str], None]) -> T | None:
        """:meth:`get`, except that a plugin that fails to import is one line through ``warn``
        and None."""
        try:
            return self.get(name)
        except UserError as exc:
            if self.plugin(name) is None:
                raise
            warn(f"warning: {exc}; left out")
            return None
