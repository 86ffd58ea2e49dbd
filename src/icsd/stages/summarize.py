"""Step 4 of the method: ask an LLM to select captions of one scene and summarise them.

Reads ``RUN/candidates.parquet`` (and the texts from ``RUN/captions.parquet``), writes one
:class:`~icsd.records.Selection` per candidate set into append-only parts with done-markers under
``RUN/selections/`` and, at the end of every run, the consolidated ``RUN/selections.parquet``.

Resume is per group: a rerun skips groups that already have a record made with the same model
and prompt; ``--retry`` also redoes those whose record is not ``ok``, asking with a new seed
(``seed`` + the group's earlier attempts) so that a server that honours seeds answers anew.
Identical requests are answered from ``RUN/cache/llm.sqlite`` without the model.

``--mode remap`` asks no model: as the official ``preprocess/remapping.py``, each group's first
``n`` candidates (head first) are paired with the image of the head caption, and a group whose
first ``n`` are those of an earlier group is dropped.

How the work runs: the ``openai`` backend drives its async client in this process (one event
loop holds thousands of requests in flight; more processes would add nothing but a shared cache
to coordinate), streaming answers into parts as they arrive. Local models (``transformers``,
``vllm``) stream the same way inline; with ``--executor process|ray`` each part becomes a
:class:`~icsd.executor.ShardTask` and one worker per GPU loads the model once.
"""

from __future__ import annotations

import contextlib
import fcntl
import queue
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import SummarizeConfig
from ..console import progress_bar
from ..errors import UserError
from ..executor import ShardTask, count_workers, device_for_worker, run_tasks
from ..llm import LLM_BACKENDS, ChatAnswer, ChatBackend, ChatRequest, LLMOptions, make_backend
from ..llm.answers import judge_answer
from ..llm.cache import LLMCache, request_key
from ..llm.prompts import (
    PromptSettings,
    PromptTemplate,
    answer_schema,
    compile_template,
    load_template,
    shown_candidates,
)
from ..records import SELECTION_STATUSES, SELECTIONS_SCHEMA, Selection, from_table
from ..store import RunDir, hash_text, is_done, mark_done, read_parquet, remove_stale_parts, write_parquet
from ._base import RehearsalHooks, StageResult, StageSpec, Timer, finish_stage, multi_context

if TYPE_CHECKING:
    from ..rehearse.hooks import Row, StageRehearsal

STAGE = "summarize"
PART_PATTERN = "part-*.parquet"
FLUSH_SECONDS = 120.0
_PART_NAME = re.compile(r"^part-(\d+)\.parquet$")


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Groups:
    """The candidate sets in file order, and the caption texts they refer to."""

    ids: list[str]
    members: list[list[str]]
    texts: dict[str, str]


def read_groups(run: RunDir) -> Groups:
    if not run.candidates.exists():
        raise UserError(f"candidates not found: {run.candidates} (run `icsd group --run {run.root}` first)")
    cand = read_parquet(run.candidates, "candidates")
    caps = read_parquet(run.captions, "captions")
    for table, cols, name in ((cand, ("group_id", "member_ids"), "candidates"), (caps, ("caption_id", "text"), "captions")):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise UserError(f"{name}.parquet lacks columns {missing}")
    flat = pc.list_flatten(cand.column("member_ids"))
    unknown = pc.filter(flat, pc.invert(pc.is_in(flat, value_set=caps.column("caption_id"))))
    if len(unknown):
        raise UserError(
            f"candidates.parquet names {len(unknown)} caption ids missing from captions.parquet, "
            f"e.g. {unknown[0].as_py()!r}: rerun `icsd group`"
        )
    ids = [str(g) for g in cand.column("group_id").to_pylist()]
    members = cand.column("member_ids").to_pylist()
    texts = dict(zip(caps.column("caption_id").to_pylist(), caps.column("text").to_pylist(), strict=True))
    return Groups(ids=ids, members=members, texts=texts)


