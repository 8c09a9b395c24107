"""Prompt tuning: learned text context vectors (CoOp) and visual prompt tokens (VPT).

Both attach to a frozen open_clip `CLIP` through forward hooks, so the base's own
forward code runs unchanged and the prompts compose with LoRA and partial tuning. The
hooks call whichever prompt module the model holds at the time (or none), so prompts
can be swapped or removed at run time (`set_text_prompt`, `set_visual_prompt`).

Where the hooks go comes from the tower family registry (`peftclip.families`): text
prompts write over the token embeddings of any text family (open_clip's text transformer,
Hugging Face RoBERTa / T5 / M2M100 encoders); visual prompts need a plain ViT token
sequence (open_clip's ViT, timm ViT / SigLIP / ViTamin / EVA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ..families import block_paths, family_of, tower_prefix
from ..utils import ConfigMixin

__all__ = ["TEXT_PROMPT_NAME", "VISUAL_PROMPT_NAME", "TextPrompt", "TextPromptConfig", "VisualPrompt",
           "VisualPromptConfig", "attach_text_prompt", "attach_visual_prompt", "create_text_prompt",
           "create_visual_prompt", "set_text_prompt", "set_visual_prompt"]

TEXT_PROMPT_NAME = "peftclip_text_prompt"
VISUAL_PROMPT_NAME = "peftclip_visual_prompt"
_PLACEHOLDER = "X"  # one token in every CLIP tokenizer; its embeddings are overwritten by the context vectors
# Vision trunks whose blocks read one token sequence that prompts can extend: the tower's own
# class for open_clip's ViT, the trunk's class for timm towers (not VisionTransformerRelPos, whose
# relative position tables have a fixed sequence length).
_VPT_TRUNKS = ("VisionTransformer", "Eva")
_VPT_APPLIES = "visual prompts apply to ViT towers only (open_clip ViT, timm ViT / SigLIP / ViTamin / EVA)"


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

    n_tokens: int = field(default=4, metadata={
        "help": "Number of visual prompt tokens, placed after the class/register tokens (first, if none)."})
    deep: bool = field(default=False, metadata={"help": "Fresh prompt tokens at every block (VPT-deep)."})

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens={self.n_tokens}: must be at least 1")


def _tokenizer_layout(tokenizer: Callable) -> tuple[int, int]:
    """(position of the first text token, pad id) of `tokenizer`, read off its own output.

    Tokenizers differ: open_clip's puts a start token first, RoBERTa's `<s>`, T5's nothing.
    One placeholder and two placeholders first differ right after the first placeholder.
    """
    one, two = tokenizer([_PLACEHOLDER, f"{_PLACEHOLDER} {_PLACEHOLDER}"])
    differ = (one != two).nonzero()
    if not len(differ):
        raise ValueError(f"the tokenizer maps {_PLACEHOLDER!r} to nothing; text prompts need it as one token")
    return int(differ[0]) - 1, int(one[-1])  # the last position of a one-word text is padding


class TextPrompt(nn.Module):
    """Context vectors written over the placeholder tokens after the start token (or first, without one).

    Texts must be tokenized with `tokenize`, which puts `n_ctx` placeholders before the text.
    The placeholders are real tokens, so the text tower's padding mask covers the context
    and open_clip's end-of-text argmax pooling still finds the end token.
    """

    def __init__(self, config: TextPromptConfig, width: int, tokenizer: Callable,
                 token_embedding: nn.Embedding) -> None:
        super().__init__()
        if config.class_specific and config.n_classes is None:
            raise ValueError("class_specific text prompts need n_classes")
        self.config = config
        self._tokenizer = tokenizer
        self.start, pad = _tokenizer_layout(tokenizer)
        if config.ctx_init:
            ids, empty = tokenizer([config.ctx_init, ""])
            n_words = int((ids != pad).sum() - (empty != pad).sum())  # the phrase's tokens, specials aside
            config.n_ctx = n_words
            with torch.no_grad():
                words = ids[self.start:self.start + n_words].to(token_embedding.weight.device)
                init = token_embedding(words).float()
        else:
            init = torch.randn(config.n_ctx, width) * 0.02
        if config.class_specific:
            init = init.unsqueeze(0).repeat(config.n_classes, 1, 1)
        self.ctx = nn.Parameter(init.clone())  # (n_ctx, width) or (n_classes, n_ctx, width)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids with `n_ctx` placeholders before each text."""
        prefix = " ".join([_PLACEHOLDER] * self.config.n_ctx)
        return self._tokenizer([f"{prefix} {text}" for text in texts])

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        start, n = self.start, self.config.n_ctx
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
        return torch.cat([output[:, :start], ctx, output[:, start + n:]], dim=1)


