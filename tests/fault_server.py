"""A chat-completions server that misbehaves by plan, run in its own process by the load test.

Every request's group is found from its first numbered caption; the reply is a pure function of
(group, attempt): HTTP 500, HTTP 429 with ``Retry-After: 1``, a dropped connection, an answer
slower than the client's timeout, or a valid answer naming the group. ``GET /faults`` returns what
was served to each group and when.

    python tests/fault_server.py CAPTIONS_PARQUET PORT_FILE
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from icsd.testing.chat_server import ChatServer, Reply, user_text

RATES = (("500", 0.05), ("429", 0.02), ("drop", 0.01), ("slow", 0.01))
SLOW = 2.5  # seconds; the client's timeout is shorter
ALWAYS_500 = frozenset(f"g{i:05d}" for i in range(7, 10_000, 1000))
ALWAYS_DROP = frozenset(f"g{i:05d}" for i in range(3, 10_000, 1000))
_NUMBERED_FIRST = re.compile(r"^1\. (.*)$", re.MULTILINE)


def planned(group: str, attempt: int) -> str:
    """The fault (or "ok") the server gives ``group`` on its ``attempt``-th request (from 0)."""
    if group in ALWAYS_500:
        return "500"
    if group in ALWAYS_DROP:
        return "drop"
    u = int.from_bytes(hashlib.sha256(f"{group}:{attempt}".encode()).digest()[:8], "big") / 2**64
    for kind, rate in RATES:
        if u < rate:
            return kind
        u -= rate
    return "ok"


class FaultyResponder:
    def __init__(self, head_to_group: dict[str, str]) -> None:
        self.head = head_to_group
        self.served: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.injected: Counter[str] = Counter()
        self.unknown = 0
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> Reply:
        heads = _NUMBERED_FIRST.findall(user_text(request))
        group = self.head.get(heads[-1].strip()) if heads else None
        if group is None:
            self.unknown += 1
            return Reply(status=400, content="unknown group")
        with self._lock:
            kind = planned(group, len(self.served[group]))
            self.served[group].append((time.monotonic(), kind))
            self.injected[kind] += 1
        if kind == "500":
            return Reply(status=500, content="injected server error")
        if kind == "429":
            return Reply(status=429, content="injected rate limit", headers={"Retry-After": "1"})
        if kind == "drop":
            return Reply(drop=True)
        answer = json.dumps({"index": [1, 2, 3, 4, 5], "summary": f"The scene of {group}: {heads[-1].strip()}"})
        return Reply(content=answer, delay=SLOW if kind == "slow" else 0.0)

    def report(self) -> dict[str, Any]:
        return {"served": self.served, "injected": self.injected, "unknown": self.unknown}


class FaultServer(ChatServer):
    def __init__(self, responder: FaultyResponder) -> None:
        super().__init__(responder)
        self.faulty = responder
        self.keep_requests = False

    def _route(self, method: str, path: str, body: bytes) -> Reply:
        if method == "GET" and path.rstrip("/") == "/faults":
            return Reply(body=self.faulty.report())
        return super()._route(method, path, body)


def main(captions: str, port_file: str) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(captions, columns=["caption_id", "text"])
    heads = {t: "g" + c[1:] for c, t in zip(table.column("caption_id").to_pylist(), table.column("text").to_pylist(), strict=True)}
    server = FaultServer(FaultyResponder(heads)).start()
    Path(port_file).write_text(str(server.port))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
