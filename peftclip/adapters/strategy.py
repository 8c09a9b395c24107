"""Compose adapter methods on one base, and rebuild the same structure from saved metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..utils import ConfigMixin, inner_model
from .attention import convert_attention
from .clip_adapter import ClipAdapterConfig, attach_clip_adapter
from .cocoop import attach_cocoop_prompt
from .heads import HeadConfig, attach_head
from .ia3 import ClipIA3Config, apply_ia3
from .lora import ClipLoraConfig, apply_lora
from .maple import MapleConfig, attach_maple_prompt
from .partial import PartialConfig, apply_partial
from .prompts import (
    TextPromptConfig,
    VisualPromptConfig,
    attach_text_prompt,
    attach_visual_prompt,
)
from .tip_adapter import TipAdapterConfig, attach_tip_adapter

__all__ = ["METHODS", "AdapterSpec", "MethodEntry", "StrategyConfig", "apply_strategy", "inner_model",
           "method_sections"]


@dataclass
class StrategyConfig(ConfigMixin):
    """Which adapter methods are on; each method's settings live in its own config section."""

    section: ClassVar[str] = "strategy"

    lora: bool = field(default=True, metadata={"help": "Apply LoRA as set in the lora section."})
    text_prompt: bool = field(default=False, metadata={"help": "Learn CoOp text context vectors."})
    visual_prompt: bool = field(default=False, metadata={"help": "Learn VPT visual prompt tokens."})
    head: bool = field(default=False, metadata={"help": "Train a linear classification head (classification only)."})
    clip_adapter: bool = field(default=False, metadata={
        "help": "Train a CLIP-Adapter residual MLP on the features (Gao et al., 2021)."})
    cocoop: bool = field(default=False, metadata={
        "help": "CoCoOp: the text_prompt section's shared context plus an image-conditioned offset (Zhou et al., "
                "2022)."})
    maple: bool = field(default=False, metadata={
        "help": "MaPLe: text prompts at the first J blocks, vision prompts coupled to them (Khattak et al., 2023)."})
    tip_adapter: bool = field(default=False, metadata={
        "help": "Tip-Adapter: a cache of the few-shot image features blended with zero-shot logits, built without "
                "training; -F with --fine-tune (Zhang et al., 2022). Classification only."})
    ia3: bool = field(default=False, metadata={
        "help": "IA³: learned vectors rescaling the ia3 section's layers, through PEFT (Liu et al., 2022)."})


# attach(inner model, config, context): context holds "tokenizer" (replaced by one that takes prompts into
# account, where a method needs it) and "head_weights" (a head's initial weights, or None).
Attach = Callable[[nn.Module, Any, dict[str, Any]], object]


@dataclass(frozen=True)
class MethodEntry:
    """One adapter method: its config dataclass and how it attaches to the (unwrapped) model.

    A method is on when its `StrategyConfig` flag of the same name is, or, without a flag
    (partial), when its section says it is `active`. LoRA and IA³ wrap the model, so `apply_strategy`
    applies them first, through PEFT; `attach` is None for them.
    """

    config: type
    attach: Attach | None
    section: str | None = None  # the config section it reads, when not its own name


def _attach_text_prompt(inner: nn.Module, config: TextPromptConfig, context: dict[str, Any]) -> None:
    context["tokenizer"] = attach_text_prompt(inner, config, _tokenizer(context)).tokenize


def _tokenizer(context: dict[str, Any]) -> Callable:
    if context["tokenizer"] is None:
        raise ValueError("text prompts need the base's tokenizer")
    return context["tokenizer"]


def _attach_cocoop(inner: nn.Module, config: TextPromptConfig, context: dict[str, Any]) -> None:
    context["tokenizer"] = attach_cocoop_prompt(inner, config, _tokenizer(context)).tokenize


def _attach_maple(inner: nn.Module, config: MapleConfig, context: dict[str, Any]) -> None:
    context["tokenizer"] = attach_maple_prompt(inner, config, _tokenizer(context)).tokenize


# Every method, in the order apply_strategy applies them; AdapterSpec has one field per name.
METHODS: dict[str, MethodEntry] = {
    "lora": MethodEntry(ClipLoraConfig, None),
    "partial": MethodEntry(PartialConfig, lambda inner, config, _: apply_partial(inner, config)),
    "text_prompt": MethodEntry(TextPromptConfig, _attach_text_prompt),
    "visual_prompt": MethodEntry(VisualPromptConfig, lambda inner, config, _: attach_visual_prompt(inner, config)),
    "clip_adapter": MethodEntry(ClipAdapterConfig, lambda inner, config, _: attach_clip_adapter(inner, config)),
    "cocoop": MethodEntry(TextPromptConfig, _attach_cocoop, section="text_prompt"),
    "maple": MethodEntry(MapleConfig, _attach_maple),
    "ia3": MethodEntry(ClipIA3Config, None),
    "head": MethodEntry(HeadConfig, lambda inner, config, ctx: attach_head(inner, config, ctx["head_weights"])),
    "tip_adapter": MethodEntry(TipAdapterConfig, lambda inner, config, _: attach_tip_adapter(inner, config)),
}


