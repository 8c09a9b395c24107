"""LoRA on the attention and MLP projections of every open_clip tower family, through PEFT, with exact math.

Where LoRA goes comes from the family registry (`peftclip.families`): the same short
target names (`q`, `k`, `v`, `out`, and open_clip's `c_fc` / `c_proj` for the MLP's input
and output layers) mean the same layers in every family, plus family-specific ones
(`conv2`, the 3x3 convolution of a ResNet bottleneck). Fused q/k/v weights are split into
separate linears first (`convert_attention`), so LoRA on `q` adapts q alone, exactly
W + B·A·alpha/r, in timm ViT/SigLIP/EVA/Swin/FastViT towers as in the native ViT.
Convolutional layers (ResNet bottlenecks, FastViT's 1x1 MLP) get PEFT's Conv2d LoRA.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import peft
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..families import FAMILIES, TOWERS, block_paths, family_of, tower_prefix
from ..utils import ConfigMixin
from .attention import convert_attention
from .lora_init import keep_initial_lora
from .lora_layer import LeanLoraLinear, keep_activation_inputs

__all__ = ["FUSED_QKV", "INIT_LORA", "LORA_TARGETS", "MUTATING_INITS", "TARGETS", "TOWERS", "ClipLoraConfig",
           "LeanLoraLinear", "apply_lora", "lora_parameter_count", "lora_target_names", "tower_blocks_path"]

# LoRA on q, k and v through one fused linear (one A shared by the three): the `qkv` target.
FUSED_QKV = "qkv"
# Paths of every target name inside a native open_clip block after `convert_attention`.
_PATHS: dict[str, str] = {name: paths[0] for name, paths in FAMILIES[0].targets.items()}
# The shared target names of the split form (q, k, v, out, c_fc, c_proj) and their native paths.
TARGETS: dict[str, str] = {name: path for name, path in _PATHS.items() if name != FUSED_QKV}
# Every target name some family knows: the shared ones first, then family-specific ones.
LORA_TARGETS: tuple[str, ...] = tuple(dict.fromkeys(t for f in FAMILIES for t in f.target_names))
# `init_lora` choices and what PEFT's `init_lora_weights` calls them.
INIT_LORA: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# Inits that move part of W into A and B, leaving a residual base that adapters cannot share.
MUTATING_INITS = ("pissa", "olora")
_NATIVE = ("vit", "text")  # families whose unsplit attention plain PEFT would silently mis-adapt


@dataclass
class ClipLoraConfig(ConfigMixin):
    """Where LoRA goes in an open_clip model and how large it is.

    Named apart from `peft.LoraConfig` (which `to_peft_config` builds from it), so importing
    both never shadows one with the other.
    """

    section: ClassVar[str] = "lora"

    towers: list[str] | str = field(default_factory=lambda: ["vision", "text"],
                                    metadata={"help": f"Towers to adapt, among {sorted(TOWERS)}, or 'both'."})
    blocks: str | int | list[int] = field(
        default="all",
        metadata={"help": "'all', an int N for the last N blocks, or a list of block indices (negative counts "
                  "from the end)."})
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS),
                                      metadata={"help": f"Projections to adapt, among {list(LORA_TARGETS)}; a family "
                                                        "adapts those it has (see peftclip.families)."})
    r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA scaling numerator: the update is B·A·alpha/r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input."})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA (Liu et al., 2024): a learned magnitude per output column times the direction of W + B·A."})
    use_rslora: bool = field(default=False, metadata={
        "help": "rsLoRA (Kalajdzievski, 2023): scale the update by alpha/sqrt(r) instead of alpha/r."})
    init_lora: str = field(default="default", metadata={
        "help": f"How A and B start, among {list(INIT_LORA)}: PEFT's default (B=0), gaussian A, or PiSSA / OLoRA, "
                "which start from the top singular vectors / a QR of W and keep the rest as the base."})
    loraplus_lr_ratio: float | None = field(default=None, metadata={
        "help": "LoRA+ (Hayou et al., 2024): B's learning rate is this ratio times A's (the paper uses 2 to 16)."})

    def __post_init__(self) -> None:
        if isinstance(self.towers, str):
            self.towers = ["vision", "text"] if self.towers == "both" else [self.towers]
        for tower in self.towers:
            if tower not in TOWERS:
                raise ValueError(f"unknown tower {tower!r}; choose from {sorted(TOWERS)} or 'both'")
        if not self.towers:
            raise ValueError("towers must name at least one tower")
        for target in self.target_modules:
            if target not in LORA_TARGETS:
                raise ValueError(f"unknown LoRA target {target!r}; choose from {list(LORA_TARGETS)}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one projection")
        split = [t for t in self.target_modules if t in _SPLIT_ONLY and t != FUSED_QKV]
        if FUSED_QKV in self.target_modules and split:
            raise ValueError(f"target_modules={self.target_modules}: 'qkv' adapts q, k and v through one fused layer; "
                             f"it cannot be combined with {split}")
        if isinstance(self.blocks, str) and self.blocks != "all":
            raise ValueError(f"blocks={self.blocks!r}: use 'all', an int N (last N) or a list of indices")
        if isinstance(self.blocks, int) and self.blocks < 1:
            raise ValueError(f"blocks={self.blocks}: the number of last blocks must be at least 1")
        if isinstance(self.blocks, list) and not self.blocks:
            raise ValueError("blocks=[]: name at least one block index, or use 'all'")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r}: the LoRA rank must be a positive integer")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha}: must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.init_lora not in INIT_LORA:
            raise ValueError(f"init_lora={self.init_lora!r}: choose from {list(INIT_LORA)}")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise ValueError(f"loraplus_lr_ratio={self.loraplus_lr_ratio}: must be positive")




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


def lora_target_names(model: nn.Module, config: ClipLoraConfig) -> list[str]:
    """Full names of the layers `config` puts LoRA on, in a converted `model`, tower by tower, block by block.

    Each tower adapts the targets its family has; a tower whose family has none of them is an error.
    """
    names = []
    for tower in config.towers:
        family = family_of(model, tower)
        wanted = [t for t in config.target_modules if t in family.target_names]
        if not wanted:
            raise ValueError(f"the {family.name} {tower} tower has none of the LoRA targets {config.target_modules}; "
                             f"it has {family.target_names}")
        blocks = block_paths(model, tower)
        for index in _block_indices(config.blocks, len(blocks), tower):
            names += _present(model, blocks[index], [p for t in wanted for p in family.targets.get(t, ())])
        prefix = tower_prefix(model, tower)
        names += _present(model, prefix[:-1], [p for t in wanted for p in family.tower_targets.get(t, ())])
    for name in names:
        _layer(model, name)
    return names


def _present(model: nn.Module, owner: str, paths: list[str]) -> list[str]:
    """`owner.path` for each path that exists in `model`, in order."""
    found = []
    for path in paths:
        name = f"{owner}.{path}" if owner else path
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        found.append(name)
    return found


def _layer(model: nn.Module, name: str) -> nn.Linear | nn.Conv2d:
    """The linear or convolution layer at `name`, looking through PEFT wrappers (LoRA, IA³, both) if there are any."""
    module = model.get_submodule(name)
    module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or getattr(module, "groups", 1) != 1:
        raise ValueError(f"{name} is a {type(module).__name__}, not a linear or dense convolution layer; "
                         f"LoRA cannot adapt it")
    return module


def tower_blocks_path(model: nn.Module, tower: str) -> str:
    """Dotted path of `tower`'s one block list in `model` (for families whose blocks are not split into stages)."""
    family = family_of(model, tower)
    if len(family.blocks) != 1 or "*" in family.blocks[0]:
        raise ValueError(f"the {family.name} {tower} tower keeps its blocks in stages ({family.blocks}), "
                         f"not in one list; use peftclip.families.block_paths")
    return tower_prefix(model, tower) + family.blocks[0]


