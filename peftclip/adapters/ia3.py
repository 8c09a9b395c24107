"""IA³ (Liu et al., 2022) on the same layers as LoRA, through PEFT's `IA3Config`.

IA³ learns one vector per adapted layer that rescales it: an attention projection's output
(`l ⊙ (W x)`, the paper's keys and values), a feed-forward layer's input (`W (l ⊙ x)`, the
paper's scaled intermediate activation). Which layers it adapts comes from LoRA's target
resolution (`peftclip.families`: towers, blocks and the short `target_modules` names); the
MLP targets (`c_fc`, `c_proj`, ResNet's `conv2`) are PEFT's `feedforward_modules`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import peft
from torch import nn

from ..families import TOWERS, family_of
from ..utils import ConfigMixin
from .attention import convert_attention
from .lora import LORA_TARGETS, ClipLoraConfig, _fused_qkv, _target_regex, lora_target_names

__all__ = ["ATTENTION_TARGETS", "ClipIA3Config", "apply_ia3", "ia3_target_names", "to_peft_config"]

# Targets whose output IA³ scales; every other target is a feed-forward layer whose input it scales.
ATTENTION_TARGETS = ("q", "k", "v", "out")


@dataclass
class ClipIA3Config(ConfigMixin):
    """Where IA³ goes in an open_clip model: LoRA's towers × blocks × target names, flags prefixed `ia3`.

    Named apart from `peft.IA3Config` (which `to_peft_config` builds from it). The default targets
    are the paper's: keys, values and the MLP's output layer (whose input is the scaled activation).
    """

    section: ClassVar[str] = "ia3"

    ia3_towers: list[str] | str = field(default_factory=lambda: list(TOWERS), metadata={
        "help": f"Towers to rescale, among {sorted(TOWERS)}, or 'both' (as LoRA's --towers)."})
    ia3_blocks: str | int | list[int] = field(default="all", metadata={
        "help": "Blocks to rescale, as LoRA's --blocks: 'all', the last N, or indices."})
    ia3_target_modules: list[str] = field(default_factory=lambda: ["k", "v", "c_proj"], metadata={
        "help": f"Layers to rescale, among {list(LORA_TARGETS)}: attention ones ({', '.join(ATTENTION_TARGETS)}) "
                "on their output, the others (PEFT's feedforward_modules) on their input."})

    def __post_init__(self) -> None:
        self.ia3_towers = self.targets().towers  # checks towers, blocks and targets as LoRA does

    def targets(self) -> ClipLoraConfig:
        """The LoRA config naming the same layers, for LoRA's target resolution (its rank is unused)."""
        return ClipLoraConfig(towers=self.ia3_towers, blocks=self.ia3_blocks, target_modules=self.ia3_target_modules)


def ia3_target_names(model: nn.Module, config: ClipIA3Config) -> tuple[list[str], list[str]]:
    """(every adapted layer, the feed-forward ones among them) in a converted `model`, by full name."""
    targets = config.targets()
    names = lora_target_names(model, targets)
    feedforward = []
    for tower in targets.towers:
        family = family_of(model, tower)
        mlp = [t for t in targets.target_modules if t not in ATTENTION_TARGETS and t in family.target_names]
        if mlp:
            one_tower = ClipLoraConfig(towers=[tower], blocks=targets.blocks, target_modules=mlp)
            feedforward += lora_target_names(model, one_tower)
    return names, feedforward


def to_peft_config(model: nn.Module, config: ClipIA3Config, **overrides: Any) -> peft.IA3Config:
    """PEFT's IA3Config on exactly the layers `config` names, feed-forward ones marked as such, with the
    attention in the form its targets need (as LoRA's `to_peft_config`).

    `overrides` go to `peft.IA3Config` (e.g. `init_ia3_weights=False` for random vectors in tests).
    """
    targets = config.targets()
    convert_attention(model, _fused_qkv(targets))
    names, feedforward = ia3_target_names(model, config)
    return peft.IA3Config(target_modules=_target_regex(model, names, targets.towers),
                          feedforward_modules=_target_regex(model, feedforward, targets.towers) if feedforward else [],
                          **overrides)


def apply_ia3(model: nn.Module, config: ClipIA3Config, adapter_name: str = "default",
              **peft_overrides: Any) -> peft.PeftModel:
    """Convert `model`'s attention to split projections and wrap it with a PEFT IA³ adapter.

    Only the IA³ vectors (`ia3_l`, ones at the start: the model is unchanged) train afterwards.

    >>> from peftclip.models import load_base
    >>> peft_model = apply_ia3(load_base().model, ClipIA3Config())
    >>> sorted({n.rpartition(".ia3_l")[0].rpartition(".")[2] for n, _ in peft_model.named_parameters() if "ia3_l" in n})
    ['c_proj', 'k_proj', 'v_proj']
    """
    return peft.get_peft_model(model, to_peft_config(model, config, **peft_overrides), adapter_name=adapter_name)
