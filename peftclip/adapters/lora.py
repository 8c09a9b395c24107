"""LoRA on open_clip's attention and MLP projections, through PEFT, with exact math."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import peft
from torch import nn

from ..utils import ConfigMixin
from .attention import convert_attention

__all__ = ["LoraConfig", "TARGETS", "TOWERS", "apply_lora", "lora_parameter_count", "lora_target_names",
           "tower_blocks_path"]

# Where each tower keeps its residual blocks in open_clip's `CLIP` (and `CustomTextCLIP`).
TOWERS: dict[str, tuple[str, ...]] = {
    "vision": ("visual.transformer.resblocks",),
    "text": ("transformer.resblocks", "text.transformer.resblocks"),
}
# Short target names and the module path inside a block after `convert_attention`.
TARGETS: dict[str, str] = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "out": "attn.out_proj",
    "c_fc": "mlp.c_fc",
    "c_proj": "mlp.c_proj",
}


@dataclass
class LoraConfig(ConfigMixin):
    """Where LoRA goes in an open_clip model and how large it is."""

    section: ClassVar[str] = "lora"

    towers: list[str] | str = field(default_factory=lambda: ["vision", "text"],
                                    metadata={"help": f"Towers to adapt, among {sorted(TOWERS)}, or 'both'."})
    blocks: str | int | list[int] = field(
        default="all",
        metadata={"help": "'all', an int N for the last N blocks, or a list of block indices (negative counts "
                  "from the end)."})
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS),
                                      metadata={"help": f"Projections to adapt, among {list(TARGETS)}."})
    r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA scaling numerator: the update is B·A·alpha/r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})

    def __post_init__(self) -> None:
        if isinstance(self.towers, str):
            self.towers = ["vision", "text"] if self.towers == "both" else [self.towers]
        for tower in self.towers:
            if tower not in TOWERS:
                raise ValueError(f"unknown tower {tower!r}; choose from {sorted(TOWERS)} or 'both'")
        if not self.towers:
            raise ValueError("towers must name at least one tower")
        for target in self.target_modules:
            if target not in TARGETS:
                raise ValueError(f"unknown LoRA target {target!r}; choose from {list(TARGETS)}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one projection")
        if isinstance(self.blocks, str) and self.blocks != "all":
            raise ValueError(f"blocks={self.blocks!r}: use 'all', an int N (last N) or a list of indices")
        if isinstance(self.blocks, int) and self.blocks < 1:
            raise ValueError(f"blocks={self.blocks}: the number of last blocks must be at least 1")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r}: the LoRA rank must be a positive integer")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha}: must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")




def _block_indices(blocks: str | int | list[int], n_blocks: int, tower: str) -> list[int]:
    if blocks == "all":
        return list(range(n_blocks))
    if isinstance(blocks, int):
        if blocks > n_blocks:
            raise ValueError(f"blocks={blocks}: the {tower} tower has only {n_blocks} blocks")
        return list(range(n_blocks - blocks, n_blocks))
    indices = []
    for index in blocks:
        if not -n_blocks <= index < n_blocks:
            raise ValueError(f"block index {index} is out of range for the {tower} tower "
                             f"({n_blocks} blocks: 0..{n_blocks - 1})")
        indices.append(index % n_blocks)
    return sorted(set(indices))


def lora_target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the linear layers that `config` puts LoRA on, in a converted `model`."""
    names = []
    for tower in config.towers:
        prefix = tower_blocks_path(model, tower)
        n_blocks = len(model.get_submodule(prefix))
        for index in _block_indices(config.blocks, n_blocks, tower):
            for target in config.target_modules:
                name = f"{prefix}.{index}.{TARGETS[target]}"
                _linear(model, name)
                names.append(name)
    return names


def _linear(model: nn.Module, name: str) -> nn.Linear:
    """The linear layer at `name`, looking through a PEFT wrapper if there is one."""
    module = model.get_submodule(name)
    module = getattr(module, "base_layer", module)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name} is a {type(module).__name__}, not a linear layer; this block type is not supported")
    return module


def tower_blocks_path(model: nn.Module, tower: str) -> str:
    """Dotted path of `tower`'s residual block list in `model`."""
    for path in TOWERS[tower]:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    looked = ", ".join(TOWERS[tower])
    raise ValueError(f"{type(model).__name__} has no {tower} transformer blocks (looked for {looked})")


