"""Small helpers shared by the config dataclasses and file writers."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


class ConfigMixin:
    """JSON round-trip for config dataclasses; `section` names the class in configs and errors."""

    section: ClassVar[str]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return config_from_dict(cls, data, cls.section)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(cls: type[T], data: dict[str, Any], section: str) -> T:
    """Build dataclass `cls` from `data`, naming the section and any unknown field."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown field(s) in [{section}]: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return cls(**data)


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


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
