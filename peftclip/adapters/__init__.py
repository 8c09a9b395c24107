"""Adapter methods, one module each, with their config dataclass beside the code."""

from .attention import SplitMultiheadAttention, convert_attention
from .lora import LoraConfig, apply_lora, lora_parameter_count

__all__ = sorted(["LoraConfig", "SplitMultiheadAttention", "apply_lora", "convert_attention", "lora_parameter_count"])
