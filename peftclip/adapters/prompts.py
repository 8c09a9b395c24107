"""Prompt tuning: learned text context vectors (CoOp) and visual prompt tokens (VPT).

Both attach to a frozen open_clip `CLIP` through forward hooks, so the base's own
forward code runs unchanged and the prompts compose with LoRA and partial tuning. The
hooks call whichever prompt module the model holds at the time (or none), so prompts
can be swapped or removed at run time (`set_text_prompt`, `set_visual_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ..utils import ConfigMixin

__all__ = ["TEXT_PROMPT_NAME", "VISUAL_PROMPT_NAME", "TextPrompt", "TextPromptConfig", "VisualPrompt",
           "VisualPromptConfig", "attach_text_prompt", "attach_visual_prompt", "create_text_prompt",
           "create_visual_prompt", "set_text_prompt", "set_visual_prompt"]

TEXT_PROMPT_NAME = "peftclip_text_prompt"
VISUAL_PROMPT_NAME = "peftclip_visual_prompt"
_PLACEHOLDER = "X"  # one BPE token; its embeddings are overwritten by the context vectors


@dataclass
class TextPromptConfig(ConfigMixin):
    """CoOp-style learned context replacing the prompt words before a class name or caption."""

    section: ClassVar[str] = "text_prompt"

    n_ctx: int = field(default=4, metadata={"help": "Number of learned context vectors."})
    ctx_init: str | None = field(default=None, metadata={
        "help": "Initialise from this phrase's token embeddings (e.g. 'a photo of a'); sets n_ctx."})
    class_specific: bool = field(default=False, metadata={"help": "One context per class instead of shared."})
    n_classes: int | None = field(default=None, metadata={"help": "Number of classes, for class_specific."})

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx={self.n_ctx}: must be at least 1")
        if self.n_classes is not None and self.n_classes < 1:
            raise ValueError(f"n_classes={self.n_classes}: must be at least 1")




@dataclass
class VisualPromptConfig(ConfigMixin):
    """VPT: learned tokens inserted after the class token, at the input (shallow) or every block (deep)."""

    section: ClassVar[str] = "visual_prompt"

    n_tokens: int = field(default=4, metadata={"help": "Number of visual prompt tokens."})
    deep: bool = field(default=False, metadata={"help": "Fresh prompt tokens at every block (VPT-deep)."})

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens={self.n_tokens}: must be at least 1")




class TextPrompt(nn.Module):
    """Context vectors written over the placeholder tokens after start-of-text.

    Texts must be tokenized with `tokenize`, which puts `n_ctx` placeholders after the
    start token; the end-of-text token stays the largest id, so open_clip's argmax
    pooling still finds it.
    """

    def __init__(self, config: TextPromptConfig, width: int, tokenizer: Callable,
                 token_embedding: nn.Embedding) -> None:
        super().__init__()
        if config.class_specific and config.n_classes is None:
            raise ValueError("class_specific text prompts need n_classes")
        self.config = config
        self._tokenizer = tokenizer
        if config.ctx_init:
            ids = tokenizer([config.ctx_init])[0]
            n_words = int((ids != 0).sum()) - 2  # drop start and end tokens
            config.n_ctx = n_words
            with torch.no_grad():
                init = token_embedding(ids[1:1 + n_words].to(token_embedding.weight.device)).float()
        else:
            init = torch.randn(config.n_ctx, width) * 0.02
        if config.class_specific:
            init = init.unsqueeze(0).repeat(config.n_classes, 1, 1)
        self.ctx = nn.Parameter(init.clone())  # (n_ctx, width) or (n_classes, n_ctx, width)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids with `n_ctx` placeholders after the start token."""
        prefix = " ".join([_PLACEHOLDER] * self.config.n_ctx)
        return self._tokenizer([f"{prefix} {text}" for text in texts])

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        n = self.config.n_ctx
        ctx = self.ctx.to(output.dtype)
        if self.config.class_specific:
            # Texts come class-major: every template of class 0, then of class 1, ...
            per_class, rest = divmod(output.shape[0], self.config.n_classes)
            if rest or not per_class:
                raise ValueError(f"class-specific prompts need texts for all {self.config.n_classes} classes "
                                 f"in class order, got {output.shape[0]} texts")
            ctx = ctx.repeat_interleave(per_class, dim=0)
        else:
            ctx = ctx.unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], ctx, output[:, 1 + n:]], dim=1)


