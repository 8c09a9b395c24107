"""PiSSA and OLoRA adapters saved as plain LoRA on the unmodified base, as PEFT's weight conversion does.

PiSSA (top-r singular vectors) and OLoRA (a QR of W) start A₀, B₀ from W and leave the
residual W_res = W − s·B₀A₀ as the base, so the trained A, B only work on that residual.
Since W_res + s·BA = W + s·(BA − B₀A₀), the same update on the original W is the
rank-2r LoRA A' = [A; A₀], B' = [B, −B₀] with the same scaling s: PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` doubles `r` and `lora_alpha`
(alpha·√2 under rsLoRA, whose scaling is alpha/√r). The converted adapter loads as ordinary
LoRA on the base everyone shares, so `AdaptedCLIP` can switch it against other adapters.

A₀ and B₀ are kept (adapter-sized, on the CPU) when `apply_lora` creates the model. A
resumed run recreates the model from the same base, and PEFT's PiSSA (full SVD) and OLoRA
(QR) inits are deterministic for a given W, so its A₀, B₀ are the same.
"""

from __future__ import annotations

import copy
from typing import Any

import peft
import torch
from torch import nn

__all__ = ["INITIAL_LORA_ATTR", "convert_mutated_init", "converted_lora_settings", "converted_peft_config",
           "keep_initial_lora"]

# Attribute of the PeftModel holding {adapter_name: {tensor name: A₀ or B₀}}, names as `get_peft_model_state_dict`'s.
INITIAL_LORA_ATTR = "peftclip_initial_lora"


def _is_a(name: str) -> bool:
    return ".lora_A." in name


def _is_b(name: str) -> bool:
    return ".lora_B." in name


def keep_initial_lora(peft_model: peft.PeftModel, adapter_name: str = "default") -> None:
    """Keep a CPU copy of `adapter_name`'s initial A₀, B₀ on `peft_model`, for `convert_mutated_init` at save."""
    state = peft.get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    initial = {k: v.detach().to("cpu", copy=True) for k, v in state.items() if _is_a(k) or _is_b(k)}
    kept = getattr(peft_model, INITIAL_LORA_ATTR, None) or {}
    kept[adapter_name] = initial
    setattr(peft_model, INITIAL_LORA_ATTR, kept)  # a plain attribute, never in a state_dict


def _alpha_factor(use_rslora: bool) -> float:
    """What doubling r asks of lora_alpha to keep the scaling: alpha/r doubles alpha, rsLoRA's alpha/sqrt(r) √2."""
    return 2 ** 0.5 if use_rslora else 2.0


def converted_lora_settings(lora: dict[str, Any]) -> dict[str, Any]:
    """`lora` (a `ClipLoraConfig` as a dict) for the converted adapter: rank 2r, same scaling, PEFT's default init.

    >>> converted_lora_settings({"r": 4, "lora_alpha": 8.0, "use_rslora": False, "init_lora": "pissa"})
    {'r': 8, 'lora_alpha': 16.0, 'use_rslora': False, 'init_lora': 'default'}
    """
    factor = _alpha_factor(bool(lora.get("use_rslora")))
    return {**lora, "r": 2 * lora["r"], "lora_alpha": lora["lora_alpha"] * factor, "init_lora": "default"}


def converted_peft_config(peft_config: peft.LoraConfig) -> peft.LoraConfig:
    """A copy of PEFT's config of a PiSSA/OLoRA adapter for its converted form (as `converted_lora_settings`)."""
    peft_config = copy.deepcopy(peft_config)
    factor = _alpha_factor(peft_config.use_rslora)
    peft_config.r *= 2
    peft_config.lora_alpha *= factor
    peft_config.init_lora_weights = True
    peft_config.rank_pattern = {k: 2 * v for k, v in (peft_config.rank_pattern or {}).items()}
    peft_config.alpha_pattern = {k: v * factor for k, v in (peft_config.alpha_pattern or {}).items()}
    return peft_config


def convert_mutated_init(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str = "default"
                         ) -> dict[str, torch.Tensor]:
    """`tensors` (a PiSSA/OLoRA adapter's, as `io.adapter_tensors` names them) as the rank-2r plain LoRA.

    A' = [A; A₀] stacks the ranks (dim 0 of a linear or convolution A), B' = [B, −B₀] (dim 1 of B);
    every other tensor (a DoRA magnitude, prompts) is kept: W + s·B'A' equals W_res + s·BA exactly.
    Raises ValueError when `model` kept no A₀, B₀ (it was not made by `apply_lora`).
    """
    initial = (getattr(model, INITIAL_LORA_ATTR, None) or {}).get(adapter_name)
    if initial is None:
        raise ValueError(f"adapter {adapter_name!r} uses a PiSSA/OLoRA init but its initial A0, B0 were not kept; "
                         f"create the model with peftclip's apply_lora/apply_strategy")
    converted = dict(tensors)
    for name, start in initial.items():
        if name not in tensors:
            raise ValueError(f"adapter {adapter_name!r} has no tensor {name} that its initial weights have")
        trained, sign = tensors[name], 1 if _is_a(name) else -1
        converted[name] = torch.cat([trained, sign * start.to(trained)], dim=0 if _is_a(name) else 1).contiguous()
    return converted
