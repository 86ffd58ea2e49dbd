"""How ``configs/icsd_coco.yaml`` relates to the official ICSD code (github FeipengMa6/ICSD).

One table, aspect by aspect: what the official code does (file and line), the paper config's
settings, icsd's default elsewhere where it differs, and why. The rows are the package data file
``tables/fidelity.json`` (:func:`rows`, also ``ROWS``). Rows with ``settings`` are checked
against the resolved paper config by the test suite, and ``docs/fidelity.md`` is generated from
this table (``python -m icsd.fidelity > docs/fidelity.md``; a test fails when the file is stale),
so the document cannot drift from the code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

PAPER_CONFIG = "configs/icsd_coco.yaml"


@dataclass(frozen=True)
class Row:
    aspect: str
    official: str
    where: str
    icsd: str
    settings: dict[str, Any] = field(default_factory=dict)
    default_elsewhere: str = "same"
    why: str = ""
    #: match: the paper config does what the official code does (``settings`` hold it) |
    #: deviation: it does not (``restore`` names the setting that would, or is empty) |
    #: inconsistent: the official code contradicts itself here
    kind: str = "match"
    restore: str = ""


TABLE = "tables/fidelity.json"
"""The rows, in order, as a package data file: one object per row with :class:`Row`'s fields
(fields at their default left out)."""


@lru_cache(maxsize=1)
def rows() -> tuple[Row, ...]:
    """The table's rows, read from :data:`TABLE` on first use."""
    text = resources.files("icsd").joinpath(TABLE).read_text(encoding="utf-8")
    return tuple(Row(**item) for item in json.loads(text))


def __getattr__(name: str) -> Any:
    if name == "ROWS":
        return rows()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolved_paper_values(root: Path) -> dict[str, Any]:
    """Every dotted key of the resolved paper config."""
    from .config import leaves, resolve

    return leaves(resolve(root / PAPER_CONFIG).config.model_dump(mode="json"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _settings(settings: dict[str, Any]) -> str:
    return "<br>".join(f"`{k}: {json.dumps(v)}`" for k, v in settings.items())


def kind_cell(row: Row) -> str:
    """match | deviation (and what restores the official behaviour) | official code inconsistent."""
    if row.kind == "deviation":
        return f"deviation (restore: {row.restore})" if row.restore else "deviation (no setting restores it)"
    return "official code inconsistent" if row.kind == "inconsistent" else row.kind


def markdown() -> str:
    """docs/fidelity.md."""
    lines = [
        "# Fidelity: the paper config against the official code",
        "",
        "`configs/icsd_coco.yaml` reproduces the official ICSD code (github FeipengMa6/ICSD) by default.",
        "This table lists every aspect, the official code's file and line (at the repository's HEAD), the",
        "settings of the paper config (checked against the resolved config by `tests/test_fidelity.py`),",
        "icsd's default elsewhere when it differs, and why. *match*: the paper config does what the",
        "official code does; *deviation*: it does not, on purpose, with its reason and the setting that",
        "would restore the official behaviour, if any; *official code inconsistent*: the official code",
        "contradicts itself, so no single behaviour can be reproduced.",
        "",
        "Generated from `src/icsd/tables/fidelity.json` by `src/icsd/fidelity.py` (`python -m icsd.fidelity > docs/fidelity.md`).",
        "",
        "| aspect | official code | where | icsd paper config | settings | default elsewhere | kind | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows():
        cells = [r.aspect, r.official, r.where, r.icsd, _settings(r.settings), r.default_elsewhere, kind_cell(r), r.why]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
