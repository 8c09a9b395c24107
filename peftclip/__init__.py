"""peftclip: adapt OpenCLIP models cheaply with PEFT and share the result as small adapter files."""

from .adapters import LoraConfig, SplitMultiheadAttention, apply_lora, convert_attention, lora_parameter_count
from .evaluate import retrieval_recall
from .io import AdapterError, load_adapter, read_metadata, save_adapter
from .losses import ContrastiveLoss
from .models import BaseConfig, BaseModel, load_base

__version__ = "0.1.0"

__all__ = sorted([
    "AdapterError", "BaseConfig", "BaseModel", "ContrastiveLoss", "LoraConfig", "SplitMultiheadAttention",
    "apply_lora", "convert_attention", "load_adapter", "load_base", "lora_parameter_count", "read_metadata",
    "retrieval_recall", "save_adapter",
])
