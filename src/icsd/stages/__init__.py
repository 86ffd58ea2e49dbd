"""One module per pipeline stage; each exports one :class:`~icsd.stages._base.StageSpec` named ``SPEC``.

A stage reads only what earlier stages wrote in the run directory (through :mod:`icsd.records`
and :mod:`icsd.store`) and never imports another stage. The order of the registrations below is
the order of the chain; the CLI's stage commands, ``icsd run`` (skip logic, ``--from/--to``,
``--force``), the manifest and the report all derive from these specs. Adding a stage is its
module plus one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import Registry

if TYPE_CHECKING:
    from ._base import StageSpec

STAGES: Registry[StageSpec] = Registry("stage")
STAGES.register("ingest", "icsd.stages.ingest:SPEC")
STAGES.register("embed", "icsd.stages.embed:SPEC")
STAGES.register("group", "icsd.stages.group:SPEC")
STAGES.register("summarize", "icsd.stages.summarize:SPEC")
STAGES.register("render", "icsd.stages.render:SPEC")
STAGES.register("score", "icsd.stages.score:SPEC")
STAGES.register("pairs", "icsd.stages.pairs:SPEC")
STAGES.register("train", "icsd.stages.train:SPEC")
STAGES.register("evaluate", "icsd.stages.evaluate:SPEC")
STAGES.register("report", "icsd.stages.report:SPEC")


def stage_names() -> tuple[str, ...]:
    """The stages in chain order."""
    return tuple(STAGES.names())


def stage_spec(name: str) -> StageSpec:
    """The spec of stage ``name`` (imports its module); an unknown name is a one-line error."""
    return STAGES.get(name)
