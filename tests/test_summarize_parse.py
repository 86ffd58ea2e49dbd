"""Prompt templates, answer parsing and the small pure helpers of the LLM client."""

from __future__ import annotations

import email.utils
import random
import time

import pytest

from icsd.errors import UserError
from icsd.llm import ChatRequest, GenerationParams
from icsd.llm.answers import first_json_object, parse_answer
from icsd.llm.cache import LLMCache, request_key
from icsd.llm.local import local_model_label, resolve_local_model
from icsd.llm.openai import OpenAIBackend, backoff_delay, resolve_api_key, retry_after_seconds
from icsd.llm.prompts import PromptSettings, answer_schema, load_template
from icsd.testing.chat_server import numbered_lines

SEL = PromptSettings()


@pytest.mark.parametrize(
    ("text", "status", "indices", "error"),
    [
        ('{"index": [1, 2, 3, 4, 5], "summary": "A dog runs on a beach."}', "ok", [1, 2, 3, 4, 5], None),
        ('```json\n{"index": [3, 1, 2, 4, 5], "summary": "x y"}\n```', "ok", [3, 1, 2, 4, 5], None),
        ('Here you go: {"index": [1,2,3,4,5,6], "summary": "x"} -- done', "ok", [1, 2, 3, 4, 5, 6], None),
        ('{"summary": "x", "index": [1,2,3,4,5], "note": "extra keys are ignored"}', "ok", [1, 2, 3, 4, 5], None),
        ('{"index": [1, 2, 3, 4, 5], "summary": "unterminated', "parse_error", [], "no JSON object"),
        ("The captions describe a beach.", "parse_error", [], "no JSON object"),
        ("{'index': [1, 2, 3, 4, 5], 'summary': 'python, not JSON'}", "parse_error", [], "no JSON object"),
        ('{"index": [0, 1, 2, 3, 4], "summary": "x"}', "invalid", [], "outside 1..12"),
        ('{"index": [1, 2, 3, 4, 13], "summary": "x"}', "invalid", [], "outside 1..12"),
        ('{"index": [1, 2, 2, 3, 4], "summary": "x"}', "invalid", [], "more than once"),
        ('{"index": [1, 2, 3], "summary": "x"}', "invalid", [], "3 captions chosen, 5..10 required"),
        ('{"index": [1,2,3,4,5,6,7,8,9,10,11], "summary": "x"}', "invalid", [], "11 captions chosen"),
        ('{"index": [1, 2, 3, 4, "5"], "summary": "x"}', "invalid", [], "index.4"),
        ('{"index": [1, 2, 3, 4, true], "summary": "x"}', "invalid", [], "index.4"),
        ('{"index": [1, 2, 3, 4, 5], "summary": "   "}', "invalid", [], "summary is empty"),
        ('{"index": [1, 2, 3, 4, 5], "summary": 7}', "invalid", [], "summary"),
        ('{"index": [1, 2, 3, 4, 5]}', "invalid", [], "summary: Field required"),
        ('{"indices": [1, 2, 3, 4, 5], "summary": "x"}', "invalid", [], "index: Field required"),
        ('{"index": [1, 2, 3, 4, 5], "summary": "' + "word " * 51 + '"}', "invalid", [], "51 words, at most 50"),
    ],
)
def test_parse_answer_statuses(text, status, indices, error):
    parsed = parse_answer(text, SEL, k=12)
    assert parsed.status == status
    assert parsed.indices == indices
    if error is None:
        assert parsed.error is None and parsed.summary
    else:
        assert error in parsed.error


def test_summary_whitespace_is_normalised_and_first_object_wins():
    parsed = parse_answer('{"index": [1,2,3,4,5], "summary": " A  dog\\n runs. "} {"index": [9]}', SEL, k=5)
    assert parsed.summary == "A dog runs."
    assert first_json_object('text [1, 2] {"a": {"b": 1}} {"c": 2}') == {"a": {"b": 1}}
    assert first_json_object("{ broken { \"ok\": true }") == {"ok": True}


def test_bounds_shrink_for_small_candidate_sets():
    assert parse_answer('{"index": [1, 2, 3], "summary": "x"}', SEL, k=3).status == "ok"
    assert SEL.bounds(3) == (3, 3) and SEL.bounds(30) == (5, 10)


def test_first_n_answers_need_only_a_summary():
    settings = PromptSettings(mode="first-n", n=4)
    parsed = parse_answer('{"summary": "Two dogs."}', settings, k=4)
    assert parsed.status == "ok" and parsed.indices == [1, 2, 3, 4]
    assert parse_answer('{"index": [1]}', settings, k=4).status == "invalid"


