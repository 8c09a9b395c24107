"""Adapter folders: PEFT's layout plus peftclip's metadata, written atomically, verified on load."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .utils import (
    cache_root,
    default_mode,
    file_sha256,
    fsync_dir,
    inner_model,
    replace_dir,
    save_safetensors,
    write_error,
    write_json_atomic,
)

# torch, peft and the adapter methods load inside the functions that need them: reading an adapter's
# metadata (`read_metadata(..., check_strategy=False)`, what `peftclip info` does) needs JSON and hashlib only.
if TYPE_CHECKING:
    import torch
    from torch import nn

    from .adapters.strategy import AdapterSpec
    from .models import BaseModel

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "AdapterError",
    "METADATA_NAME",
    "METRICS_NAME",
    "PEFT_METHODS",
    "SAFETENSORS_WEIGHTS_NAME",
    "SAVE_DTYPES",
    "SavedAdapter",
    "adapter_tensors",
    "check_base",
    "check_output_dir",
    "check_peft_keys",
    "is_adapter_folder",
    "is_peft_tensor",
    "lock_output_dir",
    "portable_training",
    "load_adapter",
    "read_adapter",
    "read_metadata",
    "resolve_recorded_path",
    "save_adapter",
    "save_adapter_weights",
    "save_metrics",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's name
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name
METADATA_NAME = "peftclip_config.json"
METRICS_NAME = "metrics.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Every file peftclip writes into an adapter folder; a folder holding anything else is the user's.
ADAPTER_FOLDER_FILES = frozenset({ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, METADATA_NAME, METRICS_NAME,
                                  "README.md", "training_curves.png"})
# The strategy methods that PEFT applies, with PEFT's `peft_type` and the prefix of its tensors' names.
PEFT_METHODS = {"lora": ("LORA", "lora_"), "ia3": ("IA3", "ia3_")}
# Floating-point dtypes an adapter may be written in (torch's names); tensors are cast back to the model's on load.
SAVE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class AdapterError(ValueError):
    """An adapter folder that cannot be used: missing, altered, unsafe or for another base."""


def is_peft_tensor(name: str) -> bool:
    """Whether tensor `name` belongs to a PEFT tuner (LoRA's `lora_A`, IA³'s `ia3_l`, ...)."""
    return any(prefix in name for _, prefix in PEFT_METHODS.values())


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Every tensor an adapter consists of: PEFT's tuner weights plus unfrozen base or added parameters."""
    import peft

    tensors = {}
    if isinstance(model, peft.PeftModel):
        tensors.update(peft.get_peft_model_state_dict(model, adapter_name=adapter_name))
    for name, param in inner_model(model).named_parameters():
        if param.requires_grad and not is_peft_tensor(name):
            tensors[name] = param
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _check_save_dtype(save_dtype: str) -> None:
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype={save_dtype!r}; choose from {sorted(SAVE_DTYPES)}")


def save_adapter_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                         save_dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """Write adapter `tensors` as the safetensors file of an adapter folder, floating-point ones in `save_dtype`.

    Returns the tensors as written.

    >>> import torch
    >>> save_adapter_weights({"w": torch.ones(2)}, "a.safetensors", "bf16")["w"].dtype
    torch.bfloat16
    """
    import torch

    _check_save_dtype(save_dtype)
    dtype = getattr(torch, SAVE_DTYPES[save_dtype])
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(state, path, metadata={"format": "pt"})
    os.chmod(path, default_mode())  # safetensors writes 0600
    return state