def lora_parameter_count(model: nn.Module, config: ClipLoraConfig) -> int:
    """Trainable parameters LoRA adds: r·(in + out) per linear layer, r·(in·kh·kw + out) per convolution."""
    convert_attention(model, _fused_qkv(config))
    total = 0
    for name in lora_target_names(model, config):
        layer = _layer(model, name)
        if isinstance(layer, nn.Conv2d):
            total += config.r * (layer.weight[0].numel() + layer.out_channels)  # weight: (out, in, kh, kw)
        else:
            total += config.r * (layer.in_features + layer.out_features)
    return total


# Projections that exist only after `convert_attention`; an adapter on them needs the converted model.
_SPLIT_ONLY = ("q", "k", "v", FUSED_QKV)


def _fused_qkv(config: ClipLoraConfig) -> bool | None:
    """The attention form `config` needs: fused for `qkv`, split for `q`/`k`/`v`, either (None) otherwise."""
    if FUSED_QKV in config.target_modules:
        return True
    return False if any(t in _SPLIT_ONLY for t in config.target_modules) else None
# A regex comment (`(?#...)`, no parentheses inside) that PEFT prints when the guard below fires.
_UNSPLIT_HINT = ("(?#peftclip adapter on split attention: call peftclip.prepare_for_peft on the model "
                 "before PeftModel.from_pretrained)")