class VisualPrompt(nn.Module):
    """Prompt tokens placed after the `n_prefix` class/register tokens; replaced at every block when deep.

    They are dropped again after the last block, as VPT discards the last layer's prompt
    outputs, so every pooling (class token, average, attention pool) sees the tokens it
    was built for.
    """

    def __init__(self, config: VisualPromptConfig, width: int, n_blocks: int, n_prefix: int = 1) -> None:
        super().__init__()
        self.config = config
        self.n_prefix = n_prefix
        depth = n_blocks if config.deep else 1
        self.prompts = nn.Parameter(torch.randn(depth, config.n_tokens, width) * 0.02)

    def _with_prompts(self, x: torch.Tensor, index: int, replace: bool) -> torch.Tensor:
        p, n = self.n_prefix, self.config.n_tokens
        prompts = self.prompts[index].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :p], prompts, x[:, p + n if replace else p:]], dim=1)

    def insert(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """After the embedding (`ln_pre` / `norm_pre`): (B, p + P, D) -> (B, p + n + P, D)."""
        return self._with_prompts(output, 0, replace=False)

    def before_block(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pre-hook of block `index`: that block's prompts (deep, after block 0); rotary embeddings padded."""
        x = args[0]
        if self.config.deep and index:
            x = self._with_prompts(x, index, replace=True)
        rope = kwargs.get("rope")
        if rope is not None:  # EVA: the prompts sit among the rotated tokens; they get the identity rotation
            half = rope.shape[-1] // 2  # sin and cos, concatenated
            shape = (*rope.shape[:-2], self.config.n_tokens, half)
            identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)
            kwargs = {**kwargs, "rope": torch.cat([identity, rope], dim=-2)}
        return (x, *args[1:]), kwargs

    def drop(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """After the last block: (B, p + n + P, D) -> (B, p + P, D)."""
        p = self.n_prefix
        return torch.cat([output[:, :p], output[:, p + self.config.n_tokens:]], dim=1)


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


def _token_embedding(model: nn.Module) -> nn.Embedding:
    """The text tower's token embedding, found through its family."""
    family = family_of(model, "text")
    if family.class_token is None:
        raise ValueError(f"the {family.name} text tower has no token embedding peftclip knows; text prompts "
                         f"cannot apply (LoRA and partial strategies can)")
    return model.get_submodule(tower_prefix(model, "text") + family.class_token)


def create_text_prompt(model: nn.Module, config: TextPromptConfig, tokenizer: Callable) -> TextPrompt:
    """Context vectors for `model`'s text tower, on its device, not yet attached."""
    embedding = _token_embedding(model)
    prompt = TextPrompt(config, embedding.embedding_dim, tokenizer, embedding)
    return prompt.to(embedding.weight.device)


def set_text_prompt(model: nn.Module, prompt: TextPrompt | None) -> None:
    """Make `prompt` the text context of `model` (None: plain text tower); hooks are installed once."""
    embedding = _token_embedding(model)
    if not _hooked(embedding, TEXT_PROMPT_NAME):
        embedding.register_forward_hook(_Dispatch(model, TEXT_PROMPT_NAME, "hook"))
    model.register_module(TEXT_PROMPT_NAME, prompt)


def attach_text_prompt(model: nn.Module, config: TextPromptConfig, tokenizer: Callable) -> TextPrompt:
    """Add trainable context vectors to `model`'s text tower; returns the module (use its `tokenize`)."""
    prompt = create_text_prompt(model, config, tokenizer)
    set_text_prompt(model, prompt)
    return prompt


def _vision_layout(model: nn.Module) -> tuple[nn.Module, int, int]:
    """(module whose output is the token sequence, its width, its number of class/register tokens)."""
    family = family_of(model, "vision")
    visual = model.visual
    trunk = getattr(visual, "trunk", visual)
    if type(trunk).__name__ not in _VPT_TRUNKS or family.name not in ("vit", "timm-vit"):
        raise ValueError(f"the {family.name} vision tower ({type(trunk).__name__}) takes no visual prompts: "
                         f"{_VPT_APPLIES}; LoRA and partial strategies apply to it")
    if trunk is visual:  # open_clip's own ViT: one class token
        if not getattr(visual.transformer, "batch_first", True):
            raise ValueError("visual prompts need a batch-first vision transformer")
        return visual.ln_pre, visual.transformer.width, 1
    return trunk.norm_pre, trunk.embed_dim, trunk.num_prefix_tokens


def create_visual_prompt(model: nn.Module, config: VisualPromptConfig) -> VisualPrompt:
    """Prompt tokens for `model`'s vision transformer, on its device, not yet attached."""
    embed, width, n_prefix = _vision_layout(model)
    prompt = VisualPrompt(config, width, len(block_paths(model, "vision")), n_prefix)
    return prompt.to(next(model.visual.parameters()).device)


def set_visual_prompt(model: nn.Module, prompt: VisualPrompt | None) -> None:
    """Make `prompt` the visual prompt of `model` (None: plain vision tower); hooks are installed once."""
    embed, _, _ = _vision_layout(model)
    if not _hooked(embed, VISUAL_PROMPT_NAME):
        embed.register_forward_hook(_Dispatch(model, VISUAL_PROMPT_NAME, "insert"))
        blocks = [model.get_submodule(path) for path in block_paths(model, "vision")]
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(_Dispatch(model, VISUAL_PROMPT_NAME, "before_block", index),
                                            with_kwargs=True)
        blocks[-1].register_forward_hook(_Dispatch(model, VISUAL_PROMPT_NAME, "drop"))
    model.register_module(VISUAL_PROMPT_NAME, prompt)


def attach_visual_prompt(model: nn.Module, config: VisualPromptConfig) -> VisualPrompt:
    """Add trainable prompt tokens to `model`'s vision transformer; returns the module."""
    prompt = create_visual_prompt(model, config)
    set_visual_prompt(model, prompt)
    return prompt
