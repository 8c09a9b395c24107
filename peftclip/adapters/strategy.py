"""Compose adapter methods on one base, and rebuild the same structure from saved metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..utils import ConfigMixin, inner_model
from .attention import convert_attention
from .heads import HeadConfig, attach_head
from .lora import LoraConfig, apply_lora
from .partial import PartialConfig, apply_partial
from .prompts import (
    TextPromptConfig,
    VisualPromptConfig,
    attach_text_prompt,
    attach_visual_prompt,
)

__all__ = ["AdapterSpec", "StrategyConfig", "apply_strategy", "inner_model"]


@dataclass
class StrategyConfig(ConfigMixin):
    """Which adapter methods are on; each method's settings live in its own config section."""

    section: ClassVar[str] = "strategy"

    lora: bool = field(default=True, metadata={"help": "Apply LoRA as set in the lora section."})
    text_prompt: bool = field(default=False, metadata={"help": "Learn CoOp text context vectors."})
    visual_prompt: bool = field(default=False, metadata={"help": "Learn VPT visual prompt tokens."})
    head: bool = field(default=False, metadata={"help": "Train a linear classification head (classification only)."})



@dataclass
class AdapterSpec:
    """The methods applied to a base and their settings; None means the method is off."""

    lora: LoraConfig | None = None
    partial: PartialConfig | None = None
    text_prompt: TextPromptConfig | None = None
    visual_prompt: VisualPromptConfig | None = None
    head: HeadConfig | None = None

    def __post_init__(self) -> None:
        if pair := self._contradiction():
            raise ValueError(f"{pair[0]} and {pair[1]} contradict each other: {pair[2]}")

    def _contradiction(self) -> tuple[str, str, str] | None:
        """The first pair of settings that ask for opposite things, with why, or None."""
        partial = self.partial
        if partial is not None and partial.full:
            for flag, on in (("--freeze", partial.freeze is not None), ("--projections", partial.projections),
                             ("--logit-scale", partial.logit_scale), ("--last-blocks", partial.last_blocks > 0),
                             ("--new-proj-dim", partial.new_proj_dim is not None)):
                if on:
                    return "--full", flag, f"--full trains every parameter already; drop {flag}"
            if self.lora is not None:
                return "--full", "LoRA", "--full trains every base weight; pass --no-lora"
        frozen = partial.freeze if partial is not None else None
        if frozen is not None:
            flag = f"--freeze {frozen}"
            if self.lora is not None and frozen in self.lora.towers:
                return flag, f"LoRA on the {frozen} tower", f"pass --no-lora or --towers without {frozen}"
            if partial.last_blocks and frozen in partial.block_towers:
                return flag, f"--last-blocks on the {frozen} tower", f"pass --block-towers without {frozen}"
        return None

    @classmethod
    def from_sections(cls, strategy: StrategyConfig, sections: dict[str, Any]) -> "AdapterSpec":
        """Pick each enabled method's section from parsed config sections."""
        partial = sections.get("partial")
        return cls(lora=sections.get("lora", LoraConfig()) if strategy.lora else None,
                   partial=partial if partial is not None and partial.active else None,
                   text_prompt=sections.get("text_prompt", TextPromptConfig()) if strategy.text_prompt else None,
                   visual_prompt=(sections.get("visual_prompt", VisualPromptConfig())
                                  if strategy.visual_prompt else None),
                   head=sections.get("head", HeadConfig()) if strategy.head else None)

    def to_dict(self) -> dict[str, Any]:
        return {name: config.to_dict() for name, config in self._methods().items() if config is not None}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "AdapterSpec":
        types = {"lora": LoraConfig, "partial": PartialConfig, "text_prompt": TextPromptConfig,
                 "visual_prompt": VisualPromptConfig, "head": HeadConfig}
        unknown = sorted(set(record) - set(types))
        if unknown:
            raise ValueError(f"unknown adapter method(s) {unknown}; known: {sorted(types)}")
        return cls(**{name: types[name].from_dict(values) for name, values in record.items()})

    def _methods(self) -> dict[str, Any]:
        return {"lora": self.lora, "partial": self.partial, "text_prompt": self.text_prompt,
                "visual_prompt": self.visual_prompt, "head": self.head}


def apply_strategy(model: nn.Module, spec: AdapterSpec, tokenizer: Callable | None = None,
                   adapter_name: str = "default", head_weights: torch.Tensor | None = None,
                   **peft_overrides: Any) -> tuple[nn.Module, Callable | None]:
    """Make exactly the parameters of the chosen methods trainable.

    Returns the model (a `peft.PeftModel` when LoRA is on) and the tokenizer texts must go
    through (the prompt-aware one when text prompts are on, else `tokenizer`). With a head,
    the model also gets `classify(images) -> logits` (see `classifier`); `head_weights`
    are its zero-shot initial weights.

    >>> from peftclip.models import load_base
    >>> base = load_base()
    >>> model, tokenize = apply_strategy(base.model, AdapterSpec(lora=LoraConfig()), base.tokenizer)
    >>> type(model).__name__, tokenize is base.tokenizer
    ('PeftModel', True)
    """
    convert_attention(model)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, adapter_name, **peft_overrides)
    inner = inner_model(model)
    if spec.partial is not None:
        apply_partial(inner, spec.partial)
    if spec.text_prompt is not None:
        if tokenizer is None:
            raise ValueError("text prompts need the base's tokenizer")
        tokenizer = attach_text_prompt(inner, spec.text_prompt, tokenizer).tokenize
    if spec.visual_prompt is not None:
        attach_visual_prompt(inner, spec.visual_prompt)
    if spec.head is not None:
        attach_head(inner, spec.head, head_weights)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the strategy trains nothing: enable LoRA, prompts, or parameters to unfreeze")
    return model, tokenizer