def sample_note(chosen: int, total: int, cfg: SummarizeConfig) -> list[str]:
    """What a user must know when only part of the candidate sets is sent: how many, and how to send all."""
    if chosen >= total:
        return []
    keys = [k for k in ("sample", "limit") if getattr(cfg, k) is not None]
    told = ", ".join(f"{STAGE}.{k} {getattr(cfg, k)}" for k in keys)
    send_all = " ".join(f"--{STAGE}.{k} null" for k in keys)
    return [f"note: {STAGE} sends a sample: {chosen:,} of {total:,} candidate sets ({told}; {send_all} sends all)"]


def choose_groups(count: int, *, limit: int | None, sample: int | None, seed: int) -> list[int]:
    """Indices of the groups to work on: a seeded random sample (in file order), then the first ``limit``."""
    chosen: list[int] = list(range(count))
    if sample is not None and sample < count:
        rng = np.random.default_rng(seed)
        chosen = sorted(int(i) for i in rng.choice(count, size=sample, replace=False))
    return chosen[:limit] if limit is not None else chosen


# ----------------------------------------------------------------------------- parts


def part_index(path: Path) -> int:
    m = _PART_NAME.match(path.name)
    return int(m.group(1)) if m else -1


def done_parts(folder: Path) -> list[Path]:
    parts = [p for p in folder.glob(PART_PATTERN) if part_index(p) >= 0 and is_done(p)]
    return sorted(parts, key=part_index)


def next_part_index(folder: Path) -> int:
    indices = [part_index(p) for p in folder.glob(PART_PATTERN)]
    return max(indices, default=-1) + 1


def latest_table(folder: Path) -> pa.Table:
    """The latest record of every group in the done parts (later parts win), columnar."""
    parts = done_parts(folder)
    if not parts:
        return SELECTIONS_SCHEMA.empty_table()
    tables = [read_parquet(p, "selections part").select(SELECTIONS_SCHEMA.names).cast(SELECTIONS_SCHEMA) for p in parts]
    table = pa.concat_tables(tables).combine_chunks()
    rows = pa.table({"group_id": table["group_id"], "row": pa.array(np.arange(table.num_rows, dtype=np.int64))})
    last = rows.group_by("group_id").aggregate([("row", "max")])["row_max"]
    return table.take(pa.array(np.sort(last.to_numpy())))


def read_records(folder: Path) -> dict[str, Selection]:
    """The latest record of every group found in the done parts."""
    return {r.group_id: r for r in from_table(latest_table(folder), Selection)}


@dataclass(frozen=True)
class Prior:
    """What a rerun needs to know of a group's latest record."""

    status: str
    model: str
    prompt_hash: str


def priors(latest: pa.Table) -> dict[str, Prior]:
    cols = [latest[c].to_pylist() for c in ("group_id", "status", "model", "prompt_hash")]
    return {g: Prior(s, m, h) for g, s, m, h in zip(*cols, strict=True)}


def selections_table(records: Sequence[Selection]) -> pa.Table:
    """Records to an Arrow table with ``SELECTIONS_SCHEMA`` (column by column: parts hold up to
    thousands of records and are written many times per run)."""
    columns = {name: [getattr(r, name) for r in records] for name in SELECTIONS_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SELECTIONS_SCHEMA)


def part_path(folder: Path, index: int) -> Path:
    return folder / f"part-{index:05d}.parquet"


def write_part(path: Path, records: Sequence[Selection], info: dict[str, Any]) -> dict[str, Any]:
    """Write one part, then its done-marker (last, so a crash never leaves a false 'done')."""
    write_parquet(selections_table(records), path)
    statuses = Counter(r.status for r in records)
    return mark_done(path, {**info, "records": len(records), "statuses": dict(statuses)})


