"""A persistent cache of LLM answers keyed by the exact request (SQLite, text only).

The key hashes the model, the generation parameters, the messages and the answer schema, so an
identical request is answered without asking the model again. Only answers the transport
delivered are stored; failures never are.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .base import ChatRequest


def request_key(model: str, params: dict[str, Any], request: ChatRequest) -> str:
    fields: dict[str, Any] = {"model": model, "params": params, "messages": list(request.messages), "schema": request.schema}
    if request.seed is not None:  # absent otherwise: keys of unseeded requests stay as they were
        fields["seed"] = request.seed
    payload = json.dumps(
        fields,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class LLMCache:
    """``get``/``put`` answers by request key. Puts are buffered and written in one transaction
    by :meth:`commit` (called when a part is flushed), so the hot path never waits on SQLite."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers ("
            "key TEXT PRIMARY KEY, text TEXT NOT NULL, model TEXT NOT NULL, created REAL NOT NULL)"
        )
        self._db.commit()
        self._pending: dict[str, tuple[str, str, float]] = {}

    def __len__(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()
            return int(row[0]) + sum(1 for k in self._pending if not self._stored(k))

    def _stored(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM answers WHERE key = ?", (key,)).fetchone() is not None

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._pending:
                return self._pending[key][0]
            row = self._db.execute("SELECT text FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, text: str, model: str) -> None:
        with self._lock:
            self._pending[key] = (text, model, time.time())

    def commit(self) -> None:
        with self._lock:
            if not self._pending:
                return
            rows = [(k, t, m, c) for k, (t, m, c) in self._pending.items()]
            self._db.executemany(
                "INSERT OR REPLACE INTO answers (key, text, model, created) VALUES (?, ?, ?, ?)", rows
            )
            self._db.commit()
            self._pending.clear()

    def close(self) -> None:
        self.commit()
        with self._lock:
            self._db.close()

    def __enter__(self) -> LLMCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