def test_templates_render_numbered_candidates_and_hash_their_settings(tmp_path):
    template = load_template(SEL)
    text = template.render(["a dog", "a cat", "a bird"])
    assert "1. a dog\n2. a cat\n3. a bird" in text and '"index"' in text and "at most 50 words" in text
    assert numbered_lines({"messages": [{"role": "user", "content": text}]}) == 3
    assert load_template(PromptSettings(max_words=30)).hash != template.hash
    first_n = load_template(PromptSettings(mode="first-n"))
    assert first_n.hash != template.hash and '"index"' not in first_n.render(["a"])

    own = tmp_path / "p.txt"
    own.write_text("{% for c in candidates %}[{{ loop.index }}] {{ c }}\n{% endfor %}")
    assert load_template(SEL, own).render(["x", "y"]) == "[1] x\n[2] y"
    own.write_text("{{ candidates | join(', ') }} {{ missing_name }}")
    with pytest.raises(UserError, match="failed to render"):
        load_template(SEL, own).render(["x"])
    own.write_text("no captions here")
    with pytest.raises(UserError, match="candidates"):
        load_template(SEL, own)
    own.write_text("{% for c in candidates %}")
    with pytest.raises(UserError, match="line 1"):
        load_template(SEL, own)
    with pytest.raises(UserError, match="not found"):
        load_template(SEL, tmp_path / "nope.txt")
    own.write_text("{{ candidates.__class__.__mro__ }}")
    with pytest.raises(UserError):  # templates run sandboxed
        load_template(SEL, own).render(["x"])


def test_answer_schema_matches_the_rules():
    schema = answer_schema(SEL, 30)
    assert schema["required"] == ["index", "summary"]
    idx = schema["properties"]["index"]
    assert (idx["minItems"], idx["maxItems"], idx["items"]["maximum"]) == (5, 10, 30)
    assert answer_schema(PromptSettings(mode="first-n"), 5)["required"] == ["summary"]
    # strict answers: the grammar must close the summary (a small model otherwise runs on to its
    # token limit and the JSON is cut off); official answers keep any length
    assert schema["properties"]["summary"] == {"type": "string", "minLength": 1, "maxLength": 400}
    official = answer_schema(PromptSettings(answers="official"), 30)["properties"]["summary"]
    assert "maxLength" not in official and official["minLength"] == 1


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    now = time.time()
    date = email.utils.formatdate(now + 20, usegmt=True)
    assert 18 <= retry_after_seconds({"retry-after": date}, now=now) <= 21
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(0)
    delays = [backoff_delay(a, 1.0, 8.0, rng) for a in range(6)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    assert all(4.0 <= d <= 8.0 for d in delays[3:])
    assert len({backoff_delay(2, 1.0, 8.0, rng) for _ in range(20)}) > 1


def test_api_key_comes_only_from_the_environment(monkeypatch):
    monkeypatch.delenv("ICSD_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="ICSD_TEST_KEY"):
        resolve_api_key("ICSD_TEST_KEY", [])
    assert resolve_api_key("ICSD_TEST_KEY", ["http://127.0.0.1:8000/v1"]) == "EMPTY"
    monkeypatch.setenv("ICSD_TEST_KEY", "sk-secret")
    assert resolve_api_key("ICSD_TEST_KEY", []) == "sk-secret"
    backend = OpenAIBackend("m", api_key_env="ICSD_TEST_KEY")
    assert "sk-secret" not in repr(backend.describe())


def test_request_body_per_response_format():
    backend = OpenAIBackend("m", base_urls=["http://x/v1"], params=GenerationParams(max_new_tokens=9))
    req = ChatRequest(messages=({"role": "user", "content": "q"},), schema={"type": "object"})
    assert backend.request_body(req, "json_schema")["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert backend.request_body(req, "json_object")["response_format"] == {"type": "json_object"}
    with_schema = backend.request_body(req, "json_object+schema")["response_format"]
    assert with_schema == {"type": "json_object", "schema": {"type": "object"}}
    body = backend.request_body(req, "text")
    assert "response_format" not in body and body["max_tokens"] == 9 and body["temperature"] == 0.0


def test_local_model_resolution(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_local_model(str(gguf), None) == (str(tmp_path), "m.Q4.gguf")
    assert resolve_local_model("org/model", None) == ("org/model", None)
    assert local_model_label("org/model", "f.gguf") == "org/model/f.gguf"
    with pytest.raises(UserError, match="not found"):
        resolve_local_model(str(tmp_path / "missing.gguf"), None)


def test_cache_round_trip_and_key_sensitivity(tmp_path):
    req = ChatRequest(messages=({"role": "user", "content": "q"},))
    key = request_key("m", {"t": 0}, req)
    assert key == request_key("m", {"t": 0}, req)
    assert key != request_key("m2", {"t": 0}, req) and key != request_key("m", {"t": 1}, req)
    assert key != request_key("m", {"t": 0}, ChatRequest(messages=({"role": "user", "content": "q2"},)))
    with LLMCache(tmp_path / "c.sqlite") as cache:
        assert cache.get(key) is None and len(cache) == 0
        cache.put(key, "answer", "m")
        cache.commit()
    with LLMCache(tmp_path / "c.sqlite") as cache:
        assert cache.get(key) == "answer" and len(cache) == 1