class PartWriter:
    """Collects records and writes a part every ``part_size`` records or ``FLUSH_SECONDS``."""

    def __init__(
        self, folder: Path, start: int, part_size: int, info: dict[str, Any], on_flush: Callable[[], None]
    ) -> None:
        self.folder = folder
        self.index = start
        self.part_size = part_size
        self.info = info
        self.on_flush = on_flush
        self.buffer: list[Selection] = []
        self.last_flush = time.monotonic()
        self.parts = 0

    def add(self, record: Selection) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.part_size or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.buffer:
            return
        self.on_flush()
        write_part(part_path(self.folder, self.index), self.buffer, self.info)
        self.index += 1
        self.parts += 1
        self.buffer = []


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """One summarize run per run directory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `icsd summarize` is writing {folder}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- requests and records


@dataclass(frozen=True)
class WorkItem:
    group_id: str
    shown_ids: list[str]
    texts: list[str]
    use_cache: bool
    seed: int | None = None


@dataclass
class Job:
    """What turns a work item into a request, and an answer into a record."""

    template: PromptTemplate
    model: str
    params: dict[str, Any]

    @property
    def settings(self) -> PromptSettings:
        return self.template.settings

    def request(self, item: WorkItem) -> ChatRequest:
        content = self.template.render(item.texts)
        schema = answer_schema(self.settings, len(item.texts))
        return ChatRequest(messages=({"role": "user", "content": content},), schema=schema, seed=item.seed)

    def key(self, request: ChatRequest) -> str:
        return request_key(self.model, self.params, request)

    def record(self, item: WorkItem, answer: ChatAnswer) -> Selection:
        gid, model, phash = item.group_id, self.model, self.template.hash
        if answer.text is None:
            error = answer.error or "no answer"
            return Selection(gid, "failed", error=error, model=model, prompt_hash=phash, raw="")
        parsed = judge_answer(answer.text, self.settings, item.texts, self.template.render(item.texts))
        selected = [item.shown_ids[i - 1] for i in parsed.indices] if parsed.status == "ok" else []
        return Selection(
            gid, parsed.status, selected, parsed.summary, parsed.error, model=model, prompt_hash=phash, raw=answer.text
        )


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    cached: int = 0
    completion_tokens: int = 0

    def add(self, other: dict[str, Any]) -> None:
        self.statuses.update(other.get("statuses", {}))
        self.requests += int(other.get("requests", 0))
        self.cached += int(other.get("cached", 0))
        self.completion_tokens += int(other.get("completion_tokens", 0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "requests": self.requests,
            "cached": self.cached,
            "completion_tokens": self.completion_tokens,
        }


OnRecord = Callable[[Selection, ChatAnswer, bool], None]


def answer_groups(
    keys: Sequence[int],
    make_item: Callable[[int], WorkItem],
    backend: ChatBackend,
    cache: LLMCache,
    job: Job,
    on_record: OnRecord,
) -> None:
    """Answer every item: from the cache where allowed and present, else from the backend.

    ``on_record(record, answer, cached)`` is called once per item, in this thread.
    """
    check_cache = len(cache) > 0
    hits: queue.SimpleQueue[tuple[int, str]] = queue.SimpleQueue()

    # Pulled lazily by the backend (the openai one from its own thread): builds each request,
    # answers it from the cache when it can, and passes only the misses on.
    def requests() -> Iterator[tuple[tuple[int, str], ChatRequest]]:
        for k in keys:
            item = make_item(k)
            request = job.request(item)
            cache_key = job.key(request)
            if check_cache and item.use_cache:
                text = cache.get(cache_key)
                if text is not None:
                    hits.put((k, text))
                    continue
            yield (k, cache_key), request

    def record_hits() -> None:
        while True:
            try:
                k, text = hits.get_nowait()
            except queue.Empty:
                return
            answer = ChatAnswer(text=text, attempts=0)
            on_record(job.record(make_item(k), answer), answer, True)

    for (k, cache_key), answer in backend.stream(requests()):
        record_hits()
        if answer.text is not None:
            cache.put(cache_key, answer.text, job.model)
        on_record(job.record(make_item(k), answer), answer, False)
    record_hits()


class Progress:
    """The progress bar: groups/s and ETA from tqdm, plus requests/s, tokens/s and failures."""

    def __init__(self, total: int, tally: Tally, quiet: bool = False) -> None:
        self.bar = progress_bar(total, STAGE, "group", disable=quiet)
        self.tally = tally
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, record: Selection, answer: ChatAnswer, cached: bool) -> None:
        t = self.tally
        t.statuses[record.status] += 1
        t.cached += int(cached)
        t.requests += int(not cached)
        t.completion_tokens += answer.completion_tokens
        self.bar.update(1)
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            bad = t.statuses["parse_error"] + t.statuses["invalid"]
            self.bar.set_postfix_str(
                f"req/s {t.requests / elapsed:.1f}, tok/s {t.completion_tokens / elapsed:.0f}, "
                f"failed {t.statuses['failed']}, unparsed {bad}, cached {t.cached}",
                refresh=False,
            )

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- process/ray workers


@dataclass
class SummarizeWorkerFactory:
    """Builds, once per worker process, the backend and the job; picklable for spawn and Ray."""

    spec: LLMOptions
    device: str
    template_text: str
    template_source: str
    settings: PromptSettings
    cache_path: str
    info: dict[str, Any]
    verbatim: bool = False

    def __call__(self, index: int) -> Callable[[ShardTask, Callable[[int], None]], dict[str, Any]]:
        spec = self.spec
        if "device" in type(spec).model_fields:  # a local model: this worker's device
            spec = spec.model_copy(update={"device": device_for_worker(self.device, index)})
        backend = make_backend(spec)
        template = compile_template(self.template_text, self.template_source, self.settings, self.verbatim)
        job = Job(template=template, model=backend.model_id, params=backend.params.as_dict())
        cache = LLMCache(self.cache_path)
        info = self.info

        def work(task: ShardTask, progress: Callable[[int], None]) -> dict[str, Any]:
            items: list[WorkItem] = task.payload
            records: list[Selection] = []
            tally = Tally()

            def on_record(rec: Selection, answer: ChatAnswer, cached: bool) -> None:
                records.append(rec)
                tally.statuses[rec.status] += 1
                tally.cached += int(cached)
                tally.requests += int(not cached)
                tally.completion_tokens += answer.completion_tokens
                progress(1)

            answer_groups(range(len(items)), items.__getitem__, backend, cache, job, on_record)
            cache.commit()
            write_part(task.output, records, info)
            return tally.as_dict()

        return work


# ----------------------------------------------------------------------------- the stage


def prompt_settings(cfg: SummarizeConfig) -> PromptSettings:
    if cfg.min_select > cfg.max_select:
        raise UserError(f"min_select ({cfg.min_select}) is larger than max_select ({cfg.max_select})")
    return PromptSettings(
        mode=cfg.mode,
        n=cfg.n,
        min_select=cfg.min_select,
        max_select=cfg.max_select,
        max_words=cfg.max_words,
        answers=cfg.answers,
    )


def attempt_counts(folder: Path) -> Counter[str]:
    """How many records each group has in the done parts: the times it was answered so far."""
    counts: Counter[str] = Counter()
    for part in done_parts(folder):
        counts.update(pq.read_table(part, columns=["group_id"]).column("group_id").to_pylist())
    return counts


def retry_seed(seed: int, attempts: int) -> int:
    """The seed of a group's re-ask after ``attempts`` answers: a new one each round."""
    return seed + attempts


