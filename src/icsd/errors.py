"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """Bad input, a missing file, an impossible setting: something the user must change."""

    exit_code = 2


def write_failure_reason(exc: BaseException | None) -> str | None:
    """Why a write failed when ``exc`` (or an error it was raised from) means the disk is full, a
    file-size limit was hit or the disk refused the write, e.g. ``No space left on device``; else None."""
    import errno
    import os
    import sqlite3

    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in codes:
            return os.strerror(exc.errno) + (f": {exc.filename}" if exc.filename else "")
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in (
            sqlite3.SQLITE_FULL,
            sqlite3.SQLITE_IOERR,
        ):
            return f"SQLite: {exc}"
        exc = exc.__cause__ or exc.__context__
    return None


def examples_text(items: Iterable[Any], n: int = 3) -> str:
    """The first ``n`` of ``items`` as reprs for an error message, with ``...`` when there are more."""
    shown = list(items)
    return ", ".join(repr(x) for x in shown[:n]) + (", ..." if len(shown) > n else "")
