"""CLIP-Adapter (Gao et al., 2021): a residual bottleneck MLP on the image and/or text features.

Each adapted tower's features x become x' = α·MLP(x) + (1−α)·x, with MLP = Linear(d, d/reduction)
→ ReLU → Linear(d/reduction, d) → ReLU and no biases, as in the paper (α = 0.2, reduction 4).
The MLP runs in a forward hook on the tower's output (`visual`, a custom text tower's `text`, or
the native text tower's `ln_final`, whose per-token output is pooled and projected afterwards), so
the frozen base and every encode path stay as they are; the hook calls whichever adapter the
model holds at the time, which lets `AdaptedCLIP` swap it per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..utils import ConfigMixin
from .heads import image_embed_dim
from .prompts import _Dispatch, _hooked

__all__ = ["CLIP_ADAPTER_NAME", "ClipAdapter", "ClipAdapterConfig", "attach_clip_adapter", "create_clip_adapter",
           "set_clip_adapter"]

CLIP_ADAPTER_NAME = "peftclip_clip_adapter"
_TOWERS = ("vision", "text")


@dataclass
class ClipAdapterConfig(ConfigMixin):
    """Where the residual MLP goes and how much of its output is blended in."""

    section: ClassVar[str] = "clip_adapter"

    adapter_towers: list[str] = field(default_factory=lambda: ["vision"], metadata={
        "help": f"Towers whose features get the MLP, among {list(_TOWERS)} (the paper's best: vision)."})
    adapter_ratio: float = field(default=0.2, metadata={"help": "alpha: x' = alpha MLP(x) + (1 - alpha) x."})
    reduction: int = field(default=4, metadata={"help": "Bottleneck width is the feature width / reduction."})

    def __post_init__(self) -> None:
        unknown = [t for t in self.adapter_towers if t not in _TOWERS]
        if unknown or not self.adapter_towers:
            raise ValueError(f"adapter_towers={self.adapter_towers!r}: choose one or more of {list(_TOWERS)}")
        if not 0.0 <= self.adapter_ratio <= 1.0:
            raise ValueError(f"adapter_ratio={self.adapter_ratio}: must be in [0, 1]")
        if self.reduction < 1:
            raise ValueError(f"reduction={self.reduction}: must be at least 1")


def _mlp(width: int, reduction: int) -> nn.Sequential:
    hidden = max(width // reduction, 1)
    return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, width, bias=False),
                         nn.ReLU())


class ClipAdapter(nn.Module):
    """One residual MLP per adapted tower, applied to that tower's output features."""

    def __init__(self, config: ClipAdapterConfig, widths: dict[str, int]) -> None:
        super().__init__()
        self.ratio = config.adapter_ratio
        self.mlps = nn.ModuleDict({tower: _mlp(widths[tower], config.reduction) for tower in config.adapter_towers})

    def hook(self, tower: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if tower not in self.mlps:
            return None
        mlp = self.mlps[tower]
        return self.ratio * mlp(output.to(mlp[0].weight.dtype)).to(output.dtype) + (1 - self.ratio) * output


def _tower_output(model: nn.Module, tower: str) -> tuple[nn.Module, int]:
    """(module whose output is `tower`'s features, their width)."""
    if tower == "vision":
        return model.visual, image_embed_dim(model)
    if isinstance(getattr(model, "text", None), nn.Module):
        return model.text, image_embed_dim(model)  # a custom text tower projects to the shared embedding
    if isinstance(getattr(model, "ln_final", None), nn.LayerNorm):
        return model.ln_final, model.ln_final.normalized_shape[0]
    raise ValueError(f"the {type(model).__name__} model has no text tower output CLIP-Adapter knows (text or "
                     f"ln_final); use adapter_towers=['vision']")


def create_clip_adapter(model: nn.Module, config: ClipAdapterConfig) -> ClipAdapter:
    """The MLPs for `model`'s towers, on its device, not yet attached."""
    widths = {tower: _tower_output(model, tower)[1] for tower in config.adapter_towers}
    return ClipAdapter(config, widths).to(next(model.parameters()).device)


def set_clip_adapter(model: nn.Module, adapter: ClipAdapter | None) -> None:
    """Make `adapter` the CLIP-Adapter of `model` (None: plain features); hooks are installed once per tower."""
    for tower in _TOWERS if adapter is None else adapter.mlps:
        try:
            module, _ = _tower_output(model, tower)
        except ValueError:
            continue  # nothing to unhook on a tower without a known output
        if not _hooked(module, CLIP_ADAPTER_NAME):
            module.register_forward_hook(_Dispatch(model, CLIP_ADAPTER_NAME, "hook", tower))
    model.register_module(CLIP_ADAPTER_NAME, adapter)


def attach_clip_adapter(model: nn.Module, config: ClipAdapterConfig) -> ClipAdapter:
    """Add a trainable CLIP-Adapter to `model`'s chosen towers; returns the module.

    >>> from peftclip.models import load_base
    >>> adapter = attach_clip_adapter(load_base().model, ClipAdapterConfig())
    >>> sum(p.numel() for p in adapter.parameters())
    2048
    """
    adapter = create_clip_adapter(model, config)
    set_clip_adapter(model, adapter)
    return adapter
