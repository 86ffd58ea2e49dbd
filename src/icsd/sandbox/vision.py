"""The ``sandbox`` captioner's image encoder: a small convolutional network whose 8x8 feature grid
is the sequence the decoder's cross-attention reads.

Why not a ViT: trained from random weights on a few thousand 64 px images for a few hundred steps,
a ViT with linear 8 px patches does not learn to tell the world's 20 object kinds apart (a kind
probe on camera images stays near chance), while convolutions with batch norm and max pooling,
which see a shape the same wherever it sits, do (``docs/sandbox.md``, "The captioner").

The ``sandbox`` preset does not train it through the caption loss (that stays at chance on the
kinds): it loads it pretrained on the renderer's pictures and frozen (:mod:`.pretrain`).

It is an ordinary transformers model (``PretrainedConfig`` + ``PreTrainedModel``, registered with
``AutoConfig``/``AutoModel`` when this module is imported), so ``VisionEncoderDecoderModel`` saves
it as safetensors and loads it back like any other encoder.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "icsd_sandbox_vision"


class SandboxVisionConfig(PretrainedConfig):
    """``channels``: one 3x3 convolution (+ batch norm, ReLU) per stage, each stage but the last
    followed by 2x2 max pooling, so a 64 px image becomes an 8x8 grid with four stages; then a
    linear map to ``hidden_size``, learned grid positions and ``num_hidden_layers`` transformer
    layers over the grid. ``frozen``: the model keeps its weights and batch-norm statistics
    (no gradients, always in eval mode), as a pretrained feature extractor."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        image_size: int = 64,
        num_channels: int = 3,
        channels: list[int] | tuple[int, ...] = (16, 32, 64, 96),
        hidden_size: int = 96,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 4,
        intermediate_size: int = 192,
        layer_norm_eps: float = 1e-5,
        frozen: bool = False,
        **kwargs: Any,
    ) -> None:
        self.image_size = image_size
        self.num_channels = num_channels
        self.channels = list(channels)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.frozen = frozen
        super().__init__(**kwargs)

    @property
    def downsampling(self) -> int:
        """How much smaller the grid's side is than the image's: 2 per pooled stage."""
        return 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> int:
        """Side of the output grid."""
        return self.image_size // self.downsampling


class SandboxVisionModel(PreTrainedModel):
    """pixels ``[B, 3, S, S]`` -> ``last_hidden_state`` ``[B, grid*grid, hidden_size]`` (and its mean
    as ``pooler_output``)."""

    config_class = SandboxVisionConfig
    base_model_prefix = "sandbox_vision"
    main_input_name = "pixel_values"

    def __init__(self, config: SandboxVisionConfig) -> None:
        super().__init__(config)
        if config.image_size % config.downsampling:
            raise ValueError(f"image size {config.image_size} is not a multiple of {config.downsampling}")
        layers: list[nn.Module] = []
        previous = config.num_channels
        for i, width in enumerate(config.channels):
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if i < len(config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.stem = nn.Sequential(*layers)
        self.project = nn.Linear(previous, config.hidden_size)
        self.position = nn.Parameter(torch.zeros(1, config.grid**2, config.hidden_size))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.hidden_size,
                config.num_attention_heads,
                config.intermediate_size,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
                layer_norm_eps=config.layer_norm_eps,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()
        self.apply_frozen()

    def apply_frozen(self) -> SandboxVisionModel:
        """No gradients and eval mode when the config says ``frozen``. ``from_pretrained`` makes fresh
        parameters that want gradients again, so :func:`.pretrain.load_encoder` calls this after
        loading (training resumes by loading weights into a built model, which keeps them frozen)."""
        if self.config.frozen:
            self.requires_grad_(False)
            self.eval()
        return self

    def train(self, mode: bool = True) -> SandboxVisionModel:
        """A frozen encoder stays in eval mode (its batch norm keeps the pretrained statistics)."""
        return super().train(mode and not self.config.frozen)

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's own defaults, written with transformers' guarded init functions: loading a
        # checkpoint marks what it loaded, and these leave marked tensors (batch-norm statistics
        # included) alone, where ``reset_parameters()`` would zero them.
        if isinstance(module, SandboxVisionModel):
            init.normal_(module.position, std=0.02)
        elif isinstance(module, nn.Linear | nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):  # always tracks running statistics here
                for stat, fill in (("running_mean", init.zeros_), ("running_var", init.ones_), ("num_batches_tracked", init.zeros_)):
                    fill(getattr(module, stat))

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **_: Any,
    ) -> BaseModelOutputWithPooling:
        features = self.stem(pixel_values)  # [B, C, g, g]
        x = self.project(features.flatten(2).transpose(1, 2)) + self.position
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        x = self.norm(x)
        return BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=x.mean(1),
            hidden_states=tuple(states) if output_hidden_states else None,
        )


AutoConfig.register(MODEL_TYPE, SandboxVisionConfig, exist_ok=True)
AutoModel.register(SandboxVisionConfig, SandboxVisionModel, exist_ok=True)