def needs_answer(record: Prior | None, model: str, phash: str, retry: bool) -> bool:
    if record is None or record.model != model or record.prompt_hash != phash:
        return True
    return retry and record.status != "ok"


def consolidate(latest: pa.Table, order: Sequence[str], out: Path) -> Counter[str]:
    """(Re)write the one-row-per-group file, in candidates order, from the latest records."""
    position = pc.index_in(latest["group_id"], value_set=pa.array(list(order), pa.string()))
    known = pc.is_valid(position)
    table = latest.filter(known)
    table = table.take(pc.sort_indices(position.filter(known)))
    write_parquet(table, out)
    counts = pc.value_counts(table["status"]).to_pylist()
    return Counter({c["values"]: c["counts"] for c in counts})


def run(cfg: SummarizeConfig, run: RunDir) -> StageResult:
    timer = Timer()
    settings = prompt_settings(cfg)
    if settings.mode == "remap":
        return run_remap(cfg, run, settings, timer)
    template = load_template(settings, cfg.prompt)
    phash = template.hash
    groups = read_groups(run)
    chosen = choose_groups(len(groups.ids), limit=cfg.limit, sample=cfg.sample, seed=cfg.seed)
    spec: LLMOptions = cfg.options()
    model = spec.model_label()
    folder = run.selection_parts
    notes = sample_note(len(chosen), len(groups.ids), cfg)
    tally = Tally()
    with exclusive(folder):
        keep = {p.name for p in done_parts(folder)}
        remove_stale_parts(folder, keep, PART_PATTERN)
        existing = priors(latest_table(folder))
        todo = [i for i in chosen if needs_answer(existing.get(groups.ids[i]), model, phash, cfg.retry)]
        kept = len(chosen) - len(todo)
        attempts = attempt_counts(folder) if cfg.retry else Counter()

        def make_item(i: int) -> WorkItem:
            gid = groups.ids[i]
            shown = shown_candidates(settings, groups.members[i])
            prior = existing.get(gid)
            use_cache = prior is None or prior.model != model or prior.prompt_hash != phash
            # A re-ask of an answer judged not ok: a new seed, so the server does not repeat it.
            seed = None if use_cache else retry_seed(cfg.seed, attempts[gid])
            return WorkItem(gid, shown, [groups.texts[c] for c in shown], use_cache, seed)

        if cfg.retry and spec.temperature == 0 and any(not make_item(i).use_cache for i in todo):
            notes.append(
                "note: --retry re-asks with a new seed, but temperature 0 decodes greedily, so most servers "
                "answer the same; set --temperature (null: the server's default) for new answers"
            )

        info = {"model": model, "prompt_hash": phash, "backend": cfg.backend}
        described: dict[str, Any] = {"backend": cfg.backend, "model": model}
        if todo:
            cache = LLMCache(run.cache / "llm.sqlite")
            try:
                remote = LLM_BACKENDS.get(cfg.backend).remote
                if cfg.executor != "inline" and not remote:
                    _run_as_tasks(cfg, spec, template, todo, make_item, folder, run.cache, info, tally)
                else:
                    if cfg.executor != "inline":
                        notes.append(f"note: the {cfg.backend} backend runs its client in this process; --executor ignored")
                    described = _run_streaming(cfg, spec, template, todo, make_item, folder, info, cache, tally)
            finally:
                cache.close()
        counts = consolidate(latest_table(folder), groups.ids, run.selections)
        redone = {groups.ids[i] for i in todo}
        older = sum(
            1 for g, p in existing.items() if g not in redone and (p.model != model or p.prompt_hash != phash)
        )
        if older:
            notes.append(f"note: {older} groups outside this selection keep records made with another model or prompt")
    result_counts: dict[str, Any] = {"groups": sum(counts.values())}
    result_counts.update({s: counts.get(s, 0) for s in SELECTION_STATUSES})
    result_counts.update({"answered": sum(tally.statuses.values()), "requests": tally.requests, "cached": tally.cached, "kept": kept})
    return finish_stage(
        run,
        STAGE,
        cfg,
        counts=result_counts,
        seconds=timer.seconds,
        output=run.selections,
        models={"llm": described},
        extra={"prompt_hash": phash, "prompt_source": template.source, "this_run": tally.as_dict()},
        notes=notes,
    )


