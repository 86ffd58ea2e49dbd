"""What a stage's rehearsal hooks see (``StageSpec.rehearsal``): one :class:`StageRehearsal` per
stage, handed to its three hooks in turn.

- ``models(ctx)``: the models the stage loads (:meth:`StageRehearsal.need`); each is built at its
  published architecture with random weights and the stage's setting is pointed at the folder.
- ``reduce(ctx)``: cut ``ctx.config`` (the stage's block of the rehearsal's copy of the config) to
  a slice (:meth:`StageRehearsal.reduced` says what, :meth:`StageRehearsal.substituted` what stood
  in for missing data); ``ctx.configured`` is the block as configured.
- ``project(ctx)``: after the stage ran, its row of the table (:meth:`StageRehearsal.row`) from
  ``ctx.record`` (seconds, memory, timed model calls) and the full run's sizes in ``ctx.sizes``,
  which earlier stages filled in and later ones read (``captions``, ``prompts``, ``images``,
  ``pairs``, ...; each a :class:`Size` with where it comes from).

A stage without hooks is run as configured and projected "as measured".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import PipelineConfig, RehearseConfig
    from ..data.check import PathCheck
    from ..store import RunDir


@dataclass
class Probe:
    """Time spent inside one kind of model call (UNet forward, generate, ...) and its items."""

    seconds: float = 0.0
    calls: int = 0
    items: int = 0


@dataclass
class StageRecord:
    """What the rehearsal measured while a stage ran."""

    stage: str
    seconds: float
    peak_rss: int
    baseline_rss: int
    cuda_peak: int | None
    probes: dict[str, Probe]
    summary: str
    counts: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0


@dataclass
class ModelUse:
    role: str  # what the report calls it
    key: str  # the setting it comes from (stage.field)
    model_id: str
    use: str  # embed | vision | text | render
    source: str = "built"  # built | local (a folder given in the config)
    built: Any = None

    @property
    def path(self) -> str:
        return str(self.built.path) if self.built is not None else self.model_id


@dataclass(frozen=True)
class Size:
    """A size of the full run and where the number comes from."""

    value: float
    source: str


@dataclass
class Row:
    """One stage of the table."""

    stage: str
    architecture: str
    parameters: int | None
    settings: dict[str, Any]
    unit: str
    units: int
    seconds: float
    cpu_seconds: float
    seconds_per_unit: float | None
    peak_rss: int
    peak_rss_configured: int | None
    cuda_peak: int | None
    full_units: int | None
    projected_seconds: float | None
    projection: str

    def cells(self) -> list[str]:
        params = f"{self.parameters / 1e6:.1f}M" if self.parameters else "-"
        spu = fmt_seconds(self.seconds_per_unit) if self.seconds_per_unit is not None else "-"
        full = f"{self.full_units:,}" if self.full_units is not None else "-"
        conf = gib(self.peak_rss_configured) if self.peak_rss_configured else "-"
        return [self.stage, self.architecture, params, f"{self.units} {self.unit}", fmt_seconds(self.seconds),
                fmt_seconds(self.cpu_seconds),
                f"{spu}/{self.unit}", gib(self.peak_rss), conf, full, fmt_seconds(self.projected_seconds)]  # fmt: skip


@dataclass
class StageRehearsal:
    """One stage's part of a rehearsal (see the module's docstring)."""

    name: str
    configured: Any  # the stage's block as configured
    full: PipelineConfig  # the whole configured config
    options: RehearseConfig
    checks: list[PathCheck]
    on_gpu: bool
    resources: contextlib.ExitStack  # closed when every stage has run (servers, patches)
    sizes: dict[str, Size]  # shared by the stages, filled in chain order by ``project``
    config: Any = None  # the stage's block of the rehearsal's copy (set before ``reduce``)
    rehearsal: Any = None  # the whole rehearsal copy
    uses: list[ModelUse] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reductions: list[str] = field(default_factory=list)
    substitutions: list[str] = field(default_factory=list)
    memo: dict[str, Any] = field(default_factory=dict)  # the stage's own state between its hooks
    document: dict[str, Any] = field(default_factory=dict)  # extra entries of rehearsal.json
    findings: list[str] = field(default_factory=list)  # lines of the printed plan (checks it made)
    record: StageRecord | None = None  # set before ``project``
    run_dir: Path | None = None

    # ``models``
    def need(self, role: str, setting: str, model_id: str, use: str) -> None:
        """The stage loads ``model_id`` through its setting ``setting``: a local folder is used as
        it is, a hub id is built with random weights and the setting pointed at the folder."""
        from ..backends.embedders import resolve_model_path

        key = f"{self.name}.{setting}"
        local = Path(resolve_model_path(model_id)).expanduser()
        if local.exists():
            self.notes.append(f"{key}: {model_id} is a local model; used as it is")
            self.uses.append(ModelUse(role, key, str(local), use, "local"))
        else:
            self.uses.append(ModelUse(role, key, model_id, use))

    def note(self, text: str) -> None:
        self.notes.append(f"{self.name}: {text}")

    # ``reduce``
    def reduced(self, text: str) -> None:
        self.reductions.append(f"{self.name}: {text}")

    def substituted(self, text: str) -> None:
        self.substitutions.append(text)

    def exists(self, setting: str) -> bool:
        """Whether the path the configured ``setting`` names is here and readable."""
        from ..data.check import exists

        return exists(self.checks, f"{self.name}.{setting}")

    # ``project``
    def architecture(self, *settings: str) -> tuple[str, int | None]:
        """The title and parameters of the models behind ``settings``."""
        keys = [f"{self.name}.{s}" for s in settings]
        parts = [u for k in keys for u in self.uses if u.key == k]
        titles = [u.built.title if u.built is not None else f"{u.model_id} ({u.source})" for u in parts]
        params = [u.built.total_parameters for u in parts if u.built is not None]
        return " + ".join(titles) or "-", (sum(params) if params else None)

    def probe(self, name: str) -> Probe:
        assert self.record is not None
        return self.record.probes.get(name) or Probe()

    def row(self, **values: Any) -> Row:
        """The stage's row: what was measured, with ``values`` (unit, units, settings, ...)."""
        rec = self.record
        assert rec is not None
        base: dict[str, Any] = dict(
            stage=self.name, seconds=round(rec.seconds, 2), cpu_seconds=round(rec.cpu_seconds, 1),
            peak_rss=rec.peak_rss, cuda_peak=rec.cuda_peak, peak_rss_configured=None, parameters=None,
            architecture="-", settings={}, unit="run", units=1, seconds_per_unit=rec.seconds, full_units=1,
            projected_seconds=rec.seconds, projection="as measured",
        )  # fmt: skip
        return Row(**{**base, **values})

    @property
    def run(self) -> RunDir:
        from ..store import RunDir

        assert self.run_dir is not None
        return RunDir.at(self.run_dir)

    def size(self, key: str) -> float | None:
        found = self.sizes.get(key)
        return found.value if found is not None else None


