"""Adapter folders: PEFT's layout plus peftclip's metadata, written atomically, verified on load."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import save_file
from torch import nn

from .adapters.attention import convert_attention
from .models import BaseModel, file_sha256
from .utils import write_json_atomic

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "AdapterError",
    "METADATA_NAME",
    "METRICS_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "load_adapter",
    "read_metadata",
    "save_adapter",
    "save_metrics",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's name
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name
METADATA_NAME = "peftclip_config.json"
METRICS_NAME = "metrics.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class AdapterError(ValueError):
    """An adapter folder that cannot be used: missing, altered, unsafe or for another base."""


def save_adapter(model: peft.PeftModel, output_dir: str | os.PathLike, base_info: dict[str, Any],
                 strategy: dict[str, Any], training: dict[str, Any] | None = None,
                 adapter_name: str = "default") -> Path:
    """Write `model`'s trainable adapter as a folder that `load_adapter` reads back.

    The folder holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's layout)
    and `peftclip_config.json` (base identity, strategy, training config, weights checksum).
    It is assembled under a temporary name beside `output_dir` and renamed into place, so a
    crash leaves either the previous folder or the new one, never a mix.

    Args:
        model: the PEFT-wrapped model.
        output_dir: destination folder; replaced if it exists.
        base_info: `BaseModel.info` of the base the adapter was trained on.
        strategy: the adapter's own config (e.g. `{"lora": LoraConfig.to_dict()}`).
        training: the training config, recorded for reproducibility.
        adapter_name: which of `model`'s adapters to save.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        state = peft.get_peft_model_state_dict(model, adapter_name=adapter_name)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(state, tmp / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
        peft_config = copy.deepcopy(model.peft_config[adapter_name])
        peft_config.inference_mode = True
        peft_config.base_model_name_or_path = base_info.get("model_name")
        peft_config.save_pretrained(str(tmp))
        metadata = {
            "base": base_info,
            "strategy": strategy,
            "training": training or {},
            "trainable_parameters": sum(v.numel() for v in state.values()),
            "weights_sha256": file_sha256(tmp / SAFETENSORS_WEIGHTS_NAME),
        }
        write_json_atomic(tmp / METADATA_NAME, metadata)
        _replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder `new` to `target`, replacing an existing `target` with two renames."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def save_metrics(output_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Write `metrics` as `metrics.json` in an adapter folder, atomically."""
    path = Path(output_dir) / METRICS_NAME
    write_json_atomic(path, metrics)
    return path


def read_metadata(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check an adapter folder's metadata; refuses pickles and altered weights."""
    adapter_dir = Path(adapter_dir)
    if adapter_dir.is_file() or adapter_dir.suffix in _PICKLE_SUFFIXES:
        if adapter_dir.suffix in _PICKLE_SUFFIXES:
            raise AdapterError(f"{adapter_dir}: pickle files are never loaded as adapters; "
                               f"use a folder with {SAFETENSORS_WEIGHTS_NAME}")
        raise AdapterError(f"{adapter_dir}: an adapter is a folder, not a file")
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter folder not found: {adapter_dir}")
    weights = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise AdapterError(f"{adapter_dir}: no {SAFETENSORS_WEIGHTS_NAME}{hint}")
    for name in (ADAPTER_CONFIG_NAME, METADATA_NAME):
        if not (adapter_dir / name).is_file():
            raise AdapterError(f"{adapter_dir}: missing {name}")
    try:
        metadata = json.loads((adapter_dir / METADATA_NAME).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{adapter_dir / METADATA_NAME}: not valid JSON ({e})") from e
    actual = file_sha256(weights)
    if actual != metadata.get("weights_sha256"):
        raise AdapterError(f"{weights}: checksum mismatch (file is truncated or altered); "
                           f"expected {metadata.get('weights_sha256')}, got {actual}")
    return metadata


def _check_base(adapter_dir: Path, expected: dict[str, Any], actual: dict[str, Any]) -> None:
    if expected != actual:
        raise AdapterError(f"{adapter_dir} was trained on base {_describe(expected)}, "
                           f"but the loaded base is {_describe(actual)}")


def _describe(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(info.items()))


def load_adapter(base: BaseModel, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> peft.PeftModel:
    """Load an adapter folder onto a freshly loaded base (modified in place) and return the wrapped model.

    Raises `AdapterError` when the folder is incomplete, holds pickles, its weights fail
    the checksum, or it was trained on a different base (both bases are named).

    >>> model = load_adapter(load_base(), "outputs/lora_retrieval")  # doctest: +SKIP
    """
    adapter_dir = Path(adapter_dir)
    metadata = read_metadata(adapter_dir)
    _check_base(adapter_dir, metadata["base"], base.info)
    model: nn.Module = base.model
    convert_attention(model)
    try:
        return peft.PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name,
                                              is_trainable=is_trainable,
                                              torch_device=str(next(model.parameters()).device))
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{adapter_dir}: cannot load onto {base.info.get('model_name')}: {e}") from e
