"""Shared contract tests, one base class per registry of :mod:`icsd.backends.registry`.

A registered entry gets the whole suite by subclassing, the way diffusers' PipelineTesterMixin
works: name the entry and say how to get its tiny model, e.g.::

    class TestMyFamily(CaptionerContract):
        preset = "my-family"

        def make_spec(self, parts):
            return CaptionerSpec(preset="my-family", vision_model=str(parts["clip"]), text_model=str(parts["gpt2"]))

Everything runs on the CPU with tiny random models (``tests/tiny_models.py``) in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from contract_base import Contract, contract_subclasses, missing_hook  # noqa: F401 (re-exported)
from tiny_models import tiny_images

from icsd.backends.captioners import CaptionerSpec, CaptionModel, build_caption_model, load_captioner
from icsd.backends.embedders import detect_kind, load_embedder
from icsd.backends.registry import CAPTIONERS, EMBEDDERS, T2I_BACKENDS
from icsd.backends.t2i import T2ISpec

CAPTIONS = ["A dog sits on a couch.", "two cats   sleeping in the sun"]


# ----------------------------------------------------------------------------- captioner families


class CaptionerContract(Contract):
    """What every captioner family does: build, loss, text batch, generate, save, load."""

    names = "preset"
    preset: ClassVar[str]
    min_new_tokens: ClassVar[int] = 3
    max_new_tokens: ClassVar[int] = 6
    beams: ClassVar[int] = 2

    def make_spec(self, parts: dict[str, Path]) -> CaptionerSpec:
        """The spec of a tiny model of the family (``parts``: tiny CLIP, BERT and GPT-2 folders)."""
        raise missing_hook(self, "make_spec(self, parts)", "the CaptionerSpec of a tiny model of the family")

    @pytest.fixture(scope="class")
    def built(self, tiny_caption_parts: dict[str, Path]) -> CaptionModel:
        torch.manual_seed(0)
        spec = self.make_spec(tiny_caption_parts).model_copy(
            update={"beams": self.beams, "min_new_tokens": self.min_new_tokens, "max_new_tokens": self.max_new_tokens}
        )
        return build_caption_model(spec)

    @pytest.fixture(scope="class")
    def saved(self, built: CaptionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
        folder = tmp_path_factory.mktemp(f"captioner-{self.preset}") / "ckpt"
        built.save(folder)
        return folder

    @pytest.fixture(scope="class")
    def pixels(self, built: CaptionModel) -> torch.Tensor:
        images = tiny_images(2, size=built.image_size + 8)
        return built.image_processor(images, return_tensors="pt")["pixel_values"]  # type: ignore[no-any-return]

    def test_builds_its_registered_family(self, built: CaptionModel) -> None:
        assert built.family is CAPTIONERS.get(self.preset) and built.family.name == self.preset
        assert built.spec.preset == self.preset
        assert built.trainable_parameters()
        assert built.family.lr > 0 and isinstance(built.family.augment, bool)

    def test_its_options_are_train_settings(self) -> None:
        """The family's ``Options`` is the model registered beside it (when one is), and each of its
        fields is a setting of the train section, handed back validated as the family's options."""
        from icsd.config import TrainConfig
        from icsd.registry import import_entry

        family = CAPTIONERS.get(self.preset)
        hint = CAPTIONERS.options_entry(self.preset)
        assert hint is None or import_entry(hint) is family.Options, f"register {self.preset} with options={family.Options}"
        section = TrainConfig.section().model_fields
        assert set(family.Options.model_fields) <= set(section)
        options = TrainConfig(preset=self.preset, beams=2).options()
        assert isinstance(options, family.Options) and (options.preset, options.beams) == (self.preset, 2)

    def test_text_batch_labels_only_the_caption(self, built: CaptionModel) -> None:
        batch = built.text_batch(CAPTIONS, 16)
        assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
        assert batch.input_ids.shape[0] == len(CAPTIONS)
        assert (batch.labels[batch.attention_mask == 0] == -100).all()
        assert (batch.labels[:, 0] == -100).all()  # the start (or the image/prompt) is never a target
        assert batch.tokens() > 0
        fixed = built.text_batch(CAPTIONS[:1], 16, fixed=True)
        assert fixed.input_ids.shape[1] == built.text_batch(CAPTIONS, 16, fixed=True).input_ids.shape[1]

    def test_loss_is_finite_and_backpropagates(self, built: CaptionModel, pixels: torch.Tensor) -> None:
        batch = built.text_batch(CAPTIONS, 16)
        # a training-mode forward may update buffers (batch-norm statistics); the class's other
        # tests compare this model with its saved copy, so they are put back after
        buffers = {name: b.clone() for name, b in built.model.named_buffers()}
        built.model.train()
        loss = built.loss_module(0.1)(pixels, batch.input_ids, batch.attention_mask, batch.labels)
        try:
            assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
            loss.backward()
            grads = [p.grad for p in built.trainable_parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            assert any(g.abs().sum() > 0 for g in grads)
        finally:
            built.model.zero_grad(set_to_none=True)
            built.model.eval()
            with torch.no_grad():
                for name, b in built.model.named_buffers():
                    b.copy_(buffers[name])

    def test_generate_keeps_within_min_and_max_new_tokens(
        self, built: CaptionModel, pixels: torch.Tensor
    ) -> None:
        built.model.eval()
        settings = {
            "num_beams": self.beams,
            "min_new_tokens": self.min_new_tokens,
            "max_new_tokens": self.max_new_tokens,
        }
        with torch.inference_mode():
            new = built.family.generate(built.model, built.tokenizer, pixels, built.prompt, **settings)
        assert new.shape[0] == len(pixels) and new.shape[1] <= self.max_new_tokens
        eos = built.model.generation_config.eos_token_id
        for row in new.tolist():
            length = row.index(eos) if eos in row else len(row)
            assert self.min_new_tokens <= length <= self.max_new_tokens
        texts = built.captioner("cpu").caption(
            tiny_images(2, size=40), beams=self.beams, max_new_tokens=self.max_new_tokens
        )
        assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    def test_saved_checkpoint_loads_and_captions_the_same(self, built: CaptionModel, saved: Path) -> None:
        images = tiny_images(2, size=40, seed=1)
        kwargs = {
            "beams": self.beams,
            "min_new_tokens": self.min_new_tokens,
            "max_new_tokens": self.max_new_tokens,
        }
        loaded = load_captioner(str(saved), "cpu")
        assert loaded.family is built.family and loaded.prompt == built.prompt
        assert loaded.caption(images, **kwargs) == built.captioner("cpu").caption(images, **kwargs)

    def test_saved_folder_loads_with_plain_transformers(
        self, built: CaptionModel, saved: Path, pixels: torch.Tensor
    ) -> None:
        import transformers

        files = {p.name for p in saved.iterdir()}
        assert {"model.safetensors", "config.json", "generation_config.json"} <= files
        assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
        config = transformers.AutoConfig.from_pretrained(saved)
        assert config.model_type == built.family.model_type
        model_class = getattr(transformers, config.architectures[0])
        model, info = model_class.from_pretrained(saved, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"]
        transformers.AutoTokenizer.from_pretrained(saved)
        transformers.AutoImageProcessor.from_pretrained(saved)
        assert model.generation_config.max_new_tokens == self.max_new_tokens
        batch = built.text_batch(CAPTIONS, 16)
        built.model.eval()
        with torch.no_grad():
            ours = built.family.logits(built.model, pixels, batch.input_ids, batch.attention_mask)
            theirs = built.family.logits(model.eval(), pixels, batch.input_ids, batch.attention_mask)
        assert torch.allclose(ours, theirs, atol=1e-5)


# ----------------------------------------------------------------------------- embedders


class EmbedderContract(Contract):
    """What every embedder does: (n, dim) float32 rows, L2-normalised, deterministic, order-free."""

    names = "kind"
    kind: ClassVar[str]

    @pytest.fixture(scope="class")
    def model(self, request: pytest.FixtureRequest) -> str:
        """The tiny model's name or folder (override in the subclass)."""
        raise missing_hook(self, "a class-scoped fixture model()", "the tiny model's name or folder")

    @pytest.fixture(scope="class")
    def embedder(self, model: str) -> Any:
        return load_embedder(model, kind=self.kind, device="cpu", batch_size=3)

    def texts(self) -> list[str]:
        return [
            "a dog on a couch",
            "two cats",
            "a red bus parked near the road in the rain",
            "x",
            "a dog on a couch",
        ]

    def test_registered_under_its_kind(self, embedder: Any) -> None:
        assert isinstance(embedder, EMBEDDERS.get(self.kind))
        info = embedder.describe()
        assert info["kind"] == self.kind and info["dim"] == embedder.dim

    def test_rows_are_float32_unit_vectors(self, embedder: Any) -> None:
        out = embedder.embed(self.texts())
        assert out.shape == (len(self.texts()), embedder.dim) and out.dtype == np.float32
        assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
        assert np.allclose(out[0], out[-1], atol=1e-6)  # the same text, the same vector

    def test_deterministic_whatever_the_order_and_batching(self, embedder: Any, model: str) -> None:
        texts = self.texts()
        first = embedder.embed(texts)
        assert np.array_equal(first, embedder.embed(texts))
        assert np.allclose(first[::-1], embedder.embed(texts[::-1]), atol=1e-5)
        other = load_embedder(model, kind=self.kind, device="cpu", batch_size=1)
        assert np.allclose(first, other.embed(texts), atol=1e-5)

    def test_progress_counts_every_text_and_empty_input_works(self, embedder: Any) -> None:
        seen: list[int] = []
        embedder.embed(self.texts(), progress=seen.append)
        assert sum(seen) == len(self.texts())
        assert embedder.embed([]).shape == (0, embedder.dim)

    def test_auto_picks_this_kind_for_its_model(self, model: str) -> None:
        assert detect_kind(model) == self.kind
        assert isinstance(load_embedder(model, kind="auto", device="cpu"), EMBEDDERS.get(self.kind))


# ----------------------------------------------------------------------------- text-to-image backends


class T2IContract(Contract):
    """What every text-to-image backend does: prompts + per-item seeds -> images of the asked size,
    the same seed -> the same image whatever the batch, one NSFW flag per image."""

    names = "backend"
    backend: ClassVar[str]
    steps: ClassVar[int] = 2

    @pytest.fixture(scope="class")
    def model(self, request: pytest.FixtureRequest) -> str:
        """The ``model`` argument the backend is given (override in the subclass)."""
        raise missing_hook(self, "a class-scoped fixture model()", "the model argument the backend is given")

    @pytest.fixture(scope="class")
    def generator(self, model: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
        entry = T2I_BACKENDS.get(self.backend)
        path = entry.prepare(model, tmp_path_factory.mktemp(f"t2i-cache-{self.backend}"))
        return entry.load(T2ISpec(model=path, backend=self.backend), "cpu")

    def render(
        self, generator: Any, prompts: list[str], seeds: list[int], width: int = 32, height: int = 32
    ) -> Any:
        return generator.generate(prompts, seeds, steps=self.steps, guidance=7.5, width=width, height=height)

    def test_describes_itself(self, generator: Any, model: str) -> None:
        entry = T2I_BACKENDS.get(self.backend)
        assert isinstance(entry.model_label(model), str) and entry.model_label(model)
        assert isinstance(entry.untrained, bool)
        assert isinstance(generator.has_safety_checker, bool)
        assert generator.pipeline_class and generator.scheduler_name and generator.device == "cpu"

    def test_images_of_the_asked_size_and_one_flag_each(self, generator: Any) -> None:
        out = self.render(generator, ["a red cube on a table", "a blue ball"], [1, 2], width=48, height=32)
        assert out.pixels.shape == (2, 32, 48, 3) and out.pixels.dtype == np.uint8
        assert len(out.nsfw) == 2 and all(f is None or isinstance(f, bool) for f in out.nsfw)
        if generator.has_safety_checker:
            assert all(isinstance(f, bool) for f in out.nsfw)

    def test_same_seed_same_image_whatever_the_batch(self, generator: Any) -> None:
        both = self.render(generator, ["a red cube on a table", "a red cube on a table"], [7, 8])
        alone = self.render(generator, ["a red cube on a table"], [7])
        assert np.array_equal(both.pixels[0], alone.pixels[0])
        assert not np.array_equal(both.pixels[0], both.pixels[1])

    def test_prompts_and_seeds_must_pair(self, generator: Any) -> None:
        with pytest.raises(ValueError):
            self.render(generator, ["a", "b"], [1])
