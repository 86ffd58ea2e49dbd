"""One module per pipeline stage; each exports one :class:`~icsd.stages._base.StageSpec` named ``SPEC``.

A stage reads only what earlier stages wrote in the run directory (through :mod:`icsd.records`
and :mod:`icsd.store`) and never imports another stage. The order of the registrations below is
the order of the chain; stages of installed plugins (entry-point group ``icsd.stages``) come after
them. The whole-chain config (:func:`icsd.config.pipeline_model`), the CLI's stage commands,
``icsd config show``, ``icsd run`` (skip logic, ``--from/--to``, ``--force``), the manifest and the
report all derive from these specs. Adding a stage is its module plus one line here (or an entry
point in another package).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..registry import Registry

if TYPE_CHECKING:
    from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage  # noqa: F401 (see __getattr__)

STAGES: Registry[StageSpec] = Registry("stage", "icsd.stages")
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

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


def loaded_specs() -> list[StageSpec]:
    """The specs of every stage that loads, in chain order; a plugin stage that fails to import is
    one warning line on stderr and is left out of the chain and the commands."""
    return [spec for _, spec in STAGES.loadable(_warn_once)]


def stage_names() -> tuple[str, ...]:
    """The stages in chain order."""
    return tuple(spec.name for spec in loaded_specs())


def stage_spec(name: str) -> StageSpec:
    """The spec of stage ``name`` (imports its module); an unknown name is a one-line error."""
    return STAGES.get(name)


_PUBLIC = ("RehearsalHooks", "StageResult", "StageSpec", "Timer", "finish_stage")


def __getattr__(name: str) -> object:
    """What a stage module needs, importable as ``from icsd.stages import StageSpec, ...`` (loaded
    on first use, so that listing the stages stays light)."""
    if name in _PUBLIC:
        from . import _base

        return getattr(_base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
