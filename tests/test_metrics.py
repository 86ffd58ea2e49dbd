"""icsd.metrics against pycocoevalcap itself: same numbers, and clear errors instead of Java tracebacks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from icsd import jvm
from icsd.errors import UserError
from icsd.jvm import parse_java_version, ptb_tokenize, ptb_tokenize_sentences
from icsd.metrics import match_inputs, parse_metrics, score_captions, spice_mean

SUBSET = 400
FAST = "BLEU,ROUGE_L,CIDEr"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICSD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "icsd-cache"))


def leave_one_out(
    path: Path, n: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """COCO images, reference annotations (all but each image's first caption) and predictions
    (each image's first caption) for the first ``n`` images of a COCO captions file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    images = data["images"][:n] if n else data["images"]
    keep = {im["id"] for im in images}
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in data["annotations"]:
        if a["image_id"] in keep:
            by_image[a["image_id"]].append(a)
    refs, preds = [], []
    for im in images:
        anns = sorted(by_image[im["id"]], key=lambda a: a["id"])
        preds.append({"image_id": im["id"], "caption": anns[0]["caption"]})
        refs.extend(anns[1:])
    return images, refs, preds


def cocoevalcap_scores(images: list[dict[str, Any]], refs: list[dict[str, Any]], preds: list[dict[str, Any]],
                       tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, float], dict[int, dict[str, float]]]:  # fmt: skip
    """pycocoevalcap's COCOEvalCap.evaluate() on the same inputs, SPICE left out (its CoreNLP jars
    are not installed here, and evaluate() would try to download them)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts: dict[Any, Any], res: dict[Any, Any]) -> tuple[float, list[float]]:
            return 0.0, [0.0] * len(gts)

        def method(self) -> str:
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    gt_file, res_file = tmp / "gt.json", tmp / "res.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": refs, "info": {}, "licenses": []}))
    res_file.write_text(json.dumps(preds))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_file))
        res = coco.loadRes(str(res_file))
        ev = coco_eval.COCOEvalCap(coco, res)
        ev.params["image_id"] = res.getImgIds()
        ev.evaluate()
    scores = {k: float(v) for k, v in ev.eval.items() if k != "SPICE"}
    per_image = {
        i: {k: float(v) for k, v in d.items() if k not in ("image_id", "SPICE")}
        for i, d in ev.imgToEval.items()
    }
    return scores, per_image


def as_inputs(images: list[dict[str, Any]], refs: list[dict[str, Any]], preds: list[dict[str, Any]]
              ) -> tuple[dict[str, list[str]], dict[str, str]]:  # fmt: skip
    by_image: dict[str, list[str]] = {str(im["id"]): [] for im in images}
    for a in refs:
        by_image[str(a["image_id"])].append(a["caption"])
    return by_image, {str(p["image_id"]): p["caption"] for p in preds}


# ----------------------------------------------------------------------------- equality with pycocoevalcap


@pytest.mark.slow
def test_equal_to_cocoevalcap_on_human_agreement(
    coco_captions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, refs, preds = leave_one_out(coco_captions, SUBSET)
    expected, expected_per_image = cocoevalcap_scores(images, refs, preds, tmp_path, monkeypatch)
    references, predictions = as_inputs(images, refs, preds)
    ours = score_captions(references, predictions, metrics="BLEU,METEOR,ROUGE_L,CIDEr")
    assert ours.overall.scores == expected  # float for float, not approximately
    assert set(expected) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert ours.overall.n_images == SUBSET
    for image_id, scores in expected_per_image.items():
        assert ours.overall.per_image[str(image_id)] == scores
    # human agreement on COCO is well known: CIDEr about 0.85-0.9, BLEU-4 about 0.2
    assert 0.7 < ours.overall.scores["CIDEr"] < 1.1
    assert 0.15 < ours.overall.scores["Bleu_4"] < 0.3


def test_one_tokenizer_run_equals_two(coco_captions: Path) -> None:
    images, refs, preds = leave_one_out(coco_captions, 200)
    references, predictions = as_inputs(images, refs, preds)
    together = ptb_tokenize(
        {**{("r", k): v for k, v in references.items()}, **{("p", k): [v] for k, v in predictions.items()}}
    )
    apart_refs = ptb_tokenize(references)
    apart_preds = ptb_tokenize({k: [v] for k, v in predictions.items()})
    assert {k: together[("r", k)] for k in references} == apart_refs
    assert {k: together[("p", k)] for k in predictions} == apart_preds


def test_tokenizer_matches_pycocoevalcap_and_keeps_lines_aligned() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {
        1: [{"caption": 'A man, riding a "horse".'}, {"caption": "Two dogs... playing!"}],
        2: [{"caption": "It's a DOG's life -- (really)"}],
        3: [{"caption": "Café with\nnew line"}],
    }
    with contextlib.redirect_stderr(io.StringIO()):
        expected = PTBTokenizer().tokenize(captions)
    ours = ptb_tokenize({k: [c["caption"] for c in v] for k, v in captions.items()})
    assert ours == expected
    assert ours[1] == ["a man riding a horse", "two dogs playing"]
    # a carriage return or line separator inside a caption must not shift later captions
    out = ptb_tokenize_sentences(["a\rb", "c\u2028d", "e\x0cf", "last one"])
    assert out == ["a b", "c d", "e f", "last one"]


def test_tokenizer_writes_nothing_into_site_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    import pycocoevalcap

    pkg = Path(pycocoevalcap.__path__[0])
    cache = tmp_path / "cache"
    monkeypatch.setenv("ICSD_CACHE_DIR", str(cache))
    made: list[Path] = []
    real_mkstemp = tempfile.mkstemp

    def recording_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        made.append(Path(name))
        return fd, name

    monkeypatch.setattr(jvm.tempfile, "mkstemp", recording_mkstemp)
    assert ptb_tokenize_sentences(["a caption."]) == ["a caption"]
    assert made and all(p.parent == cache / "eval-tmp" for p in made)
    assert not any(pkg in p.parents for p in made)
    assert not list((cache / "eval-tmp").glob("ptb-*"))  # removed after use


def test_cache_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICSD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jvm.cache_dir() == tmp_path / "xdg" / "icsd"
    monkeypatch.setenv("ICSD_CACHE_DIR", str(tmp_path / "mine"))
    assert jvm.cache_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------- hand-checked cases


def test_identical_caption_scores_one_everywhere() -> None:
    refs = {"a": ["a black cat sleeps on a red sofa"], "b": ["two men play chess in a park"]}
    preds = {"a": "A black cat sleeps on a red sofa.", "b": "Two men play chess in a park!"}
    ev = score_captions(refs, preds, metrics="BLEU,ROUGE_L")
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L"):
        assert ev.overall.scores[key] == pytest.approx(1.0)


def test_bleu_and_rouge_by_hand() -> None:
    # prediction "the cat sat" against reference "the cat sat down":
    # BLEU-1 precision 3/3, brevity penalty exp(1 - 4/3); ROUGE-L: LCS 3, P=1, R=3/4, beta=1.2
    import math

    ev = score_captions({"x": ["the cat sat down"]}, {"x": "the cat sat"}, metrics="BLEU,ROUGE_L")
    bp = math.exp(1 - 4 / 3)
    assert ev.overall.scores["Bleu_1"] == pytest.approx(bp, rel=1e-6)
    assert ev.overall.scores["Bleu_2"] == pytest.approx(bp * math.sqrt(1.0 * 2 / 2), rel=1e-6)
    p, r, b2 = 1.0, 0.75, 1.2**2
    assert ev.overall.scores["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p))
    assert ev.overall.per_image["x"]["ROUGE_L"] == ev.overall.scores["ROUGE_L"]


def test_cider_zero_for_disjoint_and_positive_for_overlap() -> None:
    refs = {
        "1": ["a dog runs on the beach", "a brown dog running along the sand"],
        "2": ["a plate of food with broccoli", "broccoli and rice on a white plate"],
        "3": ["a man rides a red bicycle", "a cyclist on a red bike in the city"],
    }
    preds = {"1": "a dog running on the beach", "2": "zebra giraffe elephant", "3": "a man on a red bike"}
    ev = score_captions(refs, preds, metrics="CIDEr")
    per = ev.overall.per_image
    assert per["2"]["CIDEr"] == 0.0
    assert per["1"]["CIDEr"] > 0 and per["3"]["CIDEr"] > 0
    assert ev.overall.scores["CIDEr"] == pytest.approx(sum(p["CIDEr"] for p in per.values()) / 3)


def test_empty_caption_is_scored_not_crashed() -> None:
    ev = score_captions(
        {"1": ["a dog"], "2": ["a cat on a mat"]}, {"1": "", "2": "a cat on a mat"}, metrics=FAST
    )
    assert ev.overall.per_image["1"]["Bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert ev.overall.per_image["1"]["CIDEr"] == 0.0


def test_subsets_score_on_their_own() -> None:
    refs = {
        "1": ["a dog runs on the beach", "a dog on the sand"],
        "2": ["a plate of food with broccoli", "broccoli on a plate"],
        "3": ["a man rides a red bicycle", "a cyclist on a red bike"],
        "4": ["two cats sleep on a sofa", "cats sleeping on a couch"],
    }
    preds = {
        "1": "a dog on the beach",
        "2": "food on a plate",
        "3": "a man on a bike",
        "4": "two cats on a sofa",
    }
    ev = score_captions(refs, preds, metrics=FAST, subsets={"in": ["1", "2"], "out": ["3", "4"], "none": []})
    assert set(ev.subsets) == {"in", "out"}
    alone = score_captions({k: refs[k] for k in ("1", "2")}, {k: preds[k] for k in ("1", "2")}, metrics=FAST)
    assert ev.subsets["in"].scores == alone.overall.scores
    assert ev.subsets["in"].n_images == 2 and ev.overall.n_images == 4
    # ROUGE-L is a mean of per-image scores, so the overall is the mean of two equal-sized halves
    halves = (ev.subsets["in"].scores["ROUGE_L"] + ev.subsets["out"].scores["ROUGE_L"]) / 2
    assert ev.overall.scores["ROUGE_L"] == pytest.approx(halves)


def test_spice_mean_uses_sorted_ids() -> None:
    per = {"10": 0.1, "9": 0.2, "100": 0.3}
    assert spice_mean(per, ["100", "9", "10"]) == pytest.approx(0.2)


# ----------------------------------------------------------------------------- errors


def test_parse_metrics() -> None:
    assert parse_metrics("cider, bleu,rouge") == ("BLEU", "ROUGE_L", "CIDEr")
    assert parse_metrics(["SPICE", "meteor"]) == ("METEOR", "SPICE")
    with pytest.raises(UserError, match="unknown metric 'bluerouge'"):
        parse_metrics("bluerouge")
    with pytest.raises(UserError, match="no metric chosen"):
        parse_metrics(" , ")


def test_input_mismatches_are_one_line_errors() -> None:
    refs = {"1": ["a dog"], "2": ["a cat"], "3": []}
    with pytest.raises(UserError, match="predictions are empty"):
        match_inputs(refs, {})
    with pytest.raises(
        UserError, match=r"1 of 2 predictions are for images without reference captions \(e.g. '9'\)"
    ):
        match_inputs(refs, {"1": "x", "9": "y"})
    with pytest.raises(UserError, match="without reference captions"):
        match_inputs(refs, {"1": "x", "2": "y", "3": "z"})  # image 3 is listed but has no captions
    with pytest.raises(UserError, match=r"1 of 2 reference images have no prediction .*--subset"):
        match_inputs(refs, {"1": "x"})
    assert match_inputs(refs, {"1": "x"}, subset=True) == ["1"]
    with pytest.raises(UserError, match="references are empty"):
        match_inputs({}, {"1": "x"})
    with pytest.raises(UserError, match="not a string"):
        match_inputs(refs, {"1": 3, "2": "y"})  # type: ignore[dict-item]


def test_parse_java_version() -> None:
    assert parse_java_version('openjdk version "17.0.15" 2025-04-15') == 17
    assert parse_java_version('java version "1.8.0_292"') == 8
    assert parse_java_version('java version "1.7.0_76"') == 7
    assert parse_java_version('openjdk version "21" 2023-09-19') == 21
    assert parse_java_version("no version here") is None


def _fake_java(folder: Path, banner: str, code: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho '{banner}' >&2\nexit {code}\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return java


def test_java_missing_or_too_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jvm._probe_java.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="Java not found on PATH"):
        score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics="BLEU")
    _fake_java(tmp_path / "old", 'java version "1.7.0_76"')
    monkeypatch.setenv("PATH", str(tmp_path / "old"))
    with pytest.raises(UserError, match="Java 7 .* is too old"):
        score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics="BLEU")
    _fake_java(tmp_path / "broken", "Error: could not open lib/jvm.cfg", code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "broken"))
    with pytest.raises(UserError, match="does not run"):
        score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics="BLEU")
    jvm._probe_java.cache_clear()


def test_meteor_jvm_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A JVM that cannot start METEOR (here: a heap it cannot reserve) ends in a clear error,
    not a BrokenPipeError, and the next evaluation starts a fresh JVM."""
    real_java = jvm.find_java()
    wrapper = tmp_path / "bin" / "java"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$*" in *meteor*) echo "Error: Could not reserve enough space for object heap" >&2; exit 1;; esac\n'
        f'exec {real_java.path} "$@"\n'
    )
    wrapper.chmod(0o755)
    jvm.close_shared_meteor()
    jvm._probe_java.cache_clear()
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    try:
        with pytest.raises(
            UserError, match="METEOR \\(Java\\) stopped: Error: Could not reserve enough space"
        ):
            score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics="METEOR")
        assert jvm._shared is None
    finally:
        jvm._probe_java.cache_clear()
        jvm.close_shared_meteor()