def save_adapter(model: nn.Module, output_dir: str | os.PathLike, base_info: dict[str, Any],
                 strategy: dict[str, Any], training: dict[str, Any] | None = None,
                 adapter_name: str = "default", save_dtype: str = "fp32", overwrite: bool = True) -> Path:
    """Write `model`'s trainable adapter as a folder that `load_adapter` reads back.

    The folder holds `adapter_model.safetensors` (every adapter tensor, LoRA and IA³ keys as PEFT
    names them), `adapter_config.json` (PEFT's config, when LoRA or IA³ is on) and
    `peftclip_config.json` (base identity, strategy, training config, weights checksum).
    A PiSSA/OLoRA adapter, trained on a residual base, is written as the plain LoRA of rank 2r that
    gives the same outputs on the unmodified base (PEFT's conversion), its metadata's
    `converted_from` naming the init, `r` and `lora_alpha` it was trained with.
    It is assembled under a temporary name beside `output_dir` and renamed into place, so a
    crash leaves either the previous folder or the new one, never a mix.

    Args:
        model: the adapted model (a `peft.PeftModel` when LoRA or IA³ is on).
        output_dir: destination folder: absent, empty, or an adapter folder peftclip wrote (replaced
            when `overwrite`); anything else is refused.
        base_info: `BaseModel.info` of the base the adapter was trained on.
        strategy: `AdapterSpec.to_dict()` of the applied methods.
        training: the training config, recorded for reproducibility.
        adapter_name: which PEFT adapter to save.
        save_dtype: one of SAVE_DTYPES; "bf16" or "fp16" halve the file (floating-point tensors only).
        overwrite: whether an existing adapter folder at `output_dir` may be replaced.
    """
    import peft

    from .models import hub_base_model

    _check_save_dtype(save_dtype)
    output_dir = check_output_dir(output_dir, overwrite=overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    except OSError as e:
        raise write_error(output_dir, e) from e
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp creates 0700
    try:
        peft_config = copy.deepcopy(model.peft_config[adapter_name]) if isinstance(model, peft.PeftModel) else None
        tensors, strategy, peft_config, converted_from = _as_plain_lora(
            model, adapter_tensors(model, adapter_name), strategy, peft_config, adapter_name)
        state = save_adapter_weights(tensors, tmp / SAFETENSORS_WEIGHTS_NAME, save_dtype)
        metadata = {
            "base": base_info,
            "strategy": strategy,
            "training": portable_training(training or {}, output_dir),
            "trainable_parameters": sum(v.numel() for v in state.values()),
            "save_dtype": save_dtype,
            "weights_sha256": file_sha256(tmp / SAFETENSORS_WEIGHTS_NAME),
        }
        if converted_from is not None:
            metadata["converted_from"] = converted_from
        if peft_config is not None:
            peft_config.inference_mode = True
            peft_config.base_model_name_or_path = hub_base_model(base_info) or base_info.get("model_name")
            from .interop import unloaded_tensors_hint  # interop imports io

            unloaded_tensors_hint(peft_config, [k for k in state if not is_peft_tensor(k)])
            peft_config.save_pretrained(str(tmp))
            metadata["adapter_config_sha256"] = file_sha256(tmp / ADAPTER_CONFIG_NAME)
        metadata["metadata_sha256"] = _metadata_sha256(metadata)
        write_json_atomic(tmp / METADATA_NAME, metadata)
        fsync_dir(tmp)
        replace_dir(tmp, output_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(output_dir, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _as_plain_lora(model: nn.Module, tensors: dict[str, torch.Tensor], strategy: dict[str, Any], peft_config: Any,
                   adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any, dict[str, Any] | None]:
    """(tensors, strategy, PEFT config, record) of a PiSSA/OLoRA adapter converted to plain rank-2r LoRA on the
    unmodified base, as PEFT's `path_initial_model_for_weight_conversion` does (see `adapters.lora_init`); any
    other adapter as given, with record None. The record (init, r, lora_alpha as trained) goes into the metadata."""
    from .adapters.lora import MUTATING_INITS
    from .adapters.lora_init import convert_mutated_init, converted_lora_settings, converted_peft_config

    lora = strategy.get("lora")
    if peft_config is None or not lora or lora.get("init_lora") not in MUTATING_INITS:
        return tensors, strategy, peft_config, None
    record = {key: lora[key] for key in ("init_lora", "r", "lora_alpha")}
    return (convert_mutated_init(model, tensors, adapter_name), {**strategy, "lora": converted_lora_settings(lora)},
            converted_peft_config(peft_config), record)


def _metadata_sha256(metadata: dict[str, Any]) -> str:
    """Checksum of the metadata itself (every field but this one), so an edited file is noticed."""
    fields = {k: v for k, v in metadata.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


_PATH_FIELDS = (("data", "source"), ("train", "output_dir"), ("train", "resume"))
_CACHE_VARIABLE = "$PEFTCLIP_CACHE"


def portable_training(training: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """`training` with local paths made safe to share, never naming the user's absolute tree: relative to
    `output_dir` when under the working directory (the user's project), `$PEFTCLIP_CACHE/...` when under
    peftclip's cache (e.g. the built-in data set), else just the name. `resolve_recorded_path` reverses it."""
    training = copy.deepcopy(training)
    cwd, cache = Path.cwd().resolve(), cache_root().resolve()
    for section, key in _PATH_FIELDS:
        value = training.get(section, {}).get(key)
        if not isinstance(value, str) or value == "latest" or not (os.path.isabs(value) or Path(value).exists()):
            continue  # not a local path (e.g. a Hub dataset id)
        path = Path(value).resolve()
        if path == cwd or cwd in path.parents:
            value = os.path.relpath(path, output_dir.resolve())
        elif cache in path.parents:
            value = f"{_CACHE_VARIABLE}/{path.relative_to(cache)}"
        else:
            value = path.name
        training[section][key] = value
    return training


def resolve_recorded_path(value: str, adapter_dir: Path) -> str:
    """A path `portable_training` recorded, found again from the adapter folder; as given if not there."""
    if value.startswith(f"{_CACHE_VARIABLE}/"):
        return str(cache_root() / value.removeprefix(f"{_CACHE_VARIABLE}/"))
    if not os.path.isabs(value) and (adapter_dir / value).exists():
        return str((adapter_dir / value).resolve())
    return value


def _is_adapter_file(name: str) -> bool:
    """An adapter file, or the temporary file of one that a killed atomic write left behind
    (`.metrics.json.<random>.tmp` from `write_json_atomic`, `.NAME.tmp-<pid>` from the others)."""
    if name in ADAPTER_FOLDER_FILES:
        return True
    stem = name[1:].split(".tmp", 1)[0] if name.startswith(".") and ".tmp" in name else ""
    return any(stem == known or stem.startswith(f"{known}.") for known in ADAPTER_FOLDER_FILES)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder peftclip wrote: its metadata file and nothing but adapter files."""
    path = Path(path)
    if not (path / METADATA_NAME).is_file():
        return False
    return all(_is_adapter_file(p.name) for p in path.iterdir())


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = True) -> Path:
    """Check that an adapter can be written at `output_dir`, before any work is spent on it.

    The target must be absent, an empty folder, or (with `overwrite`) an adapter folder
    peftclip wrote; a file or a folder of anything else is refused, never replaced. The
    parent folder is created and must be writable.
    """
    output_dir = Path(output_dir)
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise FileExistsError(f"output {output_dir} exists and is not a folder; choose another --output-dir")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not is_adapter_folder(output_dir):
            others = sorted(p.name for p in output_dir.iterdir() if not _is_adapter_file(p.name))
            raise FileExistsError(f"output folder {output_dir} holds files peftclip did not write "
                                  f"({', '.join(others[:3]) or METADATA_NAME + ' missing'}); choose another "
                                  f"--output-dir (peftclip never replaces such a folder)")
        if not overwrite:
            raise FileExistsError(f"output folder {output_dir} holds an adapter already; pass --overwrite to "
                                  f"replace it, or choose another --output-dir")
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir.parent):
            pass
    except OSError as e:
        raise write_error(output_dir, e) from e
    return output_dir


_ORPHAN_WAIT_SECONDS = 30.0  # DataLoader workers notice their run died within a few seconds and exit


def _try_lock(fd: int) -> bool:
    """Take the lock on `fd`; False when a live run holds it.

    A killed run's DataLoader workers inherit the lock and keep it until they notice their run is
    gone: when the recorded owner has exited, wait for them rather than refuse.
    """
    deadline = time.monotonic() + _ORPHAN_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if not owner.isdigit() or _alive(int(owner)) or time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def lock_output_dir(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on `output_dir` (a `.NAME.lock` file beside it) while a run writes there.

    A second run on the same folder is refused at once with the PID of the first.
    """
    output_dir = Path(output_dir)
    lock = output_dir.with_name(f".{output_dir.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, default_mode())
        except OSError as e:
            raise write_error(lock, e) from e
        if not _try_lock(fd):
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(f"output folder {output_dir} is in use by PID {owner} (another run writes "
                                  f"there); wait for it or choose another --output-dir") from None
        if lock.exists() and os.fstat(fd).st_ino == os.stat(lock).st_ino:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield output_dir
    finally:
        lock.unlink(missing_ok=True)  # while still locked, so no other run ever sees a stale owner
        os.close(fd)


def save_metrics(output_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """Write `metrics` as `metrics.json` in an adapter folder, atomically."""
    path = Path(output_dir) / METRICS_NAME
    write_json_atomic(path, metrics)
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e


def _check_metadata(path: Path, metadata: Any) -> None:
    """Refuse metadata without the fields every reader relies on, naming the first one missing."""
    if not isinstance(metadata, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    for key, kind in (("base", dict), ("strategy", dict), ("weights_sha256", str)):
        if not isinstance(metadata.get(key), kind):
            raise AdapterError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    if not isinstance(metadata["base"].get("model_name"), str):
        raise AdapterError(f"{path}: field 'base.model_name' is missing")
    recorded = metadata.get("metadata_sha256")
    if recorded is not None and recorded != _metadata_sha256(metadata):
        raise AdapterError(f"{path}: checksum mismatch (the metadata was edited or damaged)")


def _check_folder(adapter_dir: Path, check_strategy: bool = True) -> tuple[dict[str, Any], AdapterSpec | None]:
    """The metadata and strategy of an adapter folder whose files are present, parse, and (but for the
    weights, checked by the caller) match their checksums; the strategy is None unless `check_strategy`."""
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
        if (adapter_dir / ADAPTER_CONFIG_NAME).is_file():
            raise AdapterError(f"{adapter_dir}: saved by PEFT (no {METADATA_NAME}); import it with "
                               f"`peftclip import-peft {adapter_dir} --model-name ...` or peftclip.import_peft_adapter")
        raise AdapterError(f"{adapter_dir}: missing {METADATA_NAME}")
    metadata = _read_json(adapter_dir / METADATA_NAME)
    _check_metadata(adapter_dir / METADATA_NAME, metadata)
    spec = None
    if check_strategy:
        from .adapters.strategy import AdapterSpec

        try:
            spec = AdapterSpec.from_dict(metadata["strategy"])
        except (ValueError, TypeError, KeyError) as e:
            raise AdapterError(f"{adapter_dir / METADATA_NAME}: bad strategy ({e})") from e
    config_path = adapter_dir / ADAPTER_CONFIG_NAME
    for method in PEFT_METHODS.keys() & metadata["strategy"].keys():
        if not config_path.is_file():
            raise AdapterError(f"{adapter_dir}: missing {ADAPTER_CONFIG_NAME}")
        peft_config, peft_type = _read_json(config_path), PEFT_METHODS[method][0]
        found = peft_config.get("peft_type") if isinstance(peft_config, dict) else None
        if found != peft_type:
            raise AdapterError(f"{config_path}: not a PEFT {peft_type} config, which strategy {method!r} needs "
                               f"(peft_type {found!r})")
        recorded = metadata.get("adapter_config_sha256")
        if recorded is not None and recorded != file_sha256(config_path):
            raise AdapterError(f"{config_path}: checksum mismatch (the file was edited or damaged)")
    return metadata, spec


def _check_checksum(weights: Path, metadata: dict[str, Any], actual: str) -> None:
    if actual != metadata.get("weights_sha256"):
        raise AdapterError(f"{weights}: checksum mismatch (file is truncated or altered); "
                           f"expected {metadata.get('weights_sha256')}, got {actual}")


def read_metadata(adapter_dir: str | os.PathLike, check_strategy: bool = True) -> dict[str, Any]:
    """Read and check an adapter folder's metadata; refuses pickles, altered files and bad metadata.

    Args:
        adapter_dir: the adapter folder.
        check_strategy: also parse the strategy into its config dataclasses (this imports torch and the
            adapter methods); without it only JSON and checksums are read, which is what `peftclip info` needs.
    """
    adapter_dir = Path(adapter_dir)
    metadata, _ = _check_folder(adapter_dir, check_strategy)
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
    def peft_method(self) -> str | None:
        """The strategy method PEFT applies ("lora", "ia3"), or None."""
        return next((m for m in PEFT_METHODS if getattr(self.spec, m) is not None), None)

    @property
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's tuner weights (LoRA's A and B, IA³'s vectors), named as `peft.get_peft_model_state_dict` does."""
        return {k: v for k, v in self.tensors.items() if is_peft_tensor(k)}

    @property
    def other_tensors(self) -> dict[str, torch.Tensor]:
        """Unfrozen base parameters and added modules (prompts, head), by parameter name."""
        return {k: v for k, v in self.tensors.items() if not is_peft_tensor(k)}


def read_adapter(adapter_dir: str | os.PathLike, base_info: dict[str, Any] | None = None) -> SavedAdapter:
    """Read an adapter folder: every check of `read_metadata`, the weights read once and parsed.

    With `base_info`, also checks that the adapter was trained on that base. `load_adapter`
    and `AdaptedCLIP` both read adapters through this one function.
    """
    from safetensors.torch import load as load_safetensors

    adapter_dir = Path(adapter_dir)
    metadata, spec = _check_folder(adapter_dir)
    weights = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    data = weights.read_bytes()
    _check_checksum(weights, metadata, hashlib.sha256(data).hexdigest())
    if base_info is not None:
        check_base(adapter_dir, metadata["base"], base_info)
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error type for a malformed header
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from e
    return SavedAdapter(adapter_dir, metadata, spec, tensors)


def check_peft_keys(saved: SavedAdapter, expected: set[str]) -> None:
    """Refuse an adapter whose PEFT tensors are not exactly those its config creates (`expected`)."""
    given = set(saved.peft_tensors)
    if given != expected:
        kind = {"lora": "LoRA", "ia3": "IA³"}.get(saved.peft_method, "PEFT")
        raise AdapterError(f"{saved.folder}: {kind} tensors do not match its config (missing "
                           f"{sorted(expected - given)[:3]}, unexpected {sorted(given - expected)[:3]})")


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
    import peft
    import torch

    from .adapters.heads import image_embed_dim
    from .adapters.strategy import apply_strategy

    saved = read_adapter(adapter_dir, base.info)
    spec = saved.spec
    try:
        head_weights = torch.zeros(spec.head.n_classes, image_embed_dim(base.model)) if spec.head else None
        model, _ = apply_strategy(base.model, spec, base.tokenizer, adapter_name, head_weights=head_weights)
        if isinstance(model, peft.PeftModel):
            check_peft_keys(saved, set(peft.get_peft_model_state_dict(model, adapter_name=adapter_name)))
            peft.set_peft_model_state_dict(model, saved.peft_tensors, adapter_name=adapter_name)
        _load_extra_tensors(saved.folder, inner_model(model), saved.other_tensors)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterError(f"{saved.folder}: cannot load onto {base.info.get('model_name')}: {e}") from e
    if not is_trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def _load_extra_tensors(adapter_dir: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved non-PEFT tensors into `model`'s parameters of the same names; they must match exactly."""
    import torch

    expected = {n for n, p in model.named_parameters() if p.requires_grad and not is_peft_tensor(n)}
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
