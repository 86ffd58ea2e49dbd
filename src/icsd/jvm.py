"""The Java side of caption scoring: finding Java, and running pycocoevalcap's jars.

Every number comes from pycocoevalcap's own jars; this module owns only the process plumbing:

- :func:`find_java` checks the ``java`` on PATH once per process (Java >= 8, else a one-line error).
- The PTB tokenizer jar runs once for references and predictions together, with its temp file in
  the user cache dir (pycocoevalcap writes it next to its own module, inside site-packages).
- METEOR's JVM starts before anything else (loading its paraphrase table takes seconds) and is
  kept for the process; its SCORE lines go out in one write and its answers are read in chunks, in
  a thread. Java's stderr goes to a log file, so a dead JVM becomes a one-line error instead of a
  broken pipe.
- SPICE runs pycocoevalcap's ``spice-1.0.jar`` with Stanford CoreNLP 3.6.0 jars from a configured
  folder; its temp and parse-cache files go to the user cache dir.

:mod:`icsd.metrics` combines these with the Python scorers into the scores icsd writes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, TypeVar

from .errors import UserError, examples_text

K = TypeVar("K", bound=Hashable)

MIN_JAVA = 8
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
SPICE_HINT = (
    "download http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip (the file pycocoevalcap's "
    "get_stanford_models fetches), unzip it and pass --spice-jars DIR (or set ICSD_SPICE_JARS=DIR)"
)
# Characters the PTB tokenizer (-preserveLines) takes as line ends besides "\n"; left in a caption
# they would shift every later caption onto the wrong image.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")


def cache_dir() -> Path:
    """The user cache dir for temp and cache files: $ICSD_CACHE_DIR, else $XDG_CACHE_HOME/icsd, else ~/.cache/icsd."""
    if env := os.environ.get("ICSD_CACHE_DIR"):
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = Path(base).expanduser() / "icsd"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _scratch_dir() -> Path:
    d = cache_dir() / "eval-tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- java


@dataclass(frozen=True)
class Java:
    path: str
    version: int
    banner: str


def parse_java_version(banner: str) -> int | None:
    """The major version from ``java -version`` output (``1.8.0_292`` -> 8, ``17.0.15`` -> 17)."""
    m = re.search(r'version "([^"]+)"', banner)
    if not m:
        return None
    parts = re.findall(r"\d+", m.group(1))
    if not parts:
        return None
    major = int(parts[0])
    if major == 1 and len(parts) > 1:
        major = int(parts[1])
    return major


@lru_cache(maxsize=4)
def _probe_java(path: str) -> Java:
    try:
        out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise UserError(f"cannot run Java ({path}): {exc}") from None
    banner = (out.stderr or out.stdout).strip()
    version = parse_java_version(banner)
    if out.returncode != 0 or version is None:
        first = banner.splitlines()[0] if banner else f"exit code {out.returncode}"
        raise UserError(
            f"Java at {path} does not run ({first}); METEOR, SPICE and the PTB tokenizer need Java >= {MIN_JAVA}"
        )
    if version < MIN_JAVA:
        raise UserError(
            f"Java {version} at {path} is too old: METEOR, SPICE and the PTB tokenizer need Java >= {MIN_JAVA} "
            "(e.g. apt-get install default-jre-headless)"
        )
    return Java(path=path, version=version, banner=banner.splitlines()[0])


def find_java() -> Java:
    """The ``java`` on PATH (the one pycocoevalcap runs), checked once per process."""
    path = shutil.which("java")
    if path is None:
        raise UserError(
            f"Java not found on PATH: METEOR, SPICE and the PTB tokenizer need Java >= {MIN_JAVA} "
            "(e.g. apt-get install default-jre-headless)"
        )
    return _probe_java(path)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    keep = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(keep)


# ----------------------------------------------------------------------------- PTB tokenizer


def _pycocoevalcap_dir(sub: str) -> Path:
    import pycocoevalcap

    return Path(pycocoevalcap.__path__[0]) / sub


def ptb_tokenize_sentences(sentences: Sequence[str]) -> list[str]:
    """PTB-tokenise, lower-case and drop punctuation exactly as pycocoevalcap's ``PTBTokenizer``.

    Same jar, same flags, same post-processing; the temp file lives in the user cache dir.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not sentences:
        return []
    java = find_java()
    jar = _pycocoevalcap_dir("tokenizer") / ptb.STANFORD_CORENLP_3_4_1_JAR
    text = "\n".join(_LINE_BREAKS.sub(" ", s) for s in sentences)
    scratch = _scratch_dir()
    fd, tmp_name = tempfile.mkstemp(prefix="ptb-", suffix=".txt", dir=scratch)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode())
        cmd = [
            java.path,
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
        ]
        proc = subprocess.run([*cmd, os.path.basename(tmp_name)], cwd=scratch, capture_output=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_name)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(
            f"the PTB tokenizer (Java) failed: {err[-1] if err else f'exit code {proc.returncode}'}"
        )
    lines = proc.stdout.decode().split("\n")
    if len(lines) < len(sentences):
        raise UserError(f"the PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions")
    punct = set(ptb.PUNCTUATIONS)
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines[: len(sentences)]
    ]