def test_spice_missing_is_a_note_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ICSD_SPICE_JARS", raising=False)
    monkeypatch.setattr(jvm, "_corenlp_folder", lambda folder: None)
    ev = score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics="BLEU,SPICE")
    assert ev.metrics == ("BLEU",)
    assert "SPICE" not in ev.overall.scores
    (note,) = ev.notes
    assert note.startswith("SPICE skipped: no Stanford CoreNLP 3.6.0 jars") and "--spice-jars" in note
    assert "\n" not in note and len(note) < 100 and "http" not in note  # short; the download is in --help
    with pytest.raises(UserError, match="nothing to compute: SPICE skipped"):
        score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics="SPICE")


def test_spice_jars_configured_but_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="SPICE jars not found in .*stanford-corenlp-3.6.0.jar"):
        jvm.find_spice_jars(tmp_path)
    monkeypatch.setenv("ICSD_SPICE_JARS", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="SPICE jars not found"):
        jvm.find_spice_jars(None)


def test_spice_jars_found_in_unzipped_folder(tmp_path: Path) -> None:
    inner = tmp_path / "stanford-corenlp-full-2015-12-09"
    inner.mkdir()
    for name in jvm.CORENLP_JARS:
        (inner / name).write_bytes(b"")
    assert jvm.find_spice_jars(tmp_path) == inner


