"""Adapter methods, one module each, with their config dataclass beside the code."""

from .attention import SplitMultiheadAttention, convert_attention
from .lora import ClipLoraConfig, apply_lora, lora_parameter_count
from .partial import PartialConfig, apply_partial
from .prompts import (
    TextPromptConfig,
    VisualPromptConfig,
    attach_text_prompt,
    attach_visual_prompt,
)
from .strategy import AdapterSpec, StrategyConfig, apply_strategy, inner_model

__all__ = [
    "AdapterSpec",
    "ClipLoraConfig",
    "PartialConfig",
    "SplitMultiheadAttention",
    "StrategyConfig",
    "TextPromptConfig",
    "VisualPromptConfig",
    "apply_lora",
    "apply_partial",
    "apply_strategy",
    "attach_text_prompt",
    "attach_visual_prompt",
    "convert_attention",
    "inner_model",
    "lora_parameter_count",
]