def ptb_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """``{key: [caption, ...]}`` -> ``{key: [tokenised caption, ...]}`` in one tokenizer run."""
    flat = [c for caps in captions.values() for c in caps]
    tokens = iter(ptb_tokenize_sentences(flat))
    return {k: [next(tokens) for _ in caps] for k, caps in captions.items() if caps}


# ----------------------------------------------------------------------------- METEOR


class _JavaGone(Exception):
    pass


def meteor_score_line(hypothesis: str, references: Sequence[str]) -> str:
    """The SCORE line pycocoevalcap's ``Meteor._stat`` sends for one image (same cleaning, same joins)."""
    hypothesis = hypothesis.replace("|||", "").replace("  ", " ")
    return " ||| ".join(("SCORE", " ||| ".join(references), hypothesis))


def _meteor_class() -> type:
    from pycocoevalcap.meteor import meteor as meteor_module

    class Meteor(meteor_module.Meteor):  # type: ignore[misc, name-defined]
        """pycocoevalcap's METEOR wrapper and jar, talking the same protocol (SCORE lines, then one
        EVAL line), with three changes that leave every number as it is:

        - the SCORE lines go out in one write from a thread instead of one round trip each, so the
          JVM never waits on Python (it would wait up to a GIL switch interval per image while CIDEr
          runs in the main thread);
        - each image's statistics are remembered, so scoring NoCaps' domains after the whole set
          sends only EVAL lines;
        - Java's stderr goes to a log file, so a dead JVM becomes a one-line error, not a broken pipe.
        """

        def __init__(self, java: Java, log: IO[bytes], log_path: Path) -> None:
            self.meteor_cmd = [
                java.path,
                "-jar",
                "-Xmx2G",
                meteor_module.METEOR_JAR,
                "-",
                "-",
                "-stdio",
                "-l",
                "en",
                "-norm",
            ]
            self.log, self.log_path = log, log_path
            self.stats: dict[str, str] = {}
            self.pending = b""
            self.lock = threading.Lock()
            self.meteor_p: subprocess.Popen[bytes] | None = subprocess.Popen(
                self.meteor_cmd,
                cwd=os.path.dirname(os.path.abspath(meteor_module.__file__)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

        def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
            if self.meteor_p is None or self.meteor_p.stdin is None or self.meteor_p.stdout is None:
                raise _JavaGone
            return self.meteor_p.stdin, self.meteor_p.stdout

        def _read_lines(self, n: int) -> list[bytes]:
            """The next ``n`` lines, read in large chunks: one GIL hand-off per chunk, not per line,
            so neither this thread nor the one computing CIDEr waits on the other for each image."""
            stdout = self._pipes()[1]
            chunks, have = [self.pending], self.pending.count(b"\n")
            while have < n:
                chunk = stdout.read1(1 << 16)  # type: ignore[attr-defined]
                if not chunk:
                    raise _JavaGone
                chunks.append(chunk)
                have += chunk.count(b"\n")
            lines = b"".join(chunks).split(b"\n")
            self.pending = b"\n".join(lines[n:])
            return lines[:n]

        def _send(self, data: bytes, errors: list[BaseException]) -> None:
            try:
                stdin = self._pipes()[0]
                stdin.write(data)
                stdin.flush()
            except (OSError, ValueError, _JavaGone) as exc:
                errors.append(exc)

        def _fill_stats(self, lines: list[str]) -> None:
            todo = list(dict.fromkeys(line for line in lines if line not in self.stats))
            if not todo:
                return
            errors: list[BaseException] = []
            payload = "".join(f"{line}\n" for line in todo).encode()
            writer = threading.Thread(target=self._send, args=(payload, errors), daemon=True)
            writer.start()
            for line, stat in zip(todo, self._read_lines(len(todo)), strict=True):
                self.stats[line] = stat.decode().strip()
            writer.join()
            if errors:
                raise _JavaGone

        def compute_score(
            self, gts: dict[Any, list[str]], res: dict[Any, list[str]]
        ) -> tuple[float, list[float]]:
            assert gts.keys() == res.keys()
            ids = list(gts)
            with self.lock:
                lines = []
                for i in ids:
                    assert len(res[i]) == 1
                    lines.append(meteor_score_line(res[i][0], gts[i]))
                self._fill_stats(lines)
                eval_line = "EVAL" + "".join(f" ||| {self.stats[line]}" for line in lines)
                stdin = self._pipes()[0]
                stdin.write(f"{eval_line}\n".encode())
                stdin.flush()
                *per_image, total = self._read_lines(len(ids) + 1)
                scores = [float(x.strip()) for x in per_image]
                score = float(total.strip())
            return score, scores

        def score(self, gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> tuple[float, list[float]]:
            try:
                return self.compute_score(gts, res)
            except (OSError, ValueError, _JavaGone):
                code = self.close()
                why = _tail(self.log_path) or f"exit code {code}"
                raise UserError(f"METEOR (Java) stopped: {why}") from None

        def close(self) -> int | None:
            p = getattr(self, "meteor_p", None)
            if p is None:
                return None
            self.meteor_p = None
            with contextlib.suppress(OSError, ValueError, AttributeError):
                p.stdin.close()  # type: ignore[union-attr]
            if p.poll() is None:
                p.kill()
            code: int | None = p.wait()
            if p.stdout is not None:
                p.stdout.close()
            return code

        def __del__(self) -> None:
            self.close()

    return Meteor


class MeteorScorer:
    """One METEOR JVM. Loading its paraphrase table costs seconds of CPU, so :func:`shared_meteor`
    keeps one per process for every evaluation (training-time validation included)."""

    MAX_REMEMBERED = 500_000

    def __init__(self) -> None:
        java = find_java()
        fd, name = tempfile.mkstemp(prefix="meteor-", suffix=".log", dir=_scratch_dir())
        self._log_path = Path(name)
        self._log = os.fdopen(fd, "w+b")
        self._impl = _meteor_class()(java, self._log, self._log_path)

    @property
    def alive(self) -> bool:
        p = self._impl.meteor_p
        return p is not None and p.poll() is None

    def score(self, gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> tuple[float, list[float]]:
        if len(self._impl.stats) > self.MAX_REMEMBERED:
            self._impl.stats.clear()
        return self._impl.score(gts, res)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._impl.close()
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            self._log_path.unlink()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_shared: MeteorScorer | None = None
_shared_lock = threading.Lock()


def shared_meteor() -> MeteorScorer:
    """The process's METEOR JVM, started on first use (and again if it died)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive:
            if _shared is not None:
                _shared.close()
            _shared = MeteorScorer()
        return _shared


def close_shared_meteor() -> None:
    """Stop the shared METEOR JVM (it restarts on the next evaluation)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None


atexit.register(close_shared_meteor)


# ----------------------------------------------------------------------------- SPICE


def find_spice_jars(configured: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder holding Stanford CoreNLP 3.6.0's two jars, or None.

    Looks in ``configured`` (an error if given and they are not there), then ``$ICSD_SPICE_JARS``,
    then pycocoevalcap's own ``spice/lib`` (where its downloader puts them).
    """
    candidates: list[tuple[Path, bool]] = []
    if configured:
        candidates.append((Path(configured).expanduser(), True))
    elif env := os.environ.get("ICSD_SPICE_JARS"):
        candidates.append((Path(env).expanduser(), True))
    candidates.append((_pycocoevalcap_dir("spice") / "lib", False))
    for folder, explicit in candidates:
        found = _corenlp_folder(folder)
        if found is not None:
            return found
        if explicit:
            raise UserError(
                f"SPICE jars not found in {folder}: it must hold {' and '.join(CORENLP_JARS)}; {SPICE_HINT}"
            )
    return None


def _corenlp_folder(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    if all((folder / j).is_file() for j in CORENLP_JARS):
        return folder
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and all((sub / j).is_file() for j in CORENLP_JARS):
            return sub
    return None


SPICE_SKIPPED = "SPICE skipped"


def spice_missing_note(short: bool = False) -> str:
    """Why SPICE was not computed; ``short``: one clause that points to ``icsd evaluate --help``."""
    if short:
        return f"{SPICE_SKIPPED}: no Stanford CoreNLP 3.6.0 jars (--spice-jars DIR; see icsd evaluate --help)"
    return f"{SPICE_SKIPPED}: Stanford CoreNLP 3.6.0 jars ({', '.join(CORENLP_JARS)}) not found; {SPICE_HINT}"


# Java 9+ closes the JDK internals that SPICE's parse cache (FST serialisation) reflects on.
_SPICE_OPENS = (
    "java.base/java.lang",
    "java.base/java.util",
    "java.base/java.math",
    "java.base/java.net",
    "java.base/java.text",
    "java.base/java.util.concurrent",
    "java.base/java.io",
)


def spice_command(
    java: Java, jars: Path, input_file: Path, output_file: Path, cache: Path, tmp: Path
) -> list[str]:
    """pycocoevalcap's SPICE command line, with the CoreNLP jars put on the class path from ``jars``
    (spice-1.0.jar's own manifest brings its lib/ jars) and every file under the user cache dir."""
    from pycocoevalcap.spice import spice as spice_module

    spice_dir = _pycocoevalcap_dir("spice")
    classpath = os.pathsep.join(
        [str(spice_dir / spice_module.SPICE_JAR), *(str(jars / j) for j in CORENLP_JARS)]
    )
    opens = [f"--add-opens={m}=ALL-UNNAMED" for m in _SPICE_OPENS] if java.version >= 9 else []
    return [
        java.path, *opens, "-Xmx8G", f"-Djava.io.tmpdir={tmp}", "-cp", classpath, "edu.anu.spice.SpiceScorer",
        str(input_file), "-cache", str(cache), "-out", str(output_file), "-subset", "-silent",
    ]  # fmt: skip


def natural_order(key: Any) -> tuple[int, int, str]:
    """Sort key putting ids in the order pycocoevalcap's ``sorted(imgIds)`` gives for COCO's int ids."""
    text = str(key)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def compute_spice(gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]], jars: Path) -> dict[Any, float]:
    """Per-image SPICE F-scores as pycocoevalcap's ``Spice.compute_score`` computes them (its input
    file, its jar and flags, its NaN conversion); see :func:`spice_mean` for its corpus score."""
    from pycocoevalcap.spice.spice import Spice

    java = find_java()
    root = cache_dir() / "spice"
    cache, tmp = root / "cache", root / "tmp"
    cache.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    ids = sorted(gts, key=natural_order)
    data = [{"image_id": n, "test": res[i][0], "refs": gts[i]} for n, i in enumerate(ids)]
    with tempfile.TemporaryDirectory(dir=tmp) as work:
        in_file, out_file, log = Path(work) / "in.json", Path(work) / "out.json", Path(work) / "spice.log"
        in_file.write_text(json.dumps(data, indent=2), encoding="utf-8")
        cmd = spice_command(java, jars, in_file, out_file, cache, tmp)
        with open(log, "wb") as err:
            proc = subprocess.run(cmd, cwd=work, stdout=err, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not out_file.exists():
            raise UserError(
                f"SPICE (Java) failed with exit code {proc.returncode}: {_tail(log) or 'no output'}"
            )
        results = json.loads(out_file.read_text(encoding="utf-8"))
    convert = Spice.float_convert.__get__(object.__new__(Spice))
    by_index = {int(item["image_id"]): convert(item["scores"]["All"]["f"]) for item in results}
    missing = [ids[n] for n in range(len(ids)) if n not in by_index]
    if missing:
        raise UserError(f"SPICE returned no score for {len(missing)} images (e.g. {examples_text(missing)})")
    return {i: float(by_index[n]) for n, i in enumerate(ids)}