def lora_parameter_count(model: nn.Module, config: LoraConfig) -> int:
    """Trainable parameters LoRA adds: r·(in + out) for each targeted linear layer."""
    convert_attention(model)
    total = 0
    for name in lora_target_names(model, config):
        linear = _linear(model, name)
        total += config.r * (linear.in_features + linear.out_features)
    return total


# Projections that exist only after `convert_attention`; an adapter on them needs the split model.
_SPLIT_ONLY = ("q", "k", "v")
# A regex comment (`(?#...)`, no parentheses inside) that PEFT prints when the guard below fires.
_UNSPLIT_HINT = ("(?#peftclip adapter on split attention: call peftclip.prepare_for_peft on the model "
                 "before PeftModel.from_pretrained)")


def _any_of(patterns: list[str]) -> str:
    return f"(?:{'|'.join(patterns)})"


def _target_regex(model: nn.Module, config: LoraConfig) -> str:
    """`^(?:<tower block lists>)\\.(?:<indices>)\\.(?:<projections>)$`; indices spelled out only when not all."""
    prefixes_by_indices: dict[str, list[str]] = {}
    for tower in config.towers:
        prefix = tower_blocks_path(model, tower)
        n_blocks = len(model.get_submodule(prefix))
        indices = _block_indices(config.blocks, n_blocks, tower)
        key = r"\d+" if len(indices) == n_blocks else _any_of([str(i) for i in indices])
        prefixes_by_indices.setdefault(key, []).append(re.escape(prefix))
    blocks = _any_of([rf"{_any_of(prefixes)}\.{indices}" for indices, prefixes in prefixes_by_indices.items()])
    return rf"^{blocks}\.{_any_of([re.escape(TARGETS[t]) for t in config.target_modules])}$"


def _unsplit_guard(config: LoraConfig) -> dict[str, Any]:
    """PEFT settings, inert on a split model, that make plain PEFT warn on an unsplit one.

    PEFT 0.21 only raises when a config matches nothing, so an unsplit model (whose module
    names are a subset of the split one's) would silently lose the q/k/v LoRA and ignore the
    out_proj LoRA (`nn.MultiheadAttention` never calls `out_proj.forward`). PEFT does warn
    about a `rank_pattern` key that matches no adapted layer, and about an `exclude_modules`
    that excludes nothing: a key on a targeted q/k/v projection, or else an exclusion of the
    untargeted q projections, matches only on a split model. Both carry `_UNSPLIT_HINT`.
    """
    split_only = [t for t in config.target_modules if t in _SPLIT_ONLY]
    if split_only:
        return {"rank_pattern": {_UNSPLIT_HINT + re.escape(TARGETS[split_only[0]]): config.r}}
    if "out" in config.target_modules:
        return {"exclude_modules": rf"{_UNSPLIT_HINT}^.*\.{re.escape(TARGETS['q'])}$"}
    return {}  # MLP-only: open_clip's own modules, correct with or without the split


def to_peft_config(model: nn.Module, config: LoraConfig, **overrides: Any) -> peft.LoraConfig:
    """PEFT's LoraConfig targeting exactly the layers `config` names, as one short anchored regex.

    The regex is readable in `adapter_config.json`, e.g. for all blocks of both towers
    `^(?:(?:visual\\.transformer\\.resblocks|transformer\\.resblocks)\\.\\d+)\\.(?:attn\\.q_proj|...)$`.
    When attention projections are adapted, the config also makes plain PEFT warn if it is
    loaded onto a model whose attention was not split (see `_unsplit_guard`).
    """
    lora_target_names(model, config)  # checks every targeted module is a linear layer
    settings = {**_unsplit_guard(config), **overrides}
    return peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=_target_regex(model, config), bias="none", **settings)


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
               **peft_overrides: Any) -> peft.PeftModel:
    """Convert `model`'s attention to split projections and wrap it with a PEFT LoRA adapter.

    Only the LoRA weights are trainable afterwards. `peft_overrides` go to `peft.LoraConfig`
    (e.g. `init_lora_weights=False` for a non-zero B in tests).

    >>> peft_model = apply_lora(load_base().model, LoraConfig(r=4))  # doctest: +SKIP
    """
    convert_attention(model)
    return peft.get_peft_model(model, to_peft_config(model, config, **peft_overrides), adapter_name=adapter_name)