def test_spice_command_keeps_files_in_cache(tmp_path: Path) -> None:
    java = jvm.Java(path="/usr/bin/java", version=17, banner="")
    cmd = jvm.spice_command(java, tmp_path / "jars", tmp_path / "in.json", tmp_path / "out.json",
                                tmp_path / "cache", tmp_path / "tmp")  # fmt: skip
    assert cmd[0] == "/usr/bin/java" and "edu.anu.spice.SpiceScorer" in cmd
    assert cmd[cmd.index("-cache") + 1] == str(tmp_path / "cache")
    assert f"-Djava.io.tmpdir={tmp_path / 'tmp'}" in cmd
    assert any(a.startswith("--add-opens=java.base/java.lang") for a in cmd)
    classpath = cmd[cmd.index("-cp") + 1].split(os.pathsep)
    assert classpath[0].endswith("spice-1.0.jar")
    assert classpath[1:] == [str(tmp_path / "jars" / j) for j in jvm.CORENLP_JARS]
    old = jvm.spice_command(jvm.Java("/j", 8, ""), tmp_path, tmp_path, tmp_path, tmp_path, tmp_path)
    assert not any(a.startswith("--add-opens") for a in old)


def test_spice_with_broken_jars_fails_clearly(tmp_path: Path) -> None:
    """Jars that are not CoreNLP: SPICE's JVM fails, and the error says so in one line."""
    for name in jvm.CORENLP_JARS:
        (tmp_path / name).write_bytes(b"not a jar")
    with pytest.raises(UserError, match=r"SPICE \(Java\) failed with exit code"):
        score_captions({"1": ["a dog"]}, {"1": "a dog"}, metrics="SPICE", spice_jars=tmp_path)
