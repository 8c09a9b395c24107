"""Compose adapter methods on one base, and rebuild the same structure from saved metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import peft
from torch import nn

from ..utils import config_from_dict
from .attention import convert_attention
from .lora import LoraConfig, apply_lora
from .partial import PartialConfig, apply_partial

__all__ = ["StrategyConfig", "apply_strategy", "inner_model", "strategy_from_dict", "strategy_to_dict"]


@dataclass
class StrategyConfig:
    """Which adapter methods are on; each method's own settings live in its own section."""

    lora: bool = field(default=True, metadata={"help": "Apply LoRA as set in the lora section."})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StrategyConfig":
        return config_from_dict(cls, data, "strategy")


def inner_model(model: nn.Module) -> nn.Module:
    """The open_clip model inside a PEFT wrapper (or `model` itself)."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def apply_strategy(model: nn.Module, strategy: StrategyConfig, lora: LoraConfig | None = None,
                   partial: PartialConfig | None = None, adapter_name: str = "default",
                   **peft_overrides: Any) -> nn.Module:
    """Make exactly the parameters the chosen methods train trainable; return the (maybe wrapped) model.

    Returns a `peft.PeftModel` when LoRA is on, else `model` itself. The description of what
    was applied is `strategy_to_dict(...)`, which `load_adapter` uses to rebuild the structure.
    """
    convert_attention(model)
    if strategy.lora:
        model = apply_lora(model, lora or LoraConfig(), adapter_name, **peft_overrides)
    if partial is not None and partial.active:
        apply_partial(inner_model(model), partial)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the strategy trains nothing: enable LoRA or choose parameters to unfreeze")
    return model


def strategy_to_dict(strategy: StrategyConfig, lora: LoraConfig | None,
                     partial: PartialConfig | None) -> dict[str, Any]:
    """The metadata record of an applied strategy (methods that are off are left out)."""
    record: dict[str, Any] = {}
    if strategy.lora:
        record["lora"] = (lora or LoraConfig()).to_dict()
    if partial is not None and partial.active:
        record["partial"] = partial.to_dict()
    return record


def strategy_from_dict(record: dict[str, Any]) -> tuple[StrategyConfig, LoraConfig | None, PartialConfig | None]:
    """Inverse of `strategy_to_dict`."""
    lora = LoraConfig.from_dict(record["lora"]) if "lora" in record else None
    partial = PartialConfig.from_dict(record["partial"]) if "partial" in record else None
    return StrategyConfig(lora=lora is not None), lora, partial
