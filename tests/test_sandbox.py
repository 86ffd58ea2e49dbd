"""The sandbox world: captions are true of their scenes, the renderer draws what a sentence says,
the selector never keeps two contradicting captions, world files are deterministic."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from icsd.errors import UserError
from icsd.llm.answers import parse_answer
from icsd.llm.prompts import PromptSettings, answer_schema, load_template
from icsd.sandbox.draw import BACKGROUND_RGB, RGB
from icsd.sandbox.lexicon import Description, Mention, conflicts, describe, parse
from icsd.sandbox.make import WORLDS, ensure_world, resolve_path, write_world
from icsd.sandbox.renderer import SandboxCamera, SandboxRenderer, SceneRenderer, parse_model
from icsd.sandbox.selector import answer, candidates_in, topic
from icsd.sandbox.world import agrees, random_scene, realise, scene_captions, scene_description


@pytest.fixture(scope="module")
def scenes() -> list:
    rng = random.Random(11)
    return [random_scene(rng) for _ in range(300)]


def test_captions_never_state_anything_false(scenes: list) -> None:
    rng = random.Random(0)
    for scene in scenes:
        captions = scene_captions(scene, rng)
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            desc = parse(caption)
            assert 1 <= len(desc.objects) <= 3, caption
            assert agrees(desc, scene) == [], (caption, scene)


def test_captions_are_partial_and_varied(scenes: list) -> None:
    rng = random.Random(1)
    captions = [c for s in scenes for c in scene_captions(s, rng)]
    starts = {" ".join(c.split()[:2]) for c in captions}
    assert len(starts) > 40  # many sentence openings, not one template
    full = sum(len(parse(c).objects) == len(s.objects) for s in scenes for c in scene_captions(s, rng))
    assert full < 0.5 * len(captions)  # most captions leave objects out
    assert any("sphere" in c for c in captions) and any("big" in c or "large" in c for c in captions)
    assert any(" two " in f" {c} " or " three " in f" {c} " for c in captions)


def test_description_written_and_read_back_is_the_same(scenes: list) -> None:
    rng = random.Random(2)
    for scene in scenes:
        desc = scene_description(scene)
        assert parse(describe(desc)) == desc
        for caption in scene_captions(scene, rng):
            d = parse(caption)
            assert parse(describe(d)) == d, caption


def test_the_renderer_draws_what_the_sentence_says() -> None:
    """Realise a sentence as a scene; the scene agrees with the sentence, and the captions of that
    scene, parsed back, agree with it too (the render holds what was asked and nothing false)."""
    rng = random.Random(3)
    sentences = [
        "a small red ball on the grass",
        "two big blue boxes on the left and a yellow kite at the top",
        "a green cup on a box in a room with a wooden floor",
        "three white birds above a black boat on a lake",
        "a purple umbrella next to an orange chair",
    ]
    for sentence in sentences:
        said = parse(sentence)
        for seed in range(5):
            scene = realise(said, random.Random(seed))
            assert agrees(said, scene) == [], (sentence, scene)
            assert {o.kind for o in scene.objects} == set(said.objects)  # sparse: only what was named
            for caption in scene_captions(scene, rng):
                assert agrees(parse(caption), scene) == []


def test_renderer_pixels_show_the_named_colour_and_background() -> None:
    generator = SandboxRenderer.load(_spec("world"), "cpu")
    out = generator.generate(["a large red ball in the middle on the sand"], [5], width=64, height=64)
    pixels = out.pixels[0].astype(int)
    corner = pixels[:6, :6].reshape(-1, 3).mean(0)
    assert np.abs(corner - BACKGROUND_RGB["sand"]).max() < 25
    centre = pixels[24:40, 24:40].reshape(-1, 3)
    red = np.abs(centre - RGB["red"]).max(axis=1) < 40
    assert red.mean() > 0.3


def test_renderer_capacity_draws_the_first_kinds_a_prompt_names() -> None:
    five = "a red ball, a blue car, a green tree, a yellow kite and a white cup on the sand"
    for capacity, kinds in ((3, ["ball", "car", "tree"]), (5, ["ball", "car", "tree", "kite", "cup"])):
        scene = SceneRenderer(parse_model(f"world:capacity={capacity}")).scene_for(five, 3)
        assert [o.kind for o in scene.objects] == kinds
    assert parse_model("world").capacity == 3
    for bad in ("world:capacity=0", "world:capacity=6", "world:capacity=2.5"):
        with pytest.raises(UserError, match="capacity"):
            parse_model(bad)


def test_renderer_options_and_errors() -> None:
    assert parse_model("world:extra=0.5,noise=3").extra == 0.5
    from icsd.errors import UserError

    with pytest.raises(UserError, match="--render.model world"):
        parse_model("CompVis/stable-diffusion-v1-4")
    with pytest.raises(UserError, match="unknown sandbox renderer option"):
        parse_model("world:colour=1")
    dense = realise(parse("a red ball"), random.Random(0), extra_objects=1.0)
    assert len(dense.objects) == 5


def test_a_multi_context_summary_renders_a_fuller_scene_than_one_caption() -> None:
    one = realise(parse("a red ball on the grass"), random.Random(0))
    summary = "a red ball on the left, two blue boxes at the top and a green tree in the middle, on the grass"
    many = realise(parse(summary), random.Random(0))
    assert len(one.objects) == 1 and len(many.objects) == 3


def _spec(model: str):
    from icsd.backends.t2i import T2ISpec

    return T2ISpec(model=model, backend="sandbox")


# ----------------------------------------------------------------------------- the selector


def test_selector_never_keeps_two_contradicting_captions(scenes: list) -> None:
    rng = random.Random(4)
    corpus = [c for s in scenes[:60] for c in scene_captions(s, rng)]
    settings = PromptSettings()
    template = load_template(settings)
    ok = invalid = 0
    for trial in range(60):
        head = corpus[trial]
        same_kind = [c for c in corpus if set(parse(c).objects) & set(parse(head).objects)]
        cands = [head, *rng.sample(same_kind, min(20, len(same_kind)))][:30]
        text = answer(template.render(cands), answer_schema(settings, len(cands)))
        parsed = parse_answer(text, settings, len(cands))
        chosen = [parse(cands[i - 1]) for i in (parsed.indices or json.loads(text)["index"])]
        for a, b in itertools.combinations(chosen, 2):
            assert conflicts(a, b) == []
        if parsed.status == "ok":
            ok += 1
            assert 5 <= len(parsed.indices) <= 10
            subject = topic([parse(c) for c in cands])
            assert all(subject in d.objects for d in chosen)  # captions of one image share its subject
            assert len(parsed.summary.split()) <= 50
            merged = parse(parsed.summary)
            assert all(conflicts(merged, d) == [] for d in chosen)
        else:
            invalid += 1
            assert parsed.status == "invalid" and "chosen" in (parsed.error or "")
    assert ok and invalid


def test_selector_reads_the_official_prompt_and_first_n_mode() -> None:
    cands = ["a red ball on the grass", "a blue ball", "a ball and a box", "a red ball on the left", "a tree"]
    official = load_template(PromptSettings(min_select=2), "official")
    assert candidates_in(official.render(cands)) == cands
    text = answer(official.render(cands), answer_schema(PromptSettings(min_select=2), 5))
    assert json.loads(text)["index"] == [1, 3, 4]  # the balls that agree; not the blue one, not the tree
    first_n = PromptSettings(mode="first-n")
    out = parse_answer(answer(load_template(first_n).render(cands), answer_schema(first_n, 5)), first_n, 5)
    assert out.status == "ok" and "red ball" in (out.summary or "")


def test_selector_topic_is_what_most_candidates_name_not_the_head() -> None:
    cands = ["a green tree in a park", "a kite on a lawn", "two red kites", "a kite and a tree", "a yellow kite"]
    assert topic([parse(c) for c in cands]) == "kite"
    text = answer(load_template(PromptSettings(min_select=2), "official").render(cands),
                  answer_schema(PromptSettings(min_select=2), 5))  # fmt: skip
    assert json.loads(text)["index"] == [2, 4, 5]  # "two red kites" says two where "a kite" says one
    assert topic([parse("a lawn")]) is None


def test_conflict_rules() -> None:
    red = Description(objects={"ball": Mention("ball", colour="red")})
    blue = Description(objects={"ball": Mention("ball", colour="blue")})
    two = Description(objects={"ball": Mention("ball", count=2)}, background="snow")
    sand = Description(objects={"box": Mention("box")}, background="sand")
    assert conflicts(red, blue) and not conflicts(red, two) and conflicts(two, sand)


# ----------------------------------------------------------------------------- world files


def test_world_files_are_deterministic_and_complete(tmp_path: Path) -> None:
    spec = WORLDS["small"]
    a, b = write_world(spec, tmp_path / "a"), write_world(spec, tmp_path / "b")
    for name in ("train.txt", "train_scenes.json", "val.json", "test.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    test = json.loads((a / "test.json").read_text())
    assert len(test["images"]) == spec.test_scenes and len(test["annotations"]) == 5 * spec.test_scenes
    assert all((a / "test" / im["file_name"]).is_file() for im in test["images"])
    assert len((a / "train.txt").read_text().splitlines()) == 5 * spec.train_scenes


def test_sandbox_paths_in_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICSD_SANDBOX_DIR", str(tmp_path))
    path = Path(resolve_path("sandbox:small/test.json"))
    assert path.is_file() and path.parent.parent == tmp_path
    assert ensure_world("small") == path.parent  # reused, not rewritten
    from icsd.config import Layer, resolve_layers

    cfg = resolve_layers([Layer("test", {"ingest": {"corpus": "sandbox:small/train.txt"}})]).config
    assert Path(cfg.ingest.corpus or "").read_text().count("\n") == 5 * WORLDS["small"].train_scenes


def test_camera_draws_the_hidden_scene_of_a_training_caption(tmp_path: Path) -> None:
    folder = write_world(WORLDS["small"], tmp_path / "w")
    entry = json.loads((folder / "train_scenes.json").read_text())["scenes"][0]
    generator = SandboxCamera.load(_camera_spec(SandboxCamera.prepare(str(folder), tmp_path)), "cpu")
    scene = generator.scene_for(entry["captions"][0], 1)
    assert scene.to_json() == entry["scene"]


def _camera_spec(model: str):
    from icsd.backends.t2i import T2ISpec

    return T2ISpec(model=model, backend="sandbox-camera")


# ----------------------------------------------------------------------------- configs


def test_quickstart_is_the_sandbox_world_and_smoke_keeps_the_real_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from icsd import pipeline

    monkeypatch.setenv("ICSD_SANDBOX_DIR", str(tmp_path))
    quick = pipeline.load_config(None)
    assert (
        quick.name == "quickstart"
        and quick.summarize.backend == "sandbox"
        and quick.render.backend == "sandbox"
    )
    assert quick.train.preset == "sandbox" and quick.evaluate.benchmark == "sandbox-test"
    assert Path(quick.ingest.corpus or "").is_file() and Path(quick.evaluate.images or "").is_dir()
    assert Path(quick.train.val_images or "").is_dir()
    smoke = pipeline.load_config("pkg:configs/smoke.yaml")
    assert smoke.name == "smoke" and smoke.summarize.backend == "transformers" and smoke.render.tiny_random
    assert smoke.evaluate.benchmark == "coco-captions"


def test_sandbox_experiment_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from icsd import pipeline

    monkeypatch.setenv("ICSD_SANDBOX_DIR", str(tmp_path))
    root = Path(__file__).resolve().parents[1] / "configs"
    icsd = pipeline.load_config(root / "sandbox_icsd.yaml")
    uni = pipeline.load_config(root / "sandbox_uni_context.yaml")
    assert uni.pairs.kinds == ["uni"] and uni.render.prompts == "captions" and uni.train == icsd.train
    assert "summarize" not in pipeline.enabled_stages(uni)
    assert pipeline.load_config(root / "sandbox_no_selection.yaml").summarize.mode == "first-n"
    assert pipeline.load_config(root / "sandbox_summary_pairs.yaml").pairs.kinds == ["summary"]
    oracle = pipeline.load_config(root / "sandbox_oracle.yaml")
    assert (
        oracle.render.backend == "sandbox-camera"
        and (Path(oracle.render.model) / "train_scenes.json").is_file()
    )


def test_report_shows_test_images_with_caption_and_references(tmp_path: Path) -> None:
    from icsd.sandbox.report import test_examples_section

    world = write_world(WORLDS["small"], tmp_path / "w")
    test = json.loads((world / "test.json").read_text())
    run = tmp_path / "run"
    (run / "eval" / "sandbox-test").mkdir(parents=True)
    preds = [{"image_id": im["id"], "caption": f"a <b>caption</b> {im['id']}"} for im in test["images"]]
    (run / "eval" / "sandbox-test" / "predictions.json").write_text(json.dumps(preds))
    config = {
        "annotations": str(world / "test.json"),
        "images": str(world / "test"),
        "benchmark": "sandbox-test",
    }
    (run / "manifest.json").write_text(json.dumps({"stages": {"evaluate": {"config": config}}}))
    html = test_examples_section(run, limit=3)
    assert html.count("data:image/png;base64,") == 3 and "&lt;b&gt;caption" in html
    first = test["annotations"][0]["caption"]
    assert first.replace("'", "&#x27;") in html


def test_report_puts_the_run_beside_the_documented_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from icsd.sandbox import report

    run = tmp_path / "run"
    (run / "eval" / "sandbox-test").mkdir(parents=True)
    (run / "eval" / "sandbox-test" / "scores.json").write_text(
        json.dumps({"scores": {"CIDEr": 0.5, "Bleu_4": 0.2}})
    )
    # a world anywhere (ICSD_SANDBOX_DIR may point outside any folder named sandbox)
    world = write_world(WORLDS["small"], tmp_path / "worlds" / "mine")
    config = {"annotations": str(world / "test.json"), "images": str(world / "test"), "benchmark": "sandbox-test"}
    (run / "manifest.json").write_text(json.dumps({"stages": {"evaluate": {"config": config}}}))
    # the format benchmarks/sandbox_compare.py --publish writes: sd and "N seeds" in a note
    figures = {
        "note": "n",
        "methods": {
            "uni_context": {"CIDEr_mean": 0.4, "CIDEr_sd": 0.01, "Bleu_4_mean": 0.1, "note": "3 seeds"},
            "fixed caption (bound)": {"CIDEr_mean": 0.17, "CIDEr_sd": 0.0, "note": "a red star"},
        },
    }
    monkeypatch.setattr(report, "reference_scores", lambda: figures)
    html = report.comparison_section(run)
    # t interval of 3 seeds: 0.4 +- 4.303 * 0.01 / sqrt(3)
    assert "this run" in html and "0.500" in html and "uni context" in html and "0.375 – 0.425" in html
    assert "a red star" not in html and "<th></th>" not in html and "bound" in html
    assert html.index("this run") < html.index("uni context")  # best first
    assert "above every documented method" in html
    # what the comparison script publishes besides: the world and the paired difference
    figures["world"] = "default@2026"
    figures["icsd_minus_uni_context"] = {"mean": -0.08, "ci": [-0.15, -0.01], "seeds": [0, 1, 2], "decision": "ICSD is not better"}
    html = report.comparison_section(run)
    assert "paired over seeds 0, 1, 2: -0.080 (95 % interval -0.150 to -0.010); ICSD is not better." in html
    assert "world default@2026" in html
    coco = tmp_path / "sandbox" / "coco.json"  # a benchmark that is no world, whatever its path says
    coco.parent.mkdir()
    coco.write_text("{}")
    config["annotations"] = str(coco)
    (run / "manifest.json").write_text(json.dumps({"stages": {"evaluate": {"config": config}}}))
    assert report.comparison_section(run) == ""


def test_sandbox_vision_encoder_grid_and_saved_round_trip(tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModel

    from icsd.sandbox.vision import SandboxVisionConfig, SandboxVisionModel

    torch.manual_seed(0)
    model = SandboxVisionModel(SandboxVisionConfig(image_size=32, channels=[8, 16, 24], hidden_size=24, num_attention_heads=2))
    pixels = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert out.last_hidden_state.shape == (3, 8 * 8, 24)  # 32 px halved twice: an 8x8 grid
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "icsd_sandbox_vision"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=pixels).last_hidden_state, out.last_hidden_state, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        SandboxVisionModel(SandboxVisionConfig(image_size=30, channels=[8, 16, 24]))


def test_kind_probe_benchmark_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sandbox_kind_probe.py"
    spec = importlib.util.spec_from_file_location("sandbox_kind_probe", path)
    assert spec and spec.loader
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    monkeypatch.setattr(sys, "argv", ["probe", "--images", "32", "--steps", "2", "--batch-size", "4"])
    probe.main()
    out = capsys.readouterr().out
    assert "vit" in out and "conv" in out and "conv / vit:" in out
    shares = [float(line.split("kinds found ")[1].split()[0]) for line in out.splitlines() if " step " in line]
    assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)


def test_packaged_encoder_binds_colour_size_and_cell_to_each_object_in_camera_pictures() -> None:
    """The shipped encoder (with its pretraining label head) on camera pictures of scenes it never saw:
    which kinds are there, and for each, its own colour, size and cell, well above chance."""
    from dataclasses import asdict

    from icsd.sandbox.draw import CAMERA
    from icsd.sandbox.pretrain import (
        PACKAGED,
        PretrainSettings,
        chance_scores,
        label_scores,
        labelled_images,
        load_encoder,
        probe_scores,
    )

    encoder = load_encoder("world")
    pixels, labels = labelled_images(150, 31337, CAMERA, 64)
    found = probe_scores(label_scores(PACKAGED, encoder, pixels), labels)
    chance = chance_scores(labels)
    assert found["kinds"] > 0.8 > 3 * chance["kinds"]
    assert found["colour"] > 0.8 > 5 * chance["colour"]  # the colour of *that* object, not any colour shown
    assert found["size"] > 0.65 > 1.5 * chance["size"] and found["position"] > 0.8 > 3 * chance["position"]
    assert found["background"] > 0.9
    record = json.loads((PACKAGED / "pretraining.json").read_text())
    assert record["settings"] == asdict(PretrainSettings())  # the packaged encoder is the command's defaults


def test_sandbox_captioner_trains_only_its_decoder_on_the_frozen_packaged_encoder() -> None:
    import torch

    from icsd.backends.captioners import CaptionerSpec, build_caption_model

    cm = build_caption_model(CaptionerSpec(preset="sandbox"))
    encoder_params = {id(p) for p in cm.model.encoder.parameters()}
    trainable = cm.trainable_parameters()
    assert trainable and not encoder_params & {id(p) for p in trainable}
    cm.model.train()
    assert not cm.model.encoder.training and cm.model.decoder.training  # batch norm keeps its statistics
    before = {k: v.clone() for k, v in cm.model.encoder.state_dict().items()}
    cm.model(pixel_values=torch.randn(4, 3, 64, 64), labels=torch.ones(4, 3, dtype=torch.long))
    assert all(torch.equal(before[k], v) for k, v in cm.model.encoder.state_dict().items())
    random = build_caption_model(CaptionerSpec(preset="sandbox", vision_model="random", image_size=32))
    assert all(p.requires_grad for p in random.model.encoder.parameters())
    with pytest.raises(UserError, match="takes 64 px images, not 32"):
        build_caption_model(CaptionerSpec(preset="sandbox", image_size=32))
    with pytest.raises(UserError, match="no sandbox encoder in"):
        build_caption_model(CaptionerSpec(preset="sandbox", vision_model="/nonexistent/encoder"))


def test_encoder_command_writes_a_frozen_encoder_the_captioner_loads(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from icsd.backends.captioners import CaptionerSpec, build_caption_model
    from icsd.cli import app

    out = tmp_path / "enc"
    result = CliRunner().invoke(
        app, ["sandbox", "encoder", "--out", str(out), "--steps", "3", "--images", "16", "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "kinds" in result.output and "chance" in result.output
    assert {"config.json", "model.safetensors", "label_head.safetensors", "pretraining.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "pretraining.json").read_text())["settings"]["steps"] == 3
    cm = build_caption_model(CaptionerSpec(preset="sandbox", vision_model=str(out)))
    assert cm.model.encoder.config.frozen and not any(p.requires_grad for p in cm.model.encoder.parameters())


def test_the_sandbox_chain_end_to_end_and_the_kind_true_diagnostic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ICSD chain in a small world (the quickstart's config, its paths pointed at the `small`
    world, fewer steps): every stage runs, the report shows the test images and the documented
    figures; then the comparison script's kind-true copy drops exactly the pairs that name a kind
    their image does not show."""
    import importlib.util

    from icsd import pipeline

    monkeypatch.setenv("ICSD_SANDBOX_DIR", str(tmp_path / "worlds"))
    overrides = {
        "ingest.corpus": "sandbox:small/train.txt",
        "summarize.sample": 80,
        "train.val_images": "sandbox:small/val",
        "train.val_captions": "sandbox:small/val.json",
        "train.max_steps": 20,
        "train.eval_every": 10,
        "train.save_every": 10,
        "evaluate.annotations": "sandbox:small/test.json",
        "evaluate.images": "sandbox:small/test",
        "evaluate.metrics": ["BLEU", "CIDEr"],
        "report.sample_groups": 3,
    }
    cfg = pipeline.load_config(Path(__file__).resolve().parents[1] / "configs" / "sandbox_icsd.yaml", overrides)
    result = pipeline.run(cfg, tmp_path / "run", echo=lambda _: None)
    root = result.run.root
    assert result.ran == pipeline.enabled_stages(cfg)
    assert cfg.train.preset == "sandbox" and "score" not in result.ran
    scores = json.loads((root / "eval" / "sandbox-test" / "scores.json").read_text())
    assert scores.get("scores", scores)["CIDEr"] > 0
    html = (root / "report.html").read_text()
    assert "Test images: the model" in html and "This run beside the documented comparison" in html

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sandbox_compare.py"
    spec = importlib.util.spec_from_file_location("sandbox_compare", path)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stats = bench.pair_statistics(root)
    assert stats["objects_per_image"] > 1 and 0 < stats["pairs_all_true"] <= stats["pairs_naming_only_kinds_shown"] <= 1
    pairs, scenes, _ = bench.rendered_pairs(root)
    false = sum(not bench.names_only_kinds_shown(p["caption"], scenes[p["image_key"]]) for p in pairs)
    copy = tmp_path / "kind_true"
    assert bench.kind_true_copy(root, copy) == false
    kept, _, _ = bench.rendered_pairs(copy)
    assert len(kept) == len(pairs) - false
    assert bench.pair_statistics(copy)["pairs_naming_only_kinds_shown"] == 1.0
    manifest = json.loads((copy / "manifest.json").read_text())
    assert "train" not in manifest["stages"] and "pairs" in manifest["stages"]
    assert not (copy / "train").exists()


