"""Adapter folders: PEFT's layout plus peftclip's metadata, written atomically, verified on load."""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from .adapters.strategy import AdapterSpec, apply_strategy, inner_model
from .models import BaseModel, file_sha256
from .utils import default_mode, write_json_atomic

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "AdapterError",
    "METADATA_NAME",
    "METRICS_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "SAVE_DTYPES",
    "SavedAdapter",
    "adapter_tensors",
    "check_base",
    "load_adapter",
    "read_adapter",
    "read_metadata",
    "save_adapter",
    "save_adapter_weights",
    "save_metrics",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's name
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name
METADATA_NAME = "peftclip_config.json"
METRICS_NAME = "metrics.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Floating-point dtypes an adapter may be written in; tensors are cast back to the model's on load.
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AdapterError(ValueError):
    """An adapter folder that cannot be used: missing, altered, unsafe or for another base."""


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Every tensor an adapter consists of: PEFT's LoRA weights plus unfrozen base or added parameters."""
    tensors = {}
    if isinstance(model, peft.PeftModel):
        tensors.update(peft.get_peft_model_state_dict(model, adapter_name=adapter_name))
    for name, param in inner_model(model).named_parameters():
        if param.requires_grad and "lora_" not in name:
            tensors[name] = param
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _check_save_dtype(save_dtype: str) -> None:
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype={save_dtype!r}; choose from {sorted(SAVE_DTYPES)}")