REMAP_MODEL = "none"


def remap_hash(settings: PromptSettings) -> str:
    """What a remap record was made with (no prompt: the number of captions paired)."""
    return hash_text(f"remap:n={settings.n}")


def remap_records(groups: Groups, chosen: Sequence[int], n: int, phash: str) -> tuple[list[Selection], int]:
    """The official remapping (preprocess/remapping.py): each group's first ``n`` candidates, head
    first, paired with the image of its head caption (the rendered text); a group whose first
    ``n`` are the same captions as an earlier group's is dropped. Returns (records, dropped)."""
    seen: set[tuple[str, ...]] = set()
    records: list[Selection] = []
    for i in chosen:
        members = groups.members[i][:n]
        key = tuple(sorted(members))
        if key in seen:
            continue
        seen.add(key)
        gid = groups.ids[i]
        records.append(
            Selection(gid, "ok", list(members), groups.texts[members[0]], None, model=REMAP_MODEL, prompt_hash=phash, raw="")
        )
    return records, len(chosen) - len(records)


def run_remap(cfg: SummarizeConfig, run: RunDir, settings: PromptSettings, timer: Timer) -> StageResult:
    """``--mode remap``: the records without a model."""
    groups = read_groups(run)
    chosen = choose_groups(len(groups.ids), limit=cfg.limit, sample=cfg.sample, seed=cfg.seed)
    phash = remap_hash(settings)
    folder = run.selection_parts
    notes = sample_note(len(chosen), len(groups.ids), cfg)
    with exclusive(folder):
        remove_stale_parts(folder, {p.name for p in done_parts(folder)}, PART_PATTERN)
        existing = priors(latest_table(folder))
        records, dropped = remap_records(groups, chosen, settings.n, phash)
        records = [r for r in records if needs_answer(existing.get(r.group_id), REMAP_MODEL, phash, retry=False)]
        info = {"model": REMAP_MODEL, "prompt_hash": phash, "backend": "none"}
        for lo in range(0, len(records), cfg.part_size):
            write_part(part_path(folder, next_part_index(folder)), records[lo : lo + cfg.part_size], info)
        counts = consolidate(latest_table(folder), groups.ids, run.selections)
    if dropped:
        notes.append(f"note: {dropped} groups dropped: their first {settings.n} captions repeat an earlier group's")
    result_counts: dict[str, Any] = {"groups": sum(counts.values())}
    result_counts.update({s: counts.get(s, 0) for s in SELECTION_STATUSES})
    result_counts.update({"answered": len(records), "requests": 0, "cached": 0, "duplicates": dropped})
    return finish_stage(
        run,
        STAGE,
        cfg,
        counts=result_counts,
        seconds=timer.seconds,
        output=run.selections,
        models={"llm": {"backend": "none", "model": REMAP_MODEL}},
        extra={"prompt_hash": phash, "prompt_source": "remap"},
        notes=notes,
    )


