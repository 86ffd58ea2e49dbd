"""Image-grouped training steps: the same loss and gradients as the ungrouped step on repeated images."""

from __future__ import annotations

import pytest
import torch

from icsd.backends.captioners import CaptionerSpec, build_caption_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = [
    ["a dog on the grass", "a brown dog runs", "the dog plays with a ball in a park", "dog", "a dog and a frisbee"],
    ["a red bus in the street", "a bus parked near a building", "a city street with a double decker bus",
     "the bus is red", "a large vehicle", "people wait for a bus", "a bus stop"],
    ["a plate of food", "pasta with tomato sauce", "dinner on a table", "a fork next to a plate", "food",
     "a meal", "a white plate", "an italian dish"],
]  # fmt: skip


def grads(cm) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in cm.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "image_size", [64, 48]
)  # 48: vision hidden size differs -> enc_to_dec projection too
def test_grouped_loss_and_gradients_equal_the_ungrouped_step(image_size):
    torch.manual_seed(0)
    cm = build_caption_model(CaptionerSpec(preset="tiny", image_size=image_size, dropout=0.0))
    if image_size == 48:  # a decoder wider than the encoder: VisionEncoderDecoder's projection runs
        from transformers import BertConfig, BertLMHeadModel

        from icsd.backends.captioners import TinyCaptioner

        dec = BertLMHeadModel(BertConfig(vocab_size=len(cm.tokenizer), is_decoder=True, add_cross_attention=True,
                                         hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))  # fmt: skip
        cm = TinyCaptioner.compose(cm.model.encoder, dec, cm.tokenizer, cm.image_processor, cm.spec)
        assert hasattr(cm.model, "enc_to_dec_proj")
    cm.model.train()
    loss_module = cm.loss_module(0.1)
    images = torch.randn(len(CAPTIONS), 3, image_size, image_size)  # augmentation fixed: one view per image
    index = torch.tensor([i for i, texts in enumerate(CAPTIONS) for _ in texts])
    text = cm.text_batch([c for texts in CAPTIONS for c in texts], 40)

    ungrouped = loss_module(images.index_select(0, index), text.input_ids, text.attention_mask, text.labels)
    ungrouped.backward()
    want = grads(cm)
    cm.model.zero_grad(set_to_none=True)
    grouped = loss_module(images, text.input_ids, text.attention_mask, text.labels, image_index=index)
    grouped.backward()
    got = grads(cm)

    assert torch.allclose(grouped.detach(), ungrouped.detach(), rtol=1e-5, atol=1e-5)
    assert set(got) == set(want) and len(got) > 50
    for name, g in want.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name
    # normalised per caption token exactly as the ungrouped step: same token count, same mean loss
    assert float(grouped.detach()) / text.tokens() == pytest.approx(
        float(ungrouped.detach()) / text.tokens(), rel=1e-5
    )


def test_default_grouping_repeats_the_images():
    from icsd.backends.captioners import CaptionerFamily

    seen = {}

    class Probe(CaptionerFamily):
        @classmethod
        def logits(cls, model, images, input_ids, attention_mask):
            seen["images"] = images
            return torch.zeros(len(input_ids), input_ids.shape[1], 5, requires_grad=True)

    images = torch.arange(3.0).reshape(3, 1)
    ids = torch.ones(4, 3, dtype=torch.long)
    Probe.loss(None, images, ids, ids, ids, image_index=torch.tensor([0, 0, 2, 1]))
    assert seen["images"].flatten().tolist() == [0.0, 0.0, 2.0, 1.0]