def save_adapter_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                         save_dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """Write adapter `tensors` as the safetensors file of an adapter folder, floating-point ones in `save_dtype`.

    Returns the tensors as written.

    >>> save_adapter_weights({"w": torch.ones(2)}, "/tmp/a.safetensors", "bf16")["w"].dtype
    torch.bfloat16
    """
    _check_save_dtype(save_dtype)
    state = {k: v.to(SAVE_DTYPES[save_dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(state, path, metadata={"format": "pt"})
    os.chmod(path, default_mode())  # safetensors writes 0600
    return state


def save_adapter(model: nn.Module, output_dir: str | os.PathLike, base_info: dict[str, Any],
                 strategy: dict[str, Any], training: dict[str, Any] | None = None,
                 adapter_name: str = "default", save_dtype: str = "fp32") -> Path:
    """Write `model`'s trainable adapter as a folder that `load_adapter` reads back.

    The folder holds `adapter_model.safetensors` (every adapter tensor, LoRA keys as PEFT
    names them), `adapter_config.json` (PEFT's config, when LoRA is on) and
    `peftclip_config.json` (base identity, strategy, training config, weights checksum).
    It is assembled under a temporary name beside `output_dir` and renamed into place, so a
    crash leaves either the previous folder or the new one, never a mix.

    Args:
        model: the adapted model (a `peft.PeftModel` when LoRA is on).
        output_dir: destination folder; replaced if it exists.
        base_info: `BaseModel.info` of the base the adapter was trained on.
        strategy: `AdapterSpec.to_dict()` of the applied methods.
        training: the training config, recorded for reproducibility.
        adapter_name: which PEFT adapter to save.
        save_dtype: one of SAVE_DTYPES; "bf16" or "fp16" halve the file (floating-point tensors only).
    """
    _check_save_dtype(save_dtype)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp creates 0700
    try:
        state = save_adapter_weights(adapter_tensors(model, adapter_name), tmp / SAFETENSORS_WEIGHTS_NAME, save_dtype)
        if isinstance(model, peft.PeftModel):
            peft_config = copy.deepcopy(model.peft_config[adapter_name])
            peft_config.inference_mode = True
            peft_config.base_model_name_or_path = base_info.get("model_name")
            peft_config.save_pretrained(str(tmp))
        metadata = {
            "base": base_info,
            "strategy": strategy,
            "training": training or {},
            "trainable_parameters": sum(v.numel() for v in state.values()),
            "save_dtype": save_dtype,
            "weights_sha256": file_sha256(tmp / SAFETENSORS_WEIGHTS_NAME),
        }
        write_json_atomic(tmp / METADATA_NAME, metadata)
        _fsync_dir(tmp)
        _replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _fsync_dir(folder: Path) -> None:
    """Flush every file in `folder` to disk before the folder is renamed into place."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_dir(new: Path, target: Path) -> None:
    """Move folder `new` to `target`; an existing `target` is swapped out in one atomic step."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):  # `new` now holds the old folder
        shutil.rmtree(new, ignore_errors=True)
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


def _check_folder(adapter_dir: Path) -> dict[str, Any]:
    """The metadata of an adapter folder whose files are all present and safe to read (checksum aside)."""
    if adapter_dir.is_file() or adapter_dir.suffix in _PICKLE_SUFFIXES:
        if adapter_dir.suffix in _PICKLE_SUFFIXES:
            raise AdapterError(f"{adapter_dir}: pickle files are never loaded as adapters; "
                               f"use a folder with {SAFETENSORS_WEIGHTS_NAME}")
        raise AdapterError(f"{adapter_dir}: an adapter is a folder, not a file")
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter folder not found: {adapter_dir}")
    if not (adapter_dir / SAFETENSORS_WEIGHTS_NAME).is_file():
        pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise AdapterError(f"{adapter_dir}: no {SAFETENSORS_WEIGHTS_NAME}{hint}")
    if not (adapter_dir / METADATA_NAME).is_file():
        raise AdapterError(f"{adapter_dir}: missing {METADATA_NAME}")
    try:
        metadata = json.loads((adapter_dir / METADATA_NAME).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{adapter_dir / METADATA_NAME}: not valid JSON ({e})") from e
    if "lora" in metadata.get("strategy", {}) and not (adapter_dir / ADAPTER_CONFIG_NAME).is_file():
        raise AdapterError(f"{adapter_dir}: missing {ADAPTER_CONFIG_NAME}")
    return metadata


def _check_checksum(weights: Path, metadata: dict[str, Any], actual: str) -> None:
    if actual != metadata.get("weights_sha256"):
        raise AdapterError(f"{weights}: checksum mismatch (file is truncated or altered); "
                           f"expected {metadata.get('weights_sha256')}, got {actual}")


def read_metadata(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check an adapter folder's metadata; refuses pickles and altered weights."""
    adapter_dir = Path(adapter_dir)
    metadata = _check_folder(adapter_dir)
    weights = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    _check_checksum(weights, metadata, file_sha256(weights))
    return metadata


@dataclass
class SavedAdapter:
    """An adapter folder's checked contents: metadata, the strategy it applies, and its tensors."""

    folder: Path
    metadata: dict[str, Any]
    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]

    @property
    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's LoRA weights, keyed as `peft.get_peft_model_state_dict` names them."""
        return {k: v for k, v in self.tensors.items() if "lora_" in k}

    @property
    def other_tensors(self) -> dict[str, torch.Tensor]:
        """Unfrozen base parameters and added modules (prompts, head), by parameter name."""
        return {k: v for k, v in self.tensors.items() if "lora_" not in k}


def read_adapter(adapter_dir: str | os.PathLike, base_info: dict[str, Any] | None = None) -> SavedAdapter:
    """Read an adapter folder: the weights are read once, checked against their checksum, then parsed.

    With `base_info`, also checks that the adapter was trained on that base.
    """
    adapter_dir = Path(adapter_dir)
    metadata = _check_folder(adapter_dir)
    weights = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    data = weights.read_bytes()
    _check_checksum(weights, metadata, hashlib.sha256(data).hexdigest())
    if base_info is not None:
        check_base(adapter_dir, metadata["base"], base_info)
    try:
        spec = AdapterSpec.from_dict(metadata["strategy"])
    except (ValueError, TypeError, KeyError) as e:
        raise AdapterError(f"{adapter_dir / METADATA_NAME}: bad strategy ({e})") from e
    return SavedAdapter(adapter_dir, metadata, spec, load_safetensors(data))


def check_base(adapter_dir: Path, expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Refuse an adapter trained on another base, naming both."""
    if expected != actual:
        raise AdapterError(f"{adapter_dir} was trained on base {_describe(expected)}, "
                           f"but the loaded base is {_describe(actual)}")


def _describe(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(info.items()))


def load_adapter(base: BaseModel, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load an adapter folder onto a freshly loaded base (modified in place) and return the adapted model.

    The same call loads every strategy. Raises `AdapterError` when the folder is incomplete,
    holds pickles, its weights fail the checksum, or it was trained on a different base
    (both bases are named). To keep several adapters on one base, use `AdaptedCLIP`.

    >>> model = load_adapter(load_base(), "outputs/lora_retrieval")  # doctest: +SKIP
    """
    saved = read_adapter(adapter_dir, base.info)
    spec = saved.spec
    try:
        head_weights = torch.zeros(spec.head.n_classes, base.model.visual.output_dim) if spec.head else None
        model, _ = apply_strategy(base.model, spec, base.tokenizer, adapter_name, head_weights=head_weights)
        if spec.lora is not None:
            result = peft.set_peft_model_state_dict(model, saved.lora_tensors, adapter_name=adapter_name)
            if result.unexpected_keys:
                raise AdapterError(f"{saved.folder}: unexpected LoRA tensors {result.unexpected_keys[:3]}")
        _load_extra_tensors(saved.folder, inner_model(model), saved.other_tensors)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{saved.folder}: cannot load onto {base.info.get('model_name')}: {e}") from e
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def _load_extra_tensors(adapter_dir: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved non-LoRA tensors into `model`'s parameters of the same names; they must match exactly."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(f"{adapter_dir}: tensors do not match the strategy (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise AdapterError(f"{adapter_dir}: {name} has shape {tuple(tensor.shape)}, "
                                   f"the base expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
