"""Helpers for the summarize tests: run directories of real COCO candidate sets and a scripted
chat-completions server that answers per group."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icsd.records import Candidate, Caption, to_table
from icsd.store import RunDir, write_parquet
from icsd.testing.chat_server import Reply, user_text

_FIRST_LINE = re.compile(r"^\s*1\.\s+(.*)$", re.MULTILINE)


def coco_groups(captions_json: Path, groups: int, k: int = 8) -> tuple[list[Caption], list[Candidate]]:
    """``groups`` candidate sets from real COCO captions: the five captions of one image, then
    captions of the next images, so every set mixes one scene with others (head texts unique)."""
    data = json.loads(captions_json.read_text())
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    images = sorted(by_image)[: groups + k]
    captions = [
        Caption(caption_id=str(a["id"]), text=a["caption"].strip(), source="coco", image_id=str(img))
        for img in images
        for a in sorted(by_image[img], key=lambda a: a["id"])
    ]
    per_image = {img: [str(a["id"]) for a in sorted(by_image[img], key=lambda a: a["id"])] for img in images}
    candidates = []
    for g in range(groups):
        own = per_image[images[g]][:5]
        others = [per_image[images[g + 1 + j]][0] for j in range(k - len(own))]
        members = own + others
        candidates.append(Candidate(group_id=members[0], member_ids=members, scores=[1.0 - 0.01 * i for i in range(k)]))
    return captions, candidates


def write_run(root: Path, captions: list[Caption], candidates: list[Candidate]) -> RunDir:
    run = RunDir.at(root)
    write_parquet(to_table(captions, Caption), run.captions)
    write_parquet(to_table(candidates, Candidate), run.candidates)
    return run


# In a scripted answer, stands for the text of the first caption it selects (filled in by
# ScriptedResponder), so that the summary shares words with what it selected.
SELECTED_CAPTION = "@selected-caption@"


def answer(index: list[int], summary: str = SELECTED_CAPTION, request: dict[str, Any] | None = None) -> str:
    """A JSON answer; with ``request``, ``SELECTED_CAPTION`` is filled in at once (else by ScriptedResponder)."""
    content = json.dumps({"index": index, "summary": summary})
    return content if request is None else str(fill_summary(content, request))


def captions_of(request: dict[str, Any]) -> list[str]:
    """The caption texts of a prompt's last numbered list (``1. text``), in order."""
    items: list[str] = []
    for number, text in re.findall(r"^\s*(\d+)\.\s+(.*)$", user_text(request), re.MULTILINE):
        items = [text.strip()] if number == "1" else items + [text.strip()]
    return items


def fill_summary(content: str | None, request: dict[str, Any]) -> str | None:
    """``content`` with ``SELECTED_CAPTION`` replaced by the first selected caption's text."""
    if content is None or SELECTED_CAPTION not in content:
        return content
    found = re.search(r'"index": \[(\d+)', content)
    captions = captions_of(request)
    pick = int(found.group(1)) if found else 1
    text = captions[pick - 1] if 1 <= pick <= len(captions) else (captions[0] if captions else "a scene")
    return content.replace(SELECTED_CAPTION, json.dumps(text)[1:-1])


class ScriptedResponder:
    """Answers each request with the next reply scripted for its group (found from the first
    caption line); the last reply repeats. Logs every request with its time."""

    def __init__(self, head_text_to_group: dict[str, str], scripts: dict[str, list[Reply]], default: Reply) -> None:
        self.head = head_text_to_group
        self.scripts = scripts
        self.default = default
        self.log: list[tuple[str, float, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def group_of(self, request: dict[str, Any]) -> str:
        lines = {m.strip() for m in _FIRST_LINE.findall(user_text(request))}
        return next((self.head[t] for t in lines if t in self.head), "?")

    def __call__(self, request: dict[str, Any]) -> Reply:
        group = self.group_of(request)
        with self._lock:
            seen = sum(1 for g, _, _ in self.log if g == group)
            self.log.append((group, time.monotonic(), request))
        script = self.scripts.get(group, [self.default])
        template = script[min(seen, len(script) - 1)]
        return Reply(
            status=template.status,
            content=fill_summary(template.content, request),
            headers=dict(template.headers),
            delay=template.delay,
            drop=template.drop,
            body=template.body,
        )

    def requests_for(self, group: str) -> int:
        return sum(1 for g, _, _ in self.log if g == group)

    def times_for(self, group: str) -> list[float]:
        return [t for g, t, _ in self.log if g == group]


def head_map(captions: list[Caption], candidates: list[Candidate]) -> dict[str, str]:
    text = {c.caption_id: c.text for c in captions}
    return {text[c.member_ids[0]]: c.group_id for c in candidates}


Respond = Callable[[dict[str, Any]], Reply]
