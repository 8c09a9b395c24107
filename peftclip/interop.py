"""PEFT interop both ways: peftclip folders for plain PEFT users, plain PEFT LoRA folders into peftclip.

peftclip adapts open_clip with its attention split into q/k/v/out linear layers
(`convert_attention`). `prepare_for_peft` is that split for users of plain
`peft.PeftModel.from_pretrained`. `import_peft_adapter` turns a folder written by PEFT's
`save_pretrained` (on a plain open_clip model, or on peftclip's split one) into a complete
peftclip adapter folder.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file
from torch import nn

from .adapters.attention import convert_attention
from .adapters.lora import TARGETS, TOWERS, ClipLoraConfig, lora_target_names, tower_blocks_path
from .adapters.strategy import AdapterSpec, apply_strategy
from .families import family_of, tower_prefix
from .io import ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, AdapterError, save_adapter
from .models import BaseModel

__all__ = ["import_peft_adapter", "prepare_for_peft", "unloaded_tensors_hint"]

_PREFIX = "base_model.model."
# PEFT 0.21's LoRA on an `nn.MultiheadAttention` at NAME: one fused A/B pair for the packed
# in_proj (B has 3·D rows: q, k, v) and out_proj's own LoRA inside the wrapped module.
_MHA_KEYS = {"in_A": "{}.lora_A.weight", "in_B": "{}.lora_B.weight",
             "out_A": "{}.base_layer.out_proj.lora_A.weight", "out_B": "{}.base_layer.out_proj.lora_B.weight"}
_NATIVE_FAMILIES = ("vit", "text")  # the tower families an imported PEFT adapter may adapt
# LoRA's A and B, and DoRA's magnitude vector (`use_dora`), as PEFT's save_pretrained names them.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<part>[AB])\.weight|lora_magnitude_vector)$")


def prepare_for_peft(model: nn.Module) -> nn.Module:
    """Split `model`'s attention as peftclip does, so plain PEFT can load a peftclip adapter; returns `model`.

    Replaces every `nn.MultiheadAttention` by an output-identical `SplitMultiheadAttention`
    with q_proj/k_proj/v_proj/out_proj linear layers, the module names a peftclip
    `adapter_config.json` targets. Without it PEFT warns and the attention LoRA is lost.

    >>> model = peft.PeftModel.from_pretrained(prepare_for_peft(open_clip.create_model("ViT-B-32")),
    ...                                        "outputs/lora_retrieval")  # doctest: +SKIP
    """
    convert_attention(model)
    return model


def unloaded_tensors_hint(peft_config: peft.LoraConfig, names: list[str]) -> None:
    """Mark in `peft_config` that the adapter also holds tensors `names` that PEFT will not load.

    PEFT loads only LoRA weights and says nothing about the rest of the file (projections,
    logit scale, prompts). A `rank_pattern` key that can never match makes PEFT 0.21 warn on
    every load, naming these tensors and `peftclip.load_adapter`; the key changes no rank.
    `save_adapter` calls this before writing `adapter_config.json`.
    """
    if not names:
        return
    listed = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    hint = (f"(?#peftclip adapter also holds {listed} which PEFT does not load: "
            f"use peftclip.load_adapter for the full adapter)(?!)")
    peft_config.rank_pattern = {**(peft_config.rank_pattern or {}), hint: peft_config.r}


def _read_peft_folder(peft_dir: Path) -> tuple[peft.LoraConfig, dict[str, torch.Tensor]]:
    """PEFT's LoRA config and weights from a `save_pretrained` folder, refusing what peftclip cannot express."""
    if not (peft_dir / ADAPTER_CONFIG_NAME).is_file():
        raise AdapterError(f"{peft_dir}: no {ADAPTER_CONFIG_NAME}; not a PEFT adapter folder")
    if not (peft_dir / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise AdapterError(f"{peft_dir}: no {SAFETENSORS_WEIGHTS_NAME} (pickle weights are never loaded)")
    try:
        config = peft.PeftConfig.from_pretrained(str(peft_dir))
        tensors = load_file(peft_dir / SAFETENSORS_WEIGHTS_NAME)
    except (OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{peft_dir}: cannot read the PEFT adapter ({e})") from e
    if not isinstance(config, peft.LoraConfig):
        raise AdapterError(f"{peft_dir / ADAPTER_CONFIG_NAME}: peft_type={config.peft_type}; only LORA is imported")
    unsupported = {"alpha_pattern": config.alpha_pattern, "modules_to_save": config.modules_to_save,
                   "bias": config.bias != "none"}
    for name, value in unsupported.items():
        if value:
            raise AdapterError(f"{peft_dir / ADAPTER_CONFIG_NAME}: {name}={getattr(config, name)!r} is not supported")
    extra = sorted(k for k in tensors if not _LORA_KEY.match(k))
    if extra:
        raise AdapterError(f"{peft_dir / SAFETENSORS_WEIGHTS_NAME}: non-LoRA tensors {extra[:3]} cannot be imported")
    return config, tensors


def _split_mha_lora(tensors: dict[str, torch.Tensor], peft_dir: Path) -> dict[str, torch.Tensor]:
    """Rename PEFT's `nn.MultiheadAttention` LoRA onto split q/k/v/out projections, exactly.

    The fused in_proj update B·A (B of 3·D rows) is q, k and v's updates stacked, so each gets
    the shared A and its third of B. PEFT 0.21 adds out_proj's update twice (it merges it into
    the same weight once by hand and once through out_proj's own LoRA layer), so out_proj's B is
    doubled to reproduce the outputs the PEFT model really gave.
    """
    modules = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    fused = sorted(m for m in modules if _MHA_KEYS["out_A"].format(m) in tensors)
    if not fused:
        return tensors
    warnings.warn(f"{peft_dir}: LoRA on nn.MultiheadAttention; PEFT 0.21 applies its out_proj update twice, so the "
                  f"imported out_proj lora_B is doubled to give the PEFT model's outputs ({len(fused)} modules)",
                  stacklevel=3)
    converted = dict(tensors)
    for module in fused:
        in_a, in_b, out_a, out_b = (converted.pop(pattern.format(module)) for pattern in _MHA_KEYS.values())
        for projection, b in zip(("q_proj", "k_proj", "v_proj"), in_b.chunk(3, dim=0)):
            converted[f"{module}.{projection}.lora_A.weight"] = in_a.clone()
            converted[f"{module}.{projection}.lora_B.weight"] = b.clone()
        converted[f"{module}.out_proj.lora_A.weight"] = out_a
        converted[f"{module}.out_proj.lora_B.weight"] = 2 * out_b
    return converted


def _lora_config(model: nn.Module, names: set[str], peft_config: peft.LoraConfig, rank: int,
                 peft_dir: Path) -> ClipLoraConfig:
    """The peftclip ClipLoraConfig (towers × blocks × target_modules) adapting exactly `names` in split `model`."""
    towers, foreign = {}, {}
    for tower in TOWERS:
        family = family_of(model, tower)
        if family.name in _NATIVE_FAMILIES:
            towers[tower_blocks_path(model, tower)] = tower
        elif tower_prefix(model, tower):
            foreign[tower_prefix(model, tower)] = f"{family.name} {tower}"
    targets = {path: short for short, path in TARGETS.items()}
    found: dict[str, set[int]] = {}
    chosen: set[str] = set()
    for name in names:
        if name.startswith(tuple(foreign)):
            tower = foreign[next(p for p in foreign if name.startswith(p))]
            raise AdapterError(f"{peft_dir}: LoRA on {name}, in the {tower} tower; importing plain PEFT adapters "
                               f"works on open_clip's native ViT and text towers only")
        match = re.fullmatch(r"(?P<prefix>.+)\.(?P<index>\d+)\.(?P<target>[^.]+\.[^.]+)", name)
        if match is None or match["prefix"] not in towers or match["target"] not in targets:
            raise AdapterError(f"{peft_dir}: LoRA on {name}, which is not a transformer block projection peftclip "
                               f"adapts ({', '.join(TARGETS.values())})")
        found.setdefault(towers[match["prefix"]], set()).add(int(match["index"]))
        chosen.add(targets[match["target"]])
    full = all(len(indices) == len(model.get_submodule(tower_blocks_path(model, t))) for t, indices in found.items())
    blocks: Any = "all" if full else sorted(set.union(*found.values()))
    config = ClipLoraConfig(towers=[t for t in TOWERS if t in found], blocks=blocks,
                            target_modules=[t for t in TARGETS if t in chosen], r=rank,
                            lora_alpha=float(peft_config.lora_alpha), lora_dropout=peft_config.lora_dropout,
                            use_dora=peft_config.use_dora, use_rslora=peft_config.use_rslora)
    if set(lora_target_names(model, config)) != names:
        raise AdapterError(f"{peft_dir}: the {len(names)} adapted layers are not one set of blocks × projections "
                           f"shared by the towers, which a peftclip ClipLoraConfig needs")
    return config


def import_peft_adapter(peft_dir: str | os.PathLike, base: BaseModel, output_dir: str | os.PathLike) -> Path:
    """Write a complete peftclip adapter folder from a LoRA folder saved by PEFT's `save_pretrained`.

    Accepts PEFT LoRA, DoRA (its magnitudes) and rsLoRA (its scale) alike, on a plain open_clip
    model (MLP `c_fc`/`c_proj`, attention `out_proj`, or PEFT's own LoRA on `nn.MultiheadAttention`,
    converted exactly onto split q/k/v/out with a warning about PEFT's doubled out_proj update; PEFT
    has no DoRA there) and on peftclip's split model
    (`apply_lora(...).save_pretrained(dir)`). The metadata names `base`, which is modified in
    place (split and wrapped) like `load_adapter` does. The LoRA layers must form one peftclip
    `ClipLoraConfig`: the same projections in the same blocks of each adapted tower, one rank.
    Only open_clip's native ViT and text towers are accepted; LoRA in another family's tower
    (timm, ResNet, Hugging Face text) is refused with a message naming the layer.

    Args:
        peft_dir: folder with PEFT's `adapter_config.json` and `adapter_model.safetensors`.
        base: the base the adapter was trained on (e.g. `load_base(BaseConfig("ViT-B-32", "openai"))`).
        output_dir: the peftclip folder to write.

    >>> import_peft_adapter("peft_lora/", load_base(BaseConfig(model_name="ViT-B-32")), "imported/")  # doctest: +SKIP
    """
    peft_dir = Path(peft_dir)
    peft_config, tensors = _read_peft_folder(peft_dir)
    tensors = {k.removeprefix(_PREFIX): v for k, v in _split_mha_lora(tensors, peft_dir).items()}
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    if ranks != {peft_config.r}:
        raise AdapterError(f"{peft_dir}: LoRA ranks {sorted(ranks)} differ from r={peft_config.r}; "
                           f"peftclip uses one rank for every layer")
    convert_attention(base.model)
    names = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    spec = AdapterSpec(lora=_lora_config(base.model, names, peft_config, peft_config.r, peft_dir))
    model, _ = apply_strategy(base.model, spec, base.tokenizer)
    result = peft.set_peft_model_state_dict(model, {_PREFIX + k: v for k, v in tensors.items()})
    missing = [k for k in result.missing_keys if "lora_" in k]  # DoRA's magnitude included
    if result.unexpected_keys or missing:
        raise AdapterError(f"{peft_dir}: LoRA tensors do not fit {base.info.get('model_name')} "
                           f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})")
    return save_adapter(model, output_dir, base.info, spec.to_dict(), training={"imported_from": str(peft_dir)})