def _any_of(patterns: list[str]) -> str:
    return f"(?:{'|'.join(patterns)})"


def _split_name(name: str, blocks: list[str]) -> tuple[str, str, str] | None:
    """(block container, block index, path inside the block) of a layer name, or None outside the blocks."""
    for block in blocks:
        if name.startswith(block + "."):
            container, _, index = block.rpartition(".")
            return container, index, name[len(block) + 1:]
    return None


def _target_regex(model: nn.Module, names: list[str], towers: list[str]) -> str:
    """One anchored regex matching exactly `names`, grouped by block container, indices only when not all.

    For all blocks of both native towers it reads
    `^(?:(?:visual\\.transformer\\.resblocks|transformer\\.resblocks)\\.\\d+)\\.(?:attn\\.q_proj|...)$`;
    stage-based trunks list one container per stage, and layers outside the blocks (ResNet's
    attention pool) are listed by name.
    """
    blocks = [b for tower in towers for b in block_paths(model, tower)]
    counts: dict[str, int] = {}
    for block in blocks:
        container = block.rpartition(".")[0]
        counts[container] = counts.get(container, 0) + 1
    found: dict[str, tuple[dict[str, None], dict[str, None]]] = {}  # container -> (indices, inner paths)
    loose = []
    for name in names:
        parts = _split_name(name, blocks)
        if parts is None:
            loose.append(re.escape(name))
            continue
        indices, paths = found.setdefault(parts[0], ({}, {}))
        indices[parts[1]] = paths[re.escape(parts[2])] = None
    groups: dict[str, dict[str, list[str]]] = {}  # inner paths -> indices -> containers
    for container, (indices, paths) in found.items():
        key = r"\d+" if len(indices) == counts[container] else _any_of(list(indices))
        groups.setdefault(_any_of(list(paths)), {}).setdefault(key, []).append(re.escape(container))
    alternatives: list[str] = []
    for paths, by_index in groups.items():
        blocks_regex = _any_of([rf"{_any_of(containers)}\.{i}" for i, containers in by_index.items()])
        alternatives.append(rf"{blocks_regex}\.{paths}")
    alternatives += loose
    regex = rf"^{alternatives[0]}$" if len(alternatives) == 1 else rf"^{_any_of(alternatives)}$"
    matched = {n for n, _ in model.named_modules() if re.fullmatch(regex, n)}
    if matched != set(names):  # a bug here would silently adapt other layers
        raise RuntimeError(f"peftclip built a LoRA regex matching {len(matched)} layers instead of {len(names)}")
    return regex


def _unsplit_guard(config: ClipLoraConfig) -> dict[str, Any]:
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
        return {"rank_pattern": {_UNSPLIT_HINT + re.escape(_PATHS[split_only[0]]): config.r}}
    if "out" in config.target_modules:
        return {"exclude_modules": rf"{_UNSPLIT_HINT}^.*\.{re.escape(TARGETS['q'])}$"}
    return {}  # MLP-only: open_clip's own modules, correct with or without the split