def test_close_up_draws_short_prompts_larger_and_a_lone_object_in_the_middle() -> None:
    """``world:close_up=1``: the composition gap of a text-to-image model (few objects drawn large,
    a lone one centred); pictures of five groups and the default renderer are unchanged."""
    import numpy as np

    from icsd.sandbox.draw import draw_scene
    from icsd.sandbox.renderer import SceneRenderer, parse_model

    def picture(model: str, prompt: str) -> np.ndarray:
        renderer = SceneRenderer(parse_model(model))
        scene = renderer.scene_for(prompt, 11)
        return draw_scene(scene.background, list(scene.objects), size=64, seed=11, style=renderer.settings.style)

    def object_pixels(img: np.ndarray) -> np.ndarray:  # anything not the flat background colour
        return np.argwhere(np.abs(img.astype(int) - img[0, 0].astype(int)).sum(axis=2) > 60)

    lone = "a red ball on the left of the picture on the snow"
    plain, close = object_pixels(picture("world", lone)), object_pixels(picture("world:close_up=1", lone))
    assert len(close) > 2.5 * len(plain)
    assert plain[:, 1].mean() < 22 and 26 < close[:, 1].mean() < 38  # the left cell, then the middle
    five = "a red ball, a blue car, a green tree, a yellow kite and a white cup on the sand"
    assert np.array_equal(picture("world:capacity=5", five), picture("world:capacity=5,close_up=1", five))
    assert not np.array_equal(picture("world", five), picture("world:close_up=1,jitter=0.2", five))
