"""Adapters to and from the Hugging Face Hub: a generated model card, push, download, load by repo id.

Only safetensors and JSON files are ever downloaded or uploaded; nothing from a repository
is executed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import huggingface_hub
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from .io import (
    ADAPTER_CONFIG_NAME,
    METADATA_NAME,
    METRICS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterError,
    load_adapter,
    read_metadata,
)
from .models import BaseModel

__all__ = ["create_model_card", "download_adapter", "load_adapter_from_hub", "prepare_push_folder", "push_to_hub",
           "resolve_adapter"]

ADAPTER_FILES = (ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, METADATA_NAME, METRICS_NAME)
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'namespace/name'")


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def create_model_card(adapter_dir: str | os.PathLike, repo_id: str, license: str = "apache-2.0") -> str:
    """The Hub README.md of an adapter folder: front matter, base, strategy, size, metrics, usage.

    >>> print(create_model_card("outputs/lora_retrieval", "me/shapes-lora"))  # doctest: +SKIP
    """
    adapter_dir = Path(adapter_dir)
    metadata = read_metadata(adapter_dir)
    base = metadata["base"]
    base_model = base["model_name"] + (f" ({base['pretrained']})" if base.get("pretrained") else "")
    front = {"library_name": "peftclip", "base_model": f"open_clip/{base['model_name']}",
             "tags": ["peftclip", "open_clip", "clip", *metadata["strategy"]], "license": license}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo_id}", "",
             f"A peftclip adapter for the open_clip model **{base_model}**.", "", "## Base model", ""]
    lines += [f"- {key}: `{value}`" for key, value in base.items()]
    lines += ["", "## Strategy", "", "| method | setting | value |", "|---|---|---|"]
    for method, settings in metadata["strategy"].items():
        lines += [f"| {method} | {key} | `{value}` |" for key, value in settings.items()]
    size = (adapter_dir / SAFETENSORS_WEIGHTS_NAME).stat().st_size
    lines += ["", f"Trainable parameters: {metadata['trainable_parameters']:,}; adapter file: {_human(size)}.", ""]
    lines += _metrics_section(adapter_dir)
    lines += ["## Usage", "", "```python", "from peftclip import BaseConfig, load_base",
              "from peftclip.hub import load_adapter_from_hub", "",
              f"base = load_base(BaseConfig(model_name={base['model_name']!r}, pretrained={base.get('pretrained')!r}))",
              f"model = load_adapter_from_hub(base, {repo_id!r})",
              "features = model.encode_image(images, normalize=True)", "```", ""]
    return "\n".join(lines)


def _metrics_section(adapter_dir: Path) -> list[str]:
    path = adapter_dir / METRICS_NAME
    if not path.is_file():
        return ["## Metrics", "", "No metrics were recorded.", ""]
    metrics = json.loads(path.read_text())
    before, after = metrics.get("before", {}), metrics.get("after", {})
    rows = [f"| {key} | {before.get(key, float('nan')):.2f} | {value:.2f} |" for key, value in after.items()
            if isinstance(value, (int, float))]
    return ["## Metrics", "", "| metric | base | adapted |", "|---|---:|---:|", *rows, ""]


def prepare_push_folder(adapter_dir: str | os.PathLike, dest: str | os.PathLike, repo_id: str,
                        license: str = "apache-2.0") -> Path:
    """Copy exactly what would be pushed (adapter files + model card) into `dest`; the source is untouched."""
    _check_repo_id(repo_id)
    adapter_dir, dest = Path(adapter_dir), Path(dest)
    card = create_model_card(adapter_dir, repo_id, license)  # validates the folder first
    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, dest / name)
    (dest / CARD_NAME).write_text(card)
    return dest


def push_to_hub(adapter_dir: str | os.PathLike, repo_id: str, *, private: bool = False,
                revision: str | None = None, commit_message: str | None = None, token: str | None = None,
                license: str = "apache-2.0") -> str:
    """Upload an adapter folder with a generated model card; returns the commit URL.

    >>> push_to_hub("outputs/lora_retrieval", "me/shapes-lora")  # doctest: +SKIP
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_push_folder(adapter_dir, tmp, repo_id, license)
        api = huggingface_hub.HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=commit_message or "Upload peftclip adapter",
                                   allow_patterns=[*ADAPTER_FILES, CARD_NAME])
    return str(getattr(commit, "commit_url", commit))


def download_adapter(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                     token: str | None = None) -> Path:
    """Fetch an adapter's safetensors and JSON files through the Hugging Face cache; returns the folder."""
    _check_repo_id(repo_id)
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, token=token,
            allow_patterns=[*ADAPTER_FILES, CARD_NAME]))
    except LocalEntryNotFoundError as e:
        raise AdapterError(f"{repo_id}{'@' + revision if revision else ''} is not in the local Hugging Face "
                           f"cache and the Hub cannot be reached (offline)") from e
    except (huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.RevisionNotFoundError) as e:
        raise AdapterError(f"{repo_id}: {str(e).splitlines()[0]}") from e
    if not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise AdapterError(f"{repo_id} has no {SAFETENSORS_WEIGHTS_NAME}; pickle weights are never loaded")
    return folder


def resolve_adapter(path_or_repo_id: str, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """A local adapter folder as is, or a 'namespace/name' Hub repo downloaded to the cache."""
    path = Path(path_or_repo_id)
    if path.exists() or not _REPO_ID.match(path_or_repo_id):
        return path
    return download_adapter(path_or_repo_id, revision=revision, cache_dir=cache_dir)


def load_adapter_from_hub(base: BaseModel, repo_id: str, revision: str | None = None,
                          adapter_name: str = "default", cache_dir: str | os.PathLike | None = None,
                          **kwargs: Any) -> nn.Module:
    """Download (or find in the cache) a Hub adapter and load it onto `base` like `load_adapter`."""
    return load_adapter(base, download_adapter(repo_id, revision, cache_dir), adapter_name, **kwargs)