class VisualPrompt(nn.Module):
    """Prompt tokens placed right after the class token; replaced at every block when deep."""

    def __init__(self, config: VisualPromptConfig, width: int, n_blocks: int) -> None:
        super().__init__()
        self.config = config
        depth = n_blocks if config.deep else 1
        self.prompts = nn.Parameter(torch.randn(depth, config.n_tokens, width) * 0.02)

    def insert(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """After `ln_pre`: (B, 1 + P, D) -> (B, 1 + n + P, D)."""
        prompts = self.prompts[0].to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], prompts, output[:, 1:]], dim=1)

    def replace(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Pre-hook of block `index`: write that block's prompts over the prompt positions (deep only)."""
        if not self.config.deep:
            return None
        x = args[0]
        n = self.config.n_tokens
        prompts = self.prompts[index].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return (torch.cat([x[:, :1], prompts, x[:, 1 + n:]], dim=1), *args[1:]), kwargs


class _Dispatch:
    """A hook that calls `method` of the prompt module `model` holds under `attr`, or does nothing.

    A plain object rather than a closure, so that `copy.deepcopy(model)` points the copy's
    hooks at the copy.
    """

    def __init__(self, model: nn.Module, attr: str, method: str, *args: int) -> None:
        self.model, self.attr, self.method, self.args = model, attr, method, args

    def __call__(self, *hook_args: object) -> object:
        prompt = getattr(self.model, self.attr, None)
        return None if prompt is None else getattr(prompt, self.method)(*self.args, *hook_args)


def _hooked(module: nn.Module, attr: str, pre: bool = False) -> bool:
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    return any(isinstance(h, _Dispatch) and h.attr == attr for h in hooks.values())


def create_text_prompt(model: nn.Module, config: TextPromptConfig, tokenizer: Callable) -> TextPrompt:
    """Context vectors for `model`'s text tower, on its device, not yet attached."""
    if not hasattr(model, "token_embedding"):
        raise ValueError(f"{type(model).__name__} has no token_embedding; text prompts need open_clip's CLIP")
    prompt = TextPrompt(config, model.token_embedding.embedding_dim, tokenizer, model.token_embedding)
    return prompt.to(model.token_embedding.weight.device)


def set_text_prompt(model: nn.Module, prompt: TextPrompt | None) -> None:
    """Make `prompt` the text context of `model` (None: plain text tower); hooks are installed once."""
    if not _hooked(model.token_embedding, TEXT_PROMPT_NAME):
        model.token_embedding.register_forward_hook(_Dispatch(model, TEXT_PROMPT_NAME, "hook"))
    model.register_module(TEXT_PROMPT_NAME, prompt)


def attach_text_prompt(model: nn.Module, config: TextPromptConfig, tokenizer: Callable) -> TextPrompt:
    """Add trainable context vectors to `model`'s text tower; returns the module (use its `tokenize`)."""
    prompt = create_text_prompt(model, config, tokenizer)
    set_text_prompt(model, prompt)
    return prompt


def create_visual_prompt(model: nn.Module, config: VisualPromptConfig) -> VisualPrompt:
    """Prompt tokens for `model`'s vision transformer, on its device, not yet attached."""
    visual = model.visual
    if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "attn_pool", None) is not None:
        raise ValueError("visual prompts need class-token pooling (pool_type='tok')")
    if not visual.transformer.batch_first:
        raise ValueError("visual prompts need a batch-first vision transformer")
    prompt = VisualPrompt(config, visual.transformer.width, len(visual.transformer.resblocks))
    return prompt.to(visual.conv1.weight.device)


def set_visual_prompt(model: nn.Module, prompt: VisualPrompt | None) -> None:
    """Make `prompt` the visual prompt of `model` (None: plain vision tower); hooks are installed once."""
    visual = model.visual
    if not _hooked(visual.ln_pre, VISUAL_PROMPT_NAME):
        visual.ln_pre.register_forward_hook(_Dispatch(model, VISUAL_PROMPT_NAME, "insert"))
        for index, block in enumerate(visual.transformer.resblocks):
            if index:  # block 0 sees the prompts `insert` placed
                block.register_forward_pre_hook(_Dispatch(model, VISUAL_PROMPT_NAME, "replace", index),
                                                with_kwargs=True)
    model.register_module(VISUAL_PROMPT_NAME, prompt)


def attach_visual_prompt(model: nn.Module, config: VisualPromptConfig) -> VisualPrompt:
    """Add trainable prompt tokens to `model`'s vision transformer; returns the module."""
    prompt = create_visual_prompt(model, config)
    set_visual_prompt(model, prompt)
    return prompt
