"""Fill config dataclasses from a YAML/JSON file and command-line flags that override it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = ["add_config_arguments", "load_config_file", "parse_config"]


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML or JSON config file of `{section: {field: value}}`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected sections of fields, e.g. 'train: {{lr: 0.001}}'")
    return data


def _parse_blocks(text: str) -> str | int | list[int]:
    """'all' | 'N' (last N) | 'i,j,k' (indices)."""
    if text == "all":
        return text
    try:
        if "," in text or text.startswith("["):
            return [int(part) for part in text.strip("[]").split(",") if part.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid blocks {text!r}: use 'all', N, or a comma list of indices")


class _KeyValues(argparse.Action):
    """Collect `key=value` words into a dict of floats."""

    def __call__(self, parser, namespace, values, option_string=None):
        pairs = {}
        for word in values:
            key, sep, value = word.partition("=")
            try:
                pairs[key] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                parser.error(f"{option_string}: expected name=number, got {word!r}")
        setattr(namespace, self.dest, pairs)


def _argument_kwargs(hint: Any, name: str) -> dict[str, Any]:
    """argparse keyword arguments for a field annotated `hint`."""
    if name in ("blocks", "ia3_blocks"):  # LoRA's and IA³'s block selection
        return {"type": _parse_blocks}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        lists = [a for a in args if typing.get_origin(a) is list]
        hint = lists[0] if lists else args[0] if len(args) == 1 else str
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is dict:
        return {"nargs": "+", "action": _KeyValues, "metavar": "NAME=VALUE"}
    if typing.get_origin(hint) is list:
        return {"nargs": "+", "type": typing.get_args(hint)[0]}
    if hint in (int, float, str):
        return {"type": hint}
    return {"type": str}


def add_config_arguments(parser: argparse.ArgumentParser, section: str, cls: type,
                         skip: frozenset[str] = frozenset()) -> None:
    """Add one `--field-name` flag per field of dataclass `cls` (but `skip`), under a group named `section`."""
    group = parser.add_argument_group(section)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # argparse %-formats help strings (%(default)s); field help is plain text, so escape it here, once
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        kwargs = _argument_kwargs(hints[f.name], f.name)
        if "action" not in kwargs:
            kwargs["metavar"] = f.name.upper()
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ())]  # e.g. open_clip's --csv-img-key
        group.add_argument(*flags, dest=f"{section}.{f.name}", default=argparse.SUPPRESS, help=help_text, **kwargs)


def _resolve_paths(values: dict[str, Any], cls: type, folder: Path) -> dict[str, Any]:
    """`values` with each relative path of a field marked `metadata={"path": True}` read from `folder`.

    A config file names its data and weights from where it lives, so it works from any working directory. A
    value is taken as such a path when it exists in `folder` or starts with ./ or ../; anything else (a
    pretrained tag, a Hub id, an absolute path) is kept as given. Output folders are not marked: like flags,
    they stay relative to the working directory.
    """
    resolved = dict(values)
    for f in dataclasses.fields(cls):
        value = values.get(f.name)
        if not f.metadata.get("path") or not isinstance(value, str) or Path(value).is_absolute():
            continue
        if value.startswith(("./", "../")) or (folder / value).exists():
            resolved[f.name] = str(folder / value)
    return resolved


def parse_config(args: argparse.Namespace, sections: dict[str, type],
                 defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build one dataclass per section from built-in `defaults`, `args.config`, then flags.

    Each layer overrides the one before, field by field; unknown sections or fields are errors. Relative
    paths in the config file are read from the file's folder (see `_resolve_paths`).
    """
    merged: dict[str, dict[str, Any]] = {s: dict((defaults or {}).get(s, {})) for s in sections}
    if getattr(args, "config", None):
        for section, values in load_config_file(args.config).items():
            if section not in sections:
                raise ValueError(f"{args.config}: unknown section {section!r}; allowed: {', '.join(sections)}")
            merged[section].update(_resolve_paths(values, sections[section], Path(args.config).parent))
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if name and section in sections:
            merged[section][name] = value
    return {section: cls.from_dict(merged[section]) for section, cls in sections.items()}