def _run_streaming(
    cfg: SummarizeConfig,
    spec: LLMOptions,
    template: PromptTemplate,
    todo: list[int],
    make_item: Callable[[int], WorkItem],
    folder: Path,
    info: dict[str, Any],
    cache: LLMCache,
    tally: Tally,
) -> dict[str, Any]:
    backend = make_backend(spec)
    job = Job(template=template, model=backend.model_id, params=backend.params.as_dict())
    writer = PartWriter(folder, next_part_index(folder), cfg.part_size, info, on_flush=cache.commit)
    progress = Progress(len(todo), tally)

    def on_record(rec: Selection, answer: ChatAnswer, cached: bool) -> None:
        progress(rec, answer, cached)
        writer.add(rec)

    try:
        answer_groups(todo, make_item, backend, cache, job, on_record)
    finally:
        # Records in the buffer are complete answers: keep them even when interrupted.
        writer.flush()
        progress.close()
        backend.close()
    return backend.describe()


def _run_as_tasks(
    cfg: SummarizeConfig,
    spec: LLMOptions,
    template: PromptTemplate,
    todo: list[int],
    make_item: Callable[[int], WorkItem],
    folder: Path,
    cache_dir: Path,
    info: dict[str, Any],
    tally: Tally,
) -> None:
    start = next_part_index(folder)
    tasks = []
    for n, lo in enumerate(range(0, len(todo), cfg.part_size)):
        chunk = [make_item(i) for i in todo[lo : lo + cfg.part_size]]
        out = part_path(folder, start + n)
        tasks.append(ShardTask(key=out.stem, output=out, size=len(chunk), payload=chunk))
    factory = SummarizeWorkerFactory(
        spec=spec,
        device=cfg.device,
        template_text=template.text,
        template_source=template.source,
        settings=template.settings,
        cache_path=str(cache_dir / "llm.sqlite"),
        info=info,
        verbatim=template.verbatim,
    )
    result = run_tasks(
        tasks,
        factory,
        executor=cfg.executor,
        workers=count_workers(cfg.device),
        desc=STAGE,
        unit="group",
        address=cfg.address,
    )
    for r in result.results:
        tally.add(r)


# ----------------------------------------------------------------------------- rehearsal


REHEARSAL_KEY_ENV = "ICSD_REHEARSAL_NO_KEY"  # the scripted server needs no key: never send a real one


