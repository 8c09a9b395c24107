"""CoCoOp (Zhou et al., 2022): CoOp's context vectors plus an offset a meta-network reads off each image.

For an image with features f, the context of every class prompt is ctx + π(f), π a
Linear → ReLU → Linear meta-network (bottleneck width / 16, as in the paper). The text tower
therefore runs once per (image, class): `cocoop_logits` arranges the texts image-major and the
prompt's hook adds each image's offset to its block of class prompts.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .heads import image_embed_dim
from .prompts import TextPrompt, TextPromptConfig, _token_embedding, set_text_prompt

__all__ = ["CoCoOpPrompt", "attach_cocoop_prompt", "cocoop_logits", "create_cocoop_prompt"]


class CoCoOpPrompt(TextPrompt):
    """A shared CoOp context whose vectors move by `meta_net(image features)` for each conditioning image."""

    def __init__(self, config: TextPromptConfig, width: int, tokenizer: Callable, token_embedding: nn.Embedding,
                 image_dim: int) -> None:
        if config.class_specific:
            raise ValueError("CoCoOp uses one shared context (class_specific=False)")
        super().__init__(config, width, tokenizer, token_embedding)
        hidden = max(image_dim // 16, 1)
        self.meta_net = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.offsets: torch.Tensor | None = None  # (B, width) while conditioned on B images

    def condition(self, image_features: torch.Tensor | None) -> None:
        """Condition the next text batches on (B, D) image features (None: plain CoOp context)."""
        self.offsets = None if image_features is None else self.meta_net(image_features.to(self.ctx.dtype))

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.offsets is None:
            return super().hook(module, inputs, output)
        per_image, rest = divmod(output.shape[0], len(self.offsets))
        if rest:
            raise ValueError(f"{output.shape[0]} texts cannot be split among {len(self.offsets)} conditioning images")
        ctx = (self.ctx.unsqueeze(0) + self.offsets.unsqueeze(1)).to(output.dtype)  # (B, n_ctx, width)
        ctx = ctx.repeat_interleave(per_image, dim=0)  # image-major: all class texts of image 0 first
        start, n = self.start, self.config.n_ctx
        return torch.cat([output[:, :start], ctx, output[:, start + n:]], dim=1)


def create_cocoop_prompt(model: nn.Module, config: TextPromptConfig, tokenizer: Callable) -> CoCoOpPrompt:
    """A CoCoOp prompt (context and meta-network) for `model`'s text tower, on its device, not yet attached."""
    embedding = _token_embedding(model)
    prompt = CoCoOpPrompt(config, embedding.embedding_dim, tokenizer, embedding, image_embed_dim(model))
    return prompt.to(embedding.weight.device)


def attach_cocoop_prompt(model: nn.Module, config: TextPromptConfig, tokenizer: Callable) -> CoCoOpPrompt:
    """Add a trainable CoCoOp prompt to `model`'s text tower (it is the model's text prompt while attached)."""
    prompt = create_cocoop_prompt(model, config, tokenizer)
    set_text_prompt(model, prompt)
    return prompt


def cocoop_logits(model: nn.Module, prompt: CoCoOpPrompt, images: torch.Tensor,
                  class_tokens: torch.Tensor) -> torch.Tensor:
    """(B, C) logits of `images` against the C class texts (tokenized with `prompt.tokenize`), each image's own.

    >>> # tokens = prompt.tokenize([f"a photo of a {c}." for c in classes]); cocoop_logits(model, prompt, x, tokens)
    """
    image = model.encode_image(images, normalize=True)  # (B, D)
    prompt.condition(image)
    try:
        tokens = class_tokens.repeat(len(image), 1)  # (B * C, L), image-major
        text = F.normalize(model.encode_text(tokens), dim=-1).view(len(image), len(class_tokens), -1)
    finally:
        prompt.condition(None)
    return model.logit_scale.exp() * torch.einsum("bd,bcd->bc", image, text)
