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

from ..utils import inner_model
from .heads import image_embed_dim
from .prompts import TEXT_PROMPT_NAME, TextPrompt, TextPromptConfig, _token_embedding, set_text_prompt

__all__ = ["CoCoOpClassifier", "CoCoOpPrompt", "attach_cocoop_prompt", "cocoop_logits", "create_cocoop_prompt"]


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


def cocoop_logits(model: nn.Module, prompt: CoCoOpPrompt, images: torch.Tensor, class_tokens: torch.Tensor,
                  n_templates: int = 1, text_batch_size: int = 2048) -> torch.Tensor:
    """(B, C) logits of `images` against the class texts (tokenized with `prompt.tokenize`), each image's own.

    `class_tokens` holds C × `n_templates` texts, class-major (every template of class 0 first); a
    class's text features are averaged over its templates, as zero-shot CLIP does. The text tower
    runs on at most `text_batch_size` texts at a time (whole images' blocks of class texts).

    >>> # tokens = prompt.tokenize([f"a photo of a {c}." for c in classes]); cocoop_logits(model, prompt, x, tokens)
    """
    n_texts = len(class_tokens)
    if n_templates < 1 or n_texts % n_templates:
        raise ValueError(f"{n_texts} class texts cannot be split into {n_templates} templates per class")
    image = model.encode_image(images, normalize=True)  # (B, D)
    per_chunk = max(text_batch_size // n_texts, 1)  # images whose class texts go through the tower together
    chunks = []
    for start in range(0, len(image), per_chunk):
        conditioning = image[start:start + per_chunk]
        prompt.condition(conditioning)
        try:
            chunks.append(model.encode_text(class_tokens.repeat(len(conditioning), 1)))  # image-major
        finally:
            prompt.condition(None)
    text = F.normalize(torch.cat(chunks), dim=-1).view(len(image), n_texts // n_templates, n_templates, -1)
    text = F.normalize(text.mean(2), dim=-1)  # (B, C, D)
    return inner_model(model).logit_scale.exp() * torch.einsum("bd,bcd->bc", image, text)


class CoCoOpClassifier(nn.Module):
    """`images -> (B, C) logits` through `model`'s CoCoOp prompt, as a module: DDP and autocast wrap its forward.

    Args:
        model: the adapted model (or its feature-cache wrapper) holding an attached `CoCoOpPrompt`.
        class_tokens: the C × `n_templates` class texts, class-major, tokenized with the prompt's `tokenize`.
        n_templates: templates per class, averaged.
    """

    def __init__(self, model: nn.Module, class_tokens: torch.Tensor, n_templates: int = 1) -> None:
        super().__init__()
        prompt = getattr(inner_model(model), TEXT_PROMPT_NAME, None)
        if not isinstance(prompt, CoCoOpPrompt):
            raise ValueError("this model has no CoCoOp prompt; enable the cocoop strategy")
        self.model, self.n_templates = model, n_templates
        self.register_buffer("class_tokens", class_tokens, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        prompt = getattr(inner_model(self.model), TEXT_PROMPT_NAME)
        return cocoop_logits(self.model, prompt, images, self.class_tokens, self.n_templates)