def _rehearsal_reduce(ctx: StageRehearsal) -> None:
    """The local scripted chat server instead of the configured LLM, whatever its backend."""
    import os

    from ..testing.chat_server import ChatServer, echo_responder

    cfg, r = ctx.configured, ctx.config
    server = ChatServer(echo_responder(pick=cfg.min_select), model=cfg.model).start()
    ctx.resources.callback(server.stop)
    ctx.memo["server"] = server
    os.environ.pop(REHEARSAL_KEY_ENV, None)
    r.backend = "openai"
    r.base_url = [server.url]
    r.api_key_env = REHEARSAL_KEY_ENV
    r.gguf_file = None
    r.sample = None
    r.limit = min(cfg.limit or ctx.options.prompts, ctx.options.prompts)
    ctx.reduced(
        f"{r.limit} candidate sets through the local scripted chat server "
        f"(configured: {cfg.backend} {', '.join(cfg.base_url) or cfg.model}); "
        "its answers pick the first captions, so the LLM's own time is not measured"
    )


def _rehearsal_project(ctx: StageRehearsal) -> Row:
    """One request per candidate set of the full corpus; the LLM's time is the server's."""
    from ..cost_model import load_inputs
    from ..rehearse.hooks import Size, per

    assert ctx.record is not None
    cfg = ctx.configured
    requests = list(ctx.memo["server"].requests)
    words = [len(str(m.get("content", "")).split()) for q in requests for m in q.get("messages", [])]
    mean_words = sum(words) / max(1, len(requests))
    full = int(ctx.size("captions") or 0)  # every caption heads a set; identical sets are rare at full size
    source = "one request per candidate set, one set per caption"
    if cfg.limit and cfg.limit < full:
        full, source = cfg.limit, "summarize.limit"
    if cfg.sample and cfg.sample < full:
        full, source = cfg.sample, "summarize.sample"
    ctx.sizes["prompts"] = Size(full, source)
    if cfg.mode == "select":  # the scripted answers always select min_select: not the run's number
        recipe = load_inputs()["recipe"]["pairs_per_image"]
        ctx.sizes["selected_per_image"] = Size(recipe["value"], recipe["source"])
    return ctx.row(architecture=f"{cfg.backend}: {cfg.model} (not run: scripted server)",
                   settings={"mode": cfg.mode, "min_select": cfg.min_select, "max_select": cfg.max_select,
                             "max_words": cfg.max_words, "max_new_tokens": cfg.max_new_tokens,
                             "temperature": cfg.temperature, "concurrency": cfg.concurrency,
                             "prompt_words_per_request": round(mean_words, 1)},
                   unit="prompt", units=len(requests), seconds_per_unit=per(ctx.record.seconds, len(requests)),
                   full_units=full, projected_seconds=None,
                   projection=f"{full:,} requests of ~{mean_words:.0f} words, up to {cfg.max_new_tokens} new tokens "
                              "each: time depends on the LLM server")  # fmt: skip


SPEC = StageSpec(
    name="summarize",
    wanted=multi_context,
    report_counts=(
        ("groups", "sets sent to the LLM"),
        ("ok", "ok"),
        ("invalid", "invalid"),
        ("parse_error", "unparsable"),
        ("failed", "failed"),
    ),
    rehearsal=RehearsalHooks(reduce=_rehearsal_reduce, project=_rehearsal_project),
    config=SummarizeConfig,
    run=run,
    inputs=lambda cfg, run: [run.candidates, run.captions],
    outputs=lambda run: [run.selection_parts, run.selections],
    summary="Ask an LLM to select captions of one scene and summarise them into RUN/selections.parquet.",
    examples=(
        "icsd summarize --run runs/coco --limit 20            (packaged SmolLM2, CPU: a quick look)",
        "vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000 &",
        "icsd summarize --run runs/coco --backend openai --base-url http://127.0.0.1:8000/v1 "
        "--model Qwen/Qwen2.5-7B-Instruct --concurrency 256",
        "OPENAI_API_KEY=... icsd summarize --run runs/coco --backend openai --model gpt-3.5-turbo",
        "icsd summarize --run runs/coco --backend vllm --model Qwen/Qwen2.5-7B-Instruct",
        "icsd summarize --run runs/coco --sample 100 --seed 1 --prompt my_prompt.txt",
        "icsd summarize --run runs/coco --mode first-n --n 5      (no selection, only condense)",
        "icsd summarize --run runs/coco --mode remap --n 5        (no LLM: the official remapping)",
        "icsd summarize --run runs/coco --prompt official --answers official --temperature null",
        "icsd summarize --run runs/coco --retry                   (redo groups that are not ok)",
    ),
)