def to_peft_config(model: nn.Module, config: ClipLoraConfig, **overrides: Any) -> peft.LoraConfig:
    """PEFT's ClipLoraConfig targeting exactly the layers `config` names, as one short anchored regex.

    The regex is readable in `adapter_config.json`, e.g. for all blocks of both towers
    `^(?:(?:visual\\.transformer\\.resblocks|transformer\\.resblocks)\\.\\d+)\\.(?:attn\\.q_proj|...)$`.
    When attention projections are adapted, the config also makes plain PEFT warn if it is
    loaded onto a model whose attention was not split (see `_unsplit_guard`). An inference-mode
    config (how `AdaptedCLIP` attaches adapters to a shared base) refuses PiSSA/OLoRA adapters.
    """
    if overrides.get("inference_mode") and config.init_lora in MUTATING_INITS:
        raise ValueError(f"init_lora={config.init_lora!r}: the adapter was trained on a residual base W - B0·A0 that "
                         f"adapters sharing one base cannot have; load it alone with peftclip.load_adapter (saving "
                         f"it again with peftclip.save_adapter converts it to plain LoRA on the unmodified base)")
    convert_attention(model, _fused_qkv(config))  # the form `config`'s attention targets need
    names = lora_target_names(model, config)  # checks every targeted module is a linear or conv layer
    native = any(family_of(model, tower).name in _NATIVE for tower in config.towers)
    settings = {**(_unsplit_guard(config) if native else {}), **overrides}
    settings = {"use_dora": config.use_dora, "use_rslora": config.use_rslora,
                "init_lora_weights": INIT_LORA[config.init_lora], **settings}
    peft_config = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules=_target_regex(model, names, config.towers), bias="none", **settings)
    peft_config._register_custom_module({nn.Linear: LeanLoraLinear})  # not saved: adapters stay plain PEFT
    keep_activation_inputs(model)  # so LoRA on the MLP's output layer keeps GELU's input, not its output
    return peft_config


def apply_lora(model: nn.Module, config: ClipLoraConfig, adapter_name: str = "default",
               **peft_overrides: Any) -> peft.PeftModel:
    """Convert `model`'s attention to split projections (fused q/k/v for the `qkv` target) and wrap it with a
    PEFT LoRA adapter.

    Only the LoRA weights are trainable afterwards. `peft_overrides` go to `peft.LoraConfig`
    (e.g. `init_lora_weights=False` for a non-zero B in tests). PiSSA and OLoRA inits rewrite
    the targeted base weights to W - B0·A0 (PEFT does this), so the model owns its base; A0, B0
    are kept so that `save_adapter` writes the adapter as plain rank-2r LoRA on the original base
    (see `peftclip.adapters.lora_init`).
    With `loraplus_lr_ratio`, `train.create_optimizer` gives B that ratio of A's learning rate.

    >>> from peftclip.models import load_base
    >>> peft_model = apply_lora(load_base().model, ClipLoraConfig(r=4))
    >>> sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    18432
    """
    peft_config = to_peft_config(model, config, **peft_overrides)
    _warn_rank_above_width(model, config)
    peft_model = peft.get_peft_model(model, peft_config, adapter_name=adapter_name)
    if config.init_lora in MUTATING_INITS:
        keep_initial_lora(peft_model, adapter_name)  # save_adapter converts the adapter to plain LoRA with them
    if config.loraplus_lr_ratio is not None:
        peft_model.peftclip_loraplus_lr_ratio = config.loraplus_lr_ratio  # read by train.create_optimizer
    return peft_model


def _warn_rank_above_width(model: nn.Module, config: ClipLoraConfig) -> None:
    """Warn when `r` exceeds a targeted layer's smaller dimension: the extra rank only adds parameters."""
    narrow = []
    for name in lora_target_names(model, config):
        layer = _layer(model, name)
        dims = (layer.weight[0].numel(), layer.out_channels) if isinstance(layer, nn.Conv2d) else layer.weight.shape
        if config.r > min(dims):
            narrow.append(f"{name} (width {min(dims)})")
    if narrow:
        more = f" and {len(narrow) - 1} more layers" if len(narrow) > 1 else ""
        warnings.warn(f"LoRA r={config.r} is larger than the smaller dimension of {narrow[0]}{more}; "
                      f"its update cannot have rank above that width, the extra rank only adds parameters",
                      stacklevel=3)
