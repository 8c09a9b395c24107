"""MaPLe (Khattak et al., 2023): text prompts at the first J blocks, vision prompts coupled to them.

The text tower gets `prompt_length` learned context tokens over placeholders (as CoOp) at its input and
fresh ones before each of its blocks 1..J-1. The vision tower's prompts at the same depths are
not parameters of their own: they are `coupling[j](text_ctx[j])`, a linear map from the text
width to the vision width, so every image-side loss also trains the text prompts. After block J
the prompt tokens travel on like any other token; vision prompts are dropped after the last
block (as in VPT). Native open_clip ViT and text towers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ..families import block_paths
from ..utils import ConfigMixin
from .prompts import (
    _PLACEHOLDER,
    VISUAL_PROMPT_NAME,
    VisualPrompt,
    VisualPromptConfig,
    _Dispatch,
    _token_embedding,
    _tokenizer_layout,
    _vision_layout,
    set_visual_prompt,
)

__all__ = ["MapleConfig", "MaplePrompt", "add_maple_text_hooks", "attach_maple_prompt", "create_maple_prompt",
           "set_maple_prompt"]


@dataclass
class MapleConfig(ConfigMixin):
    """How many context tokens and how deep the coupled prompts go (the paper: 2 tokens, J = 9)."""

    section: ClassVar[str] = "maple"

    prompt_length: int = field(default=2, metadata={"help": "Context tokens per tower (n_ctx in CoOp terms)."})
    prompt_depth: int = field(default=9, metadata={"help": "J: blocks (from the first) that get fresh prompts."})

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length={self.prompt_length}: must be at least 1")
        if self.prompt_depth < 1:
            raise ValueError(f"prompt_depth={self.prompt_depth}: must be at least 1")


class MaplePrompt(VisualPrompt):
    """Text context per depth (`text_ctx`) and the linear couplings that make the vision prompts from it."""

    def __init__(self, config: MapleConfig, text_width: int, vision_width: int, n_blocks: int,
                 tokenizer: Callable) -> None:
        super().__init__(VisualPromptConfig(n_tokens=config.prompt_length, deep=True), vision_width, n_blocks)
        del self.prompts  # the vision prompts are a function of the text prompts
        self.maple = config
        self._tokenizer = tokenizer
        self.start, _ = _tokenizer_layout(tokenizer)
        self.text_ctx = nn.Parameter(torch.randn(config.prompt_depth, config.prompt_length, text_width) * 0.02)
        self.coupling = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in range(config.prompt_depth))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids with `prompt_length` placeholders before each text, where the text context goes."""
        return self._tokenizer([" ".join([_PLACEHOLDER] * self.maple.prompt_length + [text]) for text in texts])

    def vision_prompts(self, index: int) -> torch.Tensor:
        """(prompt_length, vision width) prompts of depth `index`: the coupling of that depth's text context."""
        return self.coupling[index](self.text_ctx[index])

    def _with_prompts(self, x: torch.Tensor, index: int, replace: bool) -> torch.Tensor:
        prompts = self.vision_prompts(index).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], prompts, x[:, 1 + self.maple.prompt_length if replace else 1:]], dim=1)

    def before_block(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if 0 < index < self.maple.prompt_depth:
            return (self._with_prompts(args[0], index, replace=True), *args[1:]), kwargs
        return args, kwargs

    def _with_text(self, x: torch.Tensor, index: int) -> torch.Tensor:
        ctx = self.text_ctx[index].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :self.start], ctx, x[:, self.start + self.maple.prompt_length:]], dim=1)

    def text_insert(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """After the token embedding: the depth-0 text context over the placeholders."""
        return self._with_text(output, 0)

    def text_before_block(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if 0 < index < self.maple.prompt_depth:
            return (self._with_text(args[0], index), *args[1:]), kwargs
        return args, kwargs


class _TextDispatch(_Dispatch):
    """A text-tower hook that calls the visual prompt module only when it is a MaPLe prompt."""

    def __call__(self, *hook_args: object) -> object:
        return super().__call__(*hook_args) if isinstance(getattr(self.model, self.attr, None), MaplePrompt) else None


def create_maple_prompt(model: nn.Module, config: MapleConfig, tokenizer: Callable) -> MaplePrompt:
    """MaPLe prompts for a native open_clip ViT model, on its device, not yet attached."""
    embedding = _token_embedding(model)
    _, vision_width, n_prefix = _vision_layout(model)
    vision_blocks, text_blocks = block_paths(model, "vision"), block_paths(model, "text")
    if n_prefix != 1 or config.prompt_depth > min(len(vision_blocks), len(text_blocks)):
        raise ValueError(f"MaPLe needs a class-token ViT and prompt_depth={config.prompt_depth} at most the "
                         f"{min(len(vision_blocks), len(text_blocks))} blocks of the shallower tower")
    prompt = MaplePrompt(config, embedding.embedding_dim, vision_width, len(vision_blocks), tokenizer)
    return prompt.to(embedding.weight.device)


def add_maple_text_hooks(model: nn.Module) -> None:
    """Install, once, the text-tower hooks that call whichever MaPLe prompt `model` holds (none: no effect)."""
    embedding = _token_embedding(model)
    if not any(isinstance(h, _TextDispatch) for h in embedding._forward_hooks.values()):
        embedding.register_forward_hook(_TextDispatch(model, VISUAL_PROMPT_NAME, "text_insert"))
        for index, path in enumerate(block_paths(model, "text")):
            model.get_submodule(path).register_forward_pre_hook(
                _TextDispatch(model, VISUAL_PROMPT_NAME, "text_before_block", index), with_kwargs=True)


def set_maple_prompt(model: nn.Module, prompt: MaplePrompt | None) -> None:
    """Make `prompt` the MaPLe prompt of `model` (None: plain towers)."""
    add_maple_text_hooks(model)
    set_visual_prompt(model, prompt)


def attach_maple_prompt(model: nn.Module, config: MapleConfig, tokenizer: Callable) -> MaplePrompt:
    """Add trainable MaPLe prompts to a native open_clip ViT model; texts go through the result's `tokenize`."""
    prompt = create_maple_prompt(model, config, tokenizer)
    set_maple_prompt(model, prompt)
    return prompt
