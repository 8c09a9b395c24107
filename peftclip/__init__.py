"""peftclip: adapt OpenCLIP models cheaply with PEFT and share the result as small adapter files."""

from .adapters import (
    AdapterSpec,
    LoraConfig,
    PartialConfig,
    StrategyConfig,
    TextPromptConfig,
    VisualPromptConfig,
    apply_lora,
    apply_strategy,
    convert_attention,
)
from .evaluate import classification_accuracy, retrieval_recall
from .hub import load_adapter_from_hub, push_to_hub
from .inference import AdaptedCLIP
from .io import AdapterError, load_adapter, read_metadata, save_adapter
from .losses import ContrastiveLoss
from .models import BaseConfig, BaseModel, load_base

__version__ = "0.1.0"

__all__ = [
    "AdaptedCLIP",
    "AdapterError",
    "AdapterSpec",
    "BaseConfig",
    "BaseModel",
    "ContrastiveLoss",
    "LoraConfig",
    "PartialConfig",
    "StrategyConfig",
    "TextPromptConfig",
    "VisualPromptConfig",
    "apply_lora",
    "apply_strategy",
    "classification_accuracy",
    "convert_attention",
    "load_adapter",
    "load_adapter_from_hub",
    "load_base",
    "push_to_hub",
    "read_metadata",
    "retrieval_recall",
    "save_adapter",
]
