"""peftclip: adapt OpenCLIP models cheaply with PEFT and share the result as small adapter files.

The public names load on first use (PEP 562), so `import peftclip.cli` and `peftclip --help` do not
pay for importing torch, open_clip and peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "AdaptedCLIP": "inference",
    "AdapterError": "io",
    "AdapterSpec": "adapters",
    "BaseConfig": "models",
    "BaseModel": "models",
    "ContrastiveLoss": "losses",
    "ClipLoraConfig": "adapters",
    "PartialConfig": "adapters",
    "StrategyConfig": "adapters",
    "TextPromptConfig": "adapters",
    "VisualPromptConfig": "adapters",
    "apply_lora": "adapters",
    "apply_strategy": "adapters",
    "classification_accuracy": "evaluate",
    "convert_attention": "adapters",
    "import_peft_adapter": "interop",
    "load_adapter": "io",
    "load_adapter_from_hub": "hub",
    "load_base": "models",
    "prepare_for_peft": "interop",
    "push_to_hub": "hub",
    "read_metadata": "io",
    "retrieval_recall": "evaluate",
    "save_adapter": "io",
}

__all__ = [
    "AdaptedCLIP",
    "AdapterError",
    "AdapterSpec",
    "BaseConfig",
    "BaseModel",
    "ClipLoraConfig",
    "ContrastiveLoss",
    "PartialConfig",
    "StrategyConfig",
    "TextPromptConfig",
    "VisualPromptConfig",
    "apply_lora",
    "apply_strategy",
    "classification_accuracy",
    "convert_attention",
    "import_peft_adapter",
    "load_adapter",
    "load_adapter_from_hub",
    "load_base",
    "prepare_for_peft",
    "push_to_hub",
    "read_metadata",
    "retrieval_recall",
    "save_adapter",
]

if TYPE_CHECKING:
    from .adapters import (
        AdapterSpec,
        ClipLoraConfig,
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
    from .interop import import_peft_adapter, prepare_for_peft
    from .io import AdapterError, load_adapter, read_metadata, save_adapter
    from .losses import ContrastiveLoss
    from .models import BaseConfig, BaseModel, load_base


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftclip' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