def method_sections(exclude: tuple[str, ...] = ()) -> dict[str, type]:
    """Every method's config section and class (methods sharing a section give it once), for a recipe's flags.

    >>> list(method_sections(exclude=("head",)))[:3]
    ['lora', 'partial', 'text_prompt']
    """
    return {entry.section or name: entry.config for name, entry in METHODS.items() if name not in exclude}


@dataclass
class AdapterSpec:
    """The methods applied to a base and their settings; None means the method is off."""

    lora: ClipLoraConfig | None = None
    partial: PartialConfig | None = None
    text_prompt: TextPromptConfig | None = None
    visual_prompt: VisualPromptConfig | None = None
    head: HeadConfig | None = None
    clip_adapter: ClipAdapterConfig | None = None
    cocoop: TextPromptConfig | None = None
    maple: MapleConfig | None = None
    tip_adapter: TipAdapterConfig | None = None
    ia3: ClipIA3Config | None = None

    def __post_init__(self) -> None:
        if pair := self._contradiction():
            raise ValueError(f"{pair[0]} and {pair[1]} contradict each other: {pair[2]}")

    def _contradiction(self) -> tuple[str, str, str] | None:
        """The first pair of settings that ask for opposite things, with why, or None."""
        if self.lora is not None and self.ia3 is not None:  # PEFT holds one tuner type per model
            return "LoRA", "--ia3", "LoRA and IA³ both wrap the model through PEFT; pick one (--no-lora for IA³)"
        for first, second in (("cocoop", "text_prompt"), ("maple", "text_prompt"), ("maple", "visual_prompt")):
            if getattr(self, first) is not None and getattr(self, second) is not None:
                return f"--{first}", f"--{second.replace('_', '-')}", "both bring their own prompts; pick one"
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
        """Pick each enabled method's section (its defaults when absent) from parsed config sections."""
        chosen = {}
        for name, entry in METHODS.items():
            if hasattr(strategy, name):
                section = sections.get(entry.section or name, entry.config())
                chosen[name] = section if getattr(strategy, name) else None
            else:
                section = sections.get(name)
                chosen[name] = section if section is not None and section.active else None
        return cls(**chosen)

    def to_dict(self) -> dict[str, Any]:
        return {name: config.to_dict() for name, config in self._methods().items() if config is not None}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "AdapterSpec":
        unknown = sorted(set(record) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown adapter method(s) {unknown}; known: {sorted(METHODS)}")
        return cls(**{name: METHODS[name].config.from_dict(values) for name, values in record.items()})

    def _methods(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in METHODS}


def apply_strategy(model: nn.Module, spec: AdapterSpec, tokenizer: Callable | None = None,
                   adapter_name: str = "default", head_weights: torch.Tensor | None = None,
                   **peft_overrides: Any) -> tuple[nn.Module, Callable | None]:
    """Make exactly the parameters of the chosen methods trainable.

    Returns the model (a `peft.PeftModel` when LoRA or IA³ is on) and the tokenizer texts must go
    through (the prompt-aware one when text prompts are on, else `tokenizer`). With a head,
    the model also gets `classify(images) -> logits` (see `classifier`); `head_weights`
    are its zero-shot initial weights.

    >>> from peftclip.models import load_base
    >>> base = load_base()
    >>> model, tokenize = apply_strategy(base.model, AdapterSpec(lora=ClipLoraConfig()), base.tokenizer)
    >>> type(model).__name__, tokenize is base.tokenizer
    ('PeftModel', True)
    """
    convert_attention(model)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, adapter_name, **peft_overrides)
    elif spec.ia3 is not None:
        model = apply_ia3(model, spec.ia3, adapter_name, **peft_overrides)
    inner, context = inner_model(model), {"tokenizer": tokenizer, "head_weights": head_weights}
    for name, config in spec._methods().items():
        attach = METHODS[name].attach
        if config is not None and attach is not None:
            attach(inner, config, context)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the strategy trains nothing: enable LoRA, prompts, or parameters to unfreeze")
    return model, context["tokenizer"]
