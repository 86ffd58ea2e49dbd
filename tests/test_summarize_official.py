"""The official recipe's LLM side: its prompt verbatim, its answer shapes, sampling as it sent it,
sense checks in every answer mode, re-asks with a new seed, and the official remapping (no LLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llm_run import coco_groups, write_run

from icsd import pipeline
from icsd.config import SummarizeConfig
from icsd.llm import ChatRequest, GenerationParams
from icsd.llm.answers import error_reason, judge_answer, parse_answer
from icsd.llm.cache import request_key
from icsd.llm.openai import OpenAIBackend
from icsd.llm.prompts import OFFICIAL_TASK_PROMPT, PromptSettings, load_template
from icsd.records import Candidate, Selection, from_table
from icsd.stages import summarize
from icsd.stages.report import failures_section
from icsd.store import read_parquet
from icsd.testing.chat_server import ChatServer, Reply, first_caption

REPO = Path(__file__).resolve().parents[1]
STRICT = PromptSettings()
OFFICIAL = PromptSettings(answers="official")
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "a surfer rides a large wave in the ocean",
    "A person on a surf board in the water.",
    "A man is surfing on a big blue wave",
    "Surfer in a black wetsuit riding a wave.",
    "A red double decker bus on a city street",
    "Two dogs play with a ball on the grass",
    "a kitchen with a stove and a refrigerator",
    "The surfer is catching a wave at the beach.",
    "a young man surfing in the sea",
    "someone surfing a wave near the shore",
    "A cat sleeping on a laptop keyboard.",
]


def official_prompt(captions: list[str]) -> str:
    """The prompt as generation/sele_and_sum.py builds it (lines 62, 73-80, 101-106)."""
    task_prompt = "Select and summary sentences in the given sentences set. You should find 5 to 10 sentences that form a description from the same or different views of the same image. The meanings of the selected sentences in a group should not conflict with each other. Summarize the sentences as one not exceed 50 words to describe the scene in objective style. The summary sentence must be objective and concise, without ambiguity and uncertainty. Return the selected index and the summary sentence in json format like {'index': list,'summary': str}. Return directly the json format results without explanation. The given sentences set are: "  # noqa: E501
    ended = []
    for c in captions:
        if c.endswith("."):
            ended.append(c)
        else:
            ended.append(c + ".")
    s = ""
    for i, c in enumerate(ended):
        c += " "
        index = f"<{i + 1}> "
        s += index + c
    return task_prompt + s


def test_the_official_prompt_renders_byte_identical_to_the_official_construction():
    template = load_template(STRICT, "official")
    assert template.render(CAPTIONS) == official_prompt(CAPTIONS)
    assert template.render(["one"]) == official_prompt(["one"]) and official_prompt(["one"]).endswith("<1> one. ")
    assert OFFICIAL_TASK_PROMPT.endswith("The given sentences set are: ")
    icsd, first_n = load_template(STRICT, "icsd"), load_template(STRICT, "first-n")
    assert icsd.hash == load_template(STRICT).hash  # icsd is select mode's default
    assert len({template.hash, icsd.hash, first_n.hash}) == 3  # the hash follows the text
    assert load_template(OFFICIAL, "official").hash != template.hash  # and how answers are read


OFFICIAL_SHAPES = {
    "single-quoted, 4 indices": "{'index': [1, 2, 3, 4], 'summary': 'A man rides a wave on a surfboard.'}",
    "11 indices": json.dumps({"index": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "summary": "A surfer rides a wave."}),
    "60-word summary": json.dumps(
        {"index": [1, 2, 3, 4, 5], "summary": "A man in a black wetsuit rides a big blue wave " * 5 + "near the shore"}
    ),
    "python literal, other key names": "{'indices': [1, 3, 5], 'summary_sentence': 'A surfer on a wave.'}",
}


@pytest.mark.parametrize("text", OFFICIAL_SHAPES.values(), ids=OFFICIAL_SHAPES.keys())
def test_official_answer_shapes_are_ok_in_official_mode_and_rejected_by_strict(text):
    prompt = official_prompt(CAPTIONS)
    got = judge_answer(text, OFFICIAL, CAPTIONS, prompt)
    assert got.status == "ok", got
    assert got.indices and all(1 <= i <= len(CAPTIONS) for i in got.indices)
    assert judge_answer(text, STRICT, CAPTIONS, prompt).status in ("invalid", "parse_error")


def test_official_mode_reads_literals_without_evaluating_code(tmp_path):
    marker = tmp_path / "ran"
    code = f"{{'index': [1, 2], 'summary': __import__('pathlib').Path({str(marker)!r}).touch()}}"
    assert parse_answer(code, OFFICIAL, 12).status == "parse_error" and not marker.exists()
    fenced = "```python\n{'index': ['1', 2, 2, 3], 'summary': 'A surfer {rides} a wave.'}\n```"
    got = parse_answer(fenced, OFFICIAL, 12)
    assert got.status == "ok" and got.indices == [1, 2, 3]  # digit strings read, a repeat counted once


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{'index': [0, 1, 2, 3, 4], 'summary': 'A surfer.'}", "index outside 1..12"),  # 0 wrapped to the last
        ("{'index': [1, 2, 13], 'summary': 'A surfer.'}", "index outside 1..12"),
        ("{'index': [1, 2.5, 3], 'summary': 'A surfer.'}", "index not an integer"),
        ("{'index': [1, True], 'summary': 'A surfer.'}", "index not an integer"),
        ("{'index': [], 'summary': 'A surfer.'}", "no caption selected"),
        ("{'index': 3, 'summary': 'A surfer.'}", "index is not a list"),
        ("{'index': [1, 2], 'summary': ['A surfer.']}", "summary is not a string"),
        ("{'index': [1, 2], 'summary': '', 'extra': 1}", "summary is empty"),
        ("{'a': 1, 'b': 2, 'c': 3}", "index and summary not found"),
    ],
)
def test_official_mode_does_not_copy_the_official_bugs(text, reason):
    got = parse_answer(text, OFFICIAL, 12)
    assert got.status == "invalid" and reason in (got.error or ""), got


PLACEHOLDERS = ["str", "the merged sentence", "summary sentence", "The summary sentence.", "your sentence", "..."]


@pytest.mark.parametrize("mode", [STRICT, OFFICIAL], ids=["strict", "official"])
@pytest.mark.parametrize("prompt_name", ["official", "icsd"])
@pytest.mark.parametrize("summary", PLACEHOLDERS)
def test_a_copied_placeholder_is_invalid_in_every_mode(mode, prompt_name, summary):
    prompt = load_template(mode, prompt_name).render(CAPTIONS)
    got = judge_answer(json.dumps({"index": [1, 2, 3, 4, 5], "summary": summary}), mode, CAPTIONS, prompt)
    assert got.status == "invalid" and got.summary is None
    assert error_reason(got.error) in ("summary copies the prompt's placeholder", "summary is empty"), got.error


@pytest.mark.parametrize("mode", [STRICT, OFFICIAL], ids=["strict", "official"])
def test_sense_checks_in_every_mode(mode):
    prompt = load_template(mode, "official").render(CAPTIONS)

    def judge(index, summary):
        return judge_answer(json.dumps({"index": index, "summary": summary}), mode, CAPTIONS, prompt)

    assert judge([1, 2, 3, 4, 5], "Surfers ride big waves in the ocean.").status == "ok"
    unrelated = judge([1, 2, 3, 4, 5], "A cat sleeps on a laptop keyboard.")
    assert unrelated.status == "invalid" and "shares no content word" in (unrelated.error or "")
    assert judge([6, 7, 8, 12, 2], "A cat sleeps on a laptop keyboard.").status == "ok"  # selected ones count
    outside = judge([1, 2, 3, 4, 13], "A surfer rides a wave.")
    assert outside.status == "invalid" and "outside 1..12" in (outside.error or "")
    assert judge([1, 2, 3, 4, 5], "   ").status == "invalid"


def test_first_n_answers_are_checked_for_sense_too():
    settings = PromptSettings(mode="first-n", n=5)
    shown = CAPTIONS[:5]
    prompt = load_template(settings).render(shown)
    assert judge_answer('{"summary": "A surfer rides a wave."}', settings, shown, prompt).status == "ok"
    copied = judge_answer('{"summary": "your sentence, written about the photo"}', settings, shown, prompt)
    assert copied.status == "invalid" and "placeholder" in (copied.error or "")


def test_official_sampling_sends_no_temperature_and_no_schema():
    backend = OpenAIBackend("m", base_urls=["http://x/v1"], params=GenerationParams(max_new_tokens=500, temperature=None))
    req = ChatRequest(messages=({"role": "user", "content": "q"},), schema={"type": "object"})
    body = backend.request_body(req, "text")
    assert body == {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 500}
    seeded = ChatRequest(messages=req.messages, schema=req.schema, seed=7)
    assert backend.request_body(seeded, "text")["seed"] == 7
    assert request_key("m", {}, seeded) != request_key("m", {}, req)


def test_the_paper_config_uses_the_official_llm_recipe():
    paper = pipeline.load_config(REPO / "configs" / "icsd_coco.yaml").summarize
    assert (paper.prompt, paper.answers, paper.temperature) == ("official", "official", None)
    assert paper.max_new_tokens == 500 and paper.response_format == "text" and paper.mode == "select"
    derived = pipeline.load_config(REPO / "configs" / "ablation_k10.yaml").summarize
    assert derived.prompt == "official" and derived.answers == "official"
    remap = pipeline.load_config(REPO / "configs" / "ablation_no_selection.yaml").summarize
    assert remap.mode == "remap" and remap.n == 5
    default = SummarizeConfig()
    assert default.prompt is None and default.answers == "strict" and default.temperature == 0.0


# ----------------------------------------------------------------------------- stage runs


def run_config(server: ChatServer, **kw) -> SummarizeConfig:
    base = {"backend": "openai", "model": "echo", "base_url": [server.url], "concurrency": 2, "timeout": 5.0,
            "max_retries": 0, "part_size": 4, "seed": 40}  # fmt: skip
    return SummarizeConfig(**{**base, **kw})


def test_retry_re_asks_invalid_groups_with_a_new_seed(tmp_path, coco_captions, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=3)
    run = write_run(tmp_path / "run", captions, candidates)
    bodies: list[dict] = []
    copy_placeholder = {"on": True}

    def respond(request):
        bodies.append(request)
        summary = "str" if copy_placeholder["on"] else first_caption(request)
        return Reply(content=repr({"index": [1, 2, 3, 4, 5], "summary": summary}))  # a Python dict, as gpt-3.5

    with ChatServer(respond) as server:
        cfg = run_config(server, prompt="official", answers="official", temperature=None, response_format="text")
        summarize.run(cfg, run)
        rows = from_table(read_parquet(run.selections), Selection)
        assert {r.status for r in rows} == {"invalid"}  # never ok: the placeholder was copied
        assert all("placeholder" in (r.error or "") for r in rows)
        assert all("seed" not in b and "temperature" not in b and "response_format" not in b for b in bodies)
        assert all(b["max_tokens"] == 500 for b in bodies)

        summarize.run(cfg.model_copy(update={"retry": True}), run)  # the server repeats itself
        assert [b["seed"] for b in bodies[3:]] == [41, 41, 41]  # seed + attempts so far
        copy_placeholder["on"] = False
        summarize.run(cfg.model_copy(update={"retry": True}), run)
        assert [b["seed"] for b in bodies[6:]] == [42, 42, 42]  # a new seed each round, not a cached answer
    rows = from_table(read_parquet(run.selections), Selection)
    assert {r.status for r in rows} == {"ok"} and len(bodies) == 9

    html = failures_section(run)
    assert "placeholder" not in html  # the report counts what the records hold now


def test_the_report_lists_each_status_with_its_reasons(tmp_path, coco_captions, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    captions, candidates = coco_groups(coco_captions, groups=4)
    run = write_run(tmp_path / "run", captions, candidates)
    replies = iter(["{'index': [1, 2, 3, 4, 5], 'summary': 'str'}", "{'index': [0, 1, 2, 3, 4], 'summary': 'x'}"])

    def respond(request):
        return Reply(content=next(replies, json.dumps({"index": [1, 2, 3, 4, 5], "summary": "str"})))

    with ChatServer(respond) as server:
        summarize.run(run_config(server, prompt="official", answers="official", concurrency=1), run)
    html = failures_section(run)
    assert "summary copies the prompt&#x27;s placeholder" in html or "summary copies the prompt's placeholder" in html
    assert "index outside 1.." in html and "<td>ok</td>" not in html and "#..#" not in html  # reasons in words


def test_remap_mode_pairs_the_first_n_without_a_model(tmp_path, coco_captions):
    captions, candidates = coco_groups(coco_captions, groups=4)
    twin = candidates[0].member_ids[:5][::-1] + candidates[2].member_ids[5:]  # same first 5 as group 0
    candidates.append(Candidate(group_id=twin[0], member_ids=twin, scores=[1.0] * len(twin)))
    run = write_run(tmp_path / "run", captions, candidates)
    result = summarize.run(SummarizeConfig(mode="remap", n=5), run)
    rows = {r.group_id: r for r in from_table(read_parquet(run.selections), Selection)}
    texts = {c.caption_id: c.text for c in captions}
    assert set(rows) == {c.group_id for c in candidates[:4]}  # the repeated group is dropped
    for c in candidates[:4]:
        r = rows[c.group_id]
        assert (r.status, r.model, r.raw, r.error) == ("ok", "none", "", None)
        assert r.selected_ids == c.member_ids[:5] and r.summary == texts[c.member_ids[0]]  # the head is rendered
    assert result.counts["duplicates"] == 1 and result.counts["ok"] == 4 and result.counts["requests"] == 0
    again = summarize.run(SummarizeConfig(mode="remap", n=5), run)
    assert again.counts["answered"] == 0 and again.counts["ok"] == 4
