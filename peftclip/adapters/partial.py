"""Classic fine-tuning strategies: unfreeze chosen base parameters, bare ones included.

PEFT's `modules_to_save` only handles whole modules, so bare parameters such as
`text_projection`, `visual.proj` and `logit_scale` are unfrozen and saved here by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..families import TOWERS, block_paths, family_of, final_norm_names, projection_name, tower_of
from ..utils import ConfigMixin

__all__ = ["PROJECTIONS", "PartialConfig", "apply_partial", "select_parameters"]

PROJECTIONS = ("visual.proj", "text_projection")  # the native ViT/text towers'; others: families.projection_name


@dataclass
class PartialConfig(ConfigMixin):
    """Which base parameters train, as named strategies that combine."""

    section: ClassVar[str] = "partial"

    full: bool = field(default=False, metadata={"help": "Train every base parameter."})
    freeze: str | None = field(default=None, metadata={
        "help": "'vision' or 'text': that tower stays frozen; the other tower and both projections train."})
    projections: bool = field(default=False, metadata={"help": "Train visual.proj and text_projection."})
    logit_scale: bool = field(default=False, metadata={"help": "Train the logit scale."})
    logit_bias: bool = field(default=False, metadata={
        "help": "Train the logit bias (SigLIP-style models only; others are refused). "
                "With logit_scale, both train, as SigLIP learns them."})
    last_blocks: int = field(default=0, metadata={"help": "Train the last N residual blocks of `block_towers`."})
    block_towers: list[str] = field(default_factory=lambda: ["vision", "text"],
                                    metadata={"help": "Towers whose last blocks train."})
    final_norms: bool = field(default=False, metadata={"help": "With last_blocks, also train ln_post / ln_final."})
    new_proj_dim: int | None = field(default=None, metadata={
        "help": "Replace both projections with freshly initialised d_in × new_proj_dim ones (they train)."})

    def __post_init__(self) -> None:
        if self.freeze not in (None, "vision", "text"):
            raise ValueError(f"freeze={self.freeze!r}; choose 'vision', 'text' or None")
        if self.last_blocks < 0:
            raise ValueError(f"last_blocks={self.last_blocks}: must not be negative")
        for tower in self.block_towers:
            if tower not in TOWERS:
                raise ValueError(f"unknown tower {tower!r} in block_towers; choose from {sorted(TOWERS)}")
        if self.new_proj_dim is not None and self.new_proj_dim < 1:
            raise ValueError(f"new_proj_dim={self.new_proj_dim}: must be positive")

    @property
    def active(self) -> bool:
        """Whether this config unfreezes anything."""
        return (self.full or self.freeze is not None or self.projections or self.logit_scale or self.logit_bias
                or self.last_blocks > 0 or self.new_proj_dim is not None)


def _block_prefixes(model: nn.Module, config: PartialConfig) -> list[str]:
    prefixes = []
    for tower in config.block_towers:
        blocks = block_paths(model, tower)
        if config.last_blocks > len(blocks):
            raise ValueError(f"last_blocks={config.last_blocks}: the {tower} tower has only {len(blocks)} blocks")
        prefixes += [f"{path}." for path in blocks[len(blocks) - config.last_blocks:]]
        if config.final_norms:
            prefixes += [f"{norm}." for norm in final_norm_names(model, tower)]
    return prefixes


def _replace_projections(model: nn.Module, new_dim: int) -> None:
    """Swap both projections for fresh (d_in, new_dim) parameters, initialised as open_clip does."""
    for tower in TOWERS:
        name = projection_name(model, tower)
        if name is None:
            raise ValueError(f"the {family_of(model, tower).name} {tower} tower has no projection to resize; "
                             f"new_proj_dim needs projection matrices (native ViT / text towers)")
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        old = getattr(owner, attr)
        if not isinstance(old, nn.Parameter):
            raise ValueError(f"{name} of the {family_of(model, tower).name} {tower} tower is a {type(old).__name__}, "
                             f"not a projection matrix; new_proj_dim cannot resize it (projections=True can train it)")
        d_in = old.shape[0]
        new = nn.Parameter(torch.randn(d_in, new_dim, dtype=old.dtype, device=old.device) * d_in ** -0.5)
        setattr(owner, attr, new)


def select_parameters(model: nn.Module, config: PartialConfig) -> list[str]:
    """Names of the base parameters `config` trains in the open_clip model `model` (LoRA weights aside)."""
    if config.logit_bias and not isinstance(getattr(model, "logit_bias", None), nn.Parameter):
        raise ValueError(f"logit_bias=True: {type(model).__name__} has no logit_bias (only SigLIP-style models, "
                         f"trained with the sigmoid loss, have one); use logit_scale")
    prefixes = _block_prefixes(model, config) if config.last_blocks else []
    projections = [p for p in (projection_name(model, t) for t in TOWERS) if p is not None]
    chosen = []
    for name, _ in model.named_parameters():
        tower = tower_of(name)
        if "lora_" in name:
            continue
        if (config.full
                or (config.freeze is not None and tower not in (config.freeze, None))
                or ((config.projections or config.freeze or config.new_proj_dim)
                    and any(name == p or name.startswith(p + ".") for p in projections))
                or (config.logit_scale and name == "logit_scale")
                or (config.logit_bias and name == "logit_bias")
                or any(name.startswith(p) for p in prefixes)):
            chosen.append(name)
    if config.active and not chosen:
        raise ValueError(f"{config} selects no parameter of {type(model).__name__}")
    return chosen


def apply_partial(model: nn.Module, config: PartialConfig) -> list[str]:
    """Unfreeze the base parameters `config` selects (in place) and return their names."""
    if config.new_proj_dim is not None:
        _replace_projections(model, config.new_proj_dim)
    chosen = select_parameters(model, config)
    parameters = dict(model.named_parameters())
    for name in chosen:
        parameters[name].requires_grad_(True)
    return chosen