# ----------------------------------------------------------------------------- helpers for hooks


def per(seconds: float, units: float) -> float | None:
    return seconds / units if units else None


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 10 * 86400:
        return f"{s / 86400:,.0f} d"
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s" if s >= 0.1 else f"{s * 1000:.0f} ms"


def extrapolate_memory(rec: StageRecord, fixed_bytes: int, rehearsal_batch: int, batch: int) -> int:
    """Peak memory at the configured batch: what the stage added over its start, split into a
    part that does not grow with the batch (weights, gradients, optimizer state) and the rest
    (activations), which grows linearly."""
    added = max(0, rec.peak_rss - rec.baseline_rss)
    per_item = max(0, added - fixed_bytes) / max(1, rehearsal_batch)
    return int(rec.baseline_rss + fixed_bytes + per_item * batch)


def parquet_rows(path: Path) -> int:
    if not path.exists():
        return 0
    import pyarrow.parquet as pq

    if path.is_dir():
        return sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(path.glob("*.parquet")))
    return int(pq.ParquetFile(path).metadata.num_rows)


def inline_executor(ctx: StageRehearsal) -> None:
    """A stage that would run on Ray runs inline (no cluster here)."""
    if getattr(ctx.config, "executor", None) == "ray":
        ctx.config.executor = "inline"
        ctx.reduced("inline executor instead of Ray (no cluster here)")
