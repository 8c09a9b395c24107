"""Small helpers shared by the config dataclasses and file writers."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

# torch and safetensors load inside the functions that need them, so `peftclip info` (JSON and hashlib only)
# never imports torch.
if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# Prefixes wrappers put before an open_clip parameter name: PEFT, the feature cache, DDP.
_WRAPPER_PREFIXES = ("base_model.model.", "model.", "module.")


def canonical_name(name: str) -> str:
    """A parameter or module name as in the plain open_clip model, whatever wrapped it.

    Strips PEFT's `base_model.model.` and `.base_layer.` (repeated where two tuners wrap one layer,
    e.g. IA³ around LoRA), the feature cache's `model.` and DDP's `module.`, in any nesting.

    >>> canonical_name("module.model.base_model.model.visual.transformer.resblocks.0.attn.q_proj.base_layer.weight")
    'visual.transformer.resblocks.0.attn.q_proj.weight'
    >>> canonical_name("base_model.model.transformer.resblocks.0.attn.k_proj.base_layer.base_layer.lora_A.weight")
    'transformer.resblocks.0.attn.k_proj.lora_A.weight'
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name.removeprefix(prefix), True
    return re.sub(r"(?:\.base_layer)+\.", ".", name)


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip model inside DDP, PEFT or feature-cache wrappers (or `model` itself)."""
    import torch

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and Python version (unlike hash()).

    >>> stable_seed(0, 1, 2) == stable_seed(0, 1, 2) != stable_seed(0, 2, 1)
    True
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def cache_root() -> Path:
    """Where peftclip keeps generated data, feature caches and search indexes: `$PEFTCLIP_CACHE`
    (default `~/.cache/peftclip`)."""
    return Path(os.environ.get("PEFTCLIP_CACHE", Path.home() / ".cache" / "peftclip"))


class ConfigMixin:
    """JSON round-trip for config dataclasses; `section` names the class in configs and errors."""

    section: ClassVar[str]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return config_from_dict(cls, data, cls.section)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits the type annotation `hint` (the subset config fields use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (int, str):
        return isinstance(value, hint) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    return isinstance(value, hint)


def _yaml_float(value: Any, hint: Any) -> Any:
    """PyYAML reads `1e-3` (no dot) as a string; accept it where a float is expected."""
    if isinstance(value, str) and (hint is float or float in typing.get_args(hint)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_from_dict(cls: type[T], data: dict[str, Any], section: str) -> T:
    """Build dataclass `cls` from `data`, naming the section and any unknown or mistyped field."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown field(s) in [{section}]: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    data = {name: _yaml_float(value, hints[name]) for name, value in data.items()}
    for name, value in data.items():
        if not _matches(value, hints[name]):
            raise ValueError(f"[{section}] {name}={value!r}: expected {_type_name(hints[name])}")
        if not all(math.isfinite(v) for v in _numbers(value)):
            raise ValueError(f"[{section}] {name}={value!r}: numbers must be finite (not nan or inf)")
    return cls(**data)


def _numbers(value: Any) -> list[float]:
    """The floats in a config value, inside lists and dicts too."""
    if isinstance(value, float):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    return []


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_error(path: str | os.PathLike, error: OSError) -> OSError:
    """A one-line OSError naming `path` and why writing it failed (e.g. the disk is full)."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free some space or write elsewhere)"
    failure = OSError(f"cannot write {path}: {reason}")
    failure.errno = error.errno  # kept for callers, out of the one-line message
    return failure


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, default_mode())  # mkstemp creates 0600
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with its I/O failures (a full disk) raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from e


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` to a temporary file beside `path`, then rename it into place; returns `path`.

    A failure leaves nothing behind and is raised as one line naming `path` (see `write_error`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                             metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` to a temporary file beside `path`, then rename it into place; returns `path`."""
    return write_atomic(path, lambda tmp: save_safetensors(tensors, tmp, metadata=metadata))


def fsync_dir(folder: Path) -> None:
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


def replace_dir(new: Path, target: Path) -> None:
    """Move folder `new` to `target`; an existing `target` is swapped out in one atomic step and removed.

    Where renameat2 is missing, the old folder is renamed aside first, so some folder
    (old or new) is at `target` at every moment but one rename.
    """
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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(size: float) -> str:
    """A byte count as B, KB, MB or GB (powers of 1024)."""
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
