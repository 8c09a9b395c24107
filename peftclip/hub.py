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
import open_clip
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
from .utils import human_size

__all__ = ["create_model_card", "download_adapter", "hub_base_model", "load_adapter_from_hub", "prepare_push_folder",
           "push_to_hub", "resolve_adapter"]

ADAPTER_FILES = (ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, METADATA_NAME, METRICS_NAME)
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'namespace/name'")


def hub_base_model(base: dict[str, Any]) -> str | None:
    """The Hub repo id of an adapter's base, when open_clip knows one (an `hf-hub:` name or a pretrained tag)."""
    name, tag = base["model_name"], base.get("pretrained")
    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:")
    if tag is None or "weights_sha256" in base:
        return None  # random init or a local weights file: not on the Hub
    return open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "").strip("/") or None


def create_model_card(adapter_dir: str | os.PathLike, repo_id: str, license: str = "apache-2.0") -> str:
    """The Hub README.md of an adapter folder: front matter, base, strategy, training, size, metrics, usage.

    >>> print(create_model_card("outputs/lora_retrieval", "me/shapes-lora"))  # doctest: +SKIP
    """
    adapter_dir = Path(adapter_dir)
    metadata = read_metadata(adapter_dir)
    base, hub_id = metadata["base"], hub_base_model(metadata["base"])
    front = {"library_name": "peftclip", **({"base_model": hub_id} if hub_id else {}),
             "pipeline_tag": "zero-shot-image-classification",
             "tags": ["peftclip", "open_clip", "clip", base["model_name"], *metadata["strategy"]], "license": license}
    described = f"**{base['model_name']}**" + (f" with pretrained weights `{base['pretrained']}`"
                                                if base.get("pretrained") else " with random weights")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo_id}", "",
             f"A peftclip adapter for the open_clip model {described}.", "",
             "## Base model", ""]
    lines += [f"- {key}: `{value}`" for key, value in base.items()]
    lines.append(_where_the_base_is(base, hub_id))
    lines += ["", "## Strategy", "", "| method | setting | value |", "|---|---|---|"]
    for method, settings in metadata["strategy"].items():
        lines += [f"| {method} | {key} | `{value}` |" for key, value in settings.items()]
    lines += _training_section(metadata.get("training", {}))
    size = (adapter_dir / SAFETENSORS_WEIGHTS_NAME).stat().st_size
    lines += ["", f"Trainable parameters: {metadata['trainable_parameters']:,}; adapter file: {human_size(size)} "
              f"({metadata.get('save_dtype', 'fp32')}).", ""]
    lines += _metrics_section(adapter_dir)
    lines += _usage_section(repo_id, base)
    return "\n".join(lines)


def _where_the_base_is(base: dict[str, Any], hub_id: str | None) -> str:
    if hub_id:
        return f"- on the Hub: [{hub_id}](https://huggingface.co/{hub_id})"
    if "weights_sha256" in base:
        return "- a local weights file, not on the Hub: load the same file (the adapter checks its SHA-256)"
    if base.get("pretrained") is None:
        return "- random weights, recreated by `load_base` from `init_seed`"
    return "- open_clip downloads these pretrained weights by their tag"


_TRAINING_KEYS = ("epochs", "max_steps", "batch_size", "lr", "weight_decay", "warmup_steps", "mixed_precision", "seed")


def _training_section(training: dict[str, Any]) -> list[str]:
    settings = training.get("train", {})
    rows = [f"| {key} | `{settings[key]}` |" for key in _TRAINING_KEYS if settings.get(key) is not None]
    source = training.get("data", {}).get("source")
    if source:
        rows.append(f"| data | `{Path(source).name}` |")
    return ["", "## Training", "", "| setting | value |", "|---|---|", *rows] if rows else []


def _metrics_section(adapter_dir: Path) -> list[str]:
    path = adapter_dir / METRICS_NAME
    if not path.is_file():
        return ["## Metrics", "", "No metrics were recorded.", ""]
    metrics = json.loads(path.read_text())
    before, after = metrics.get("before", {}), metrics.get("after", {})
    rows = [f"| {key} | {before.get(key, float('nan')):.2f} | {value:.2f} |" for key, value in after.items()
            if isinstance(value, (int, float))]
    return ["## Metrics", "", "| metric | base | adapted |", "|---|---:|---:|", *rows, ""]


def _usage_section(repo_id: str, base: dict[str, Any]) -> list[str]:
    pretrained = "'<the weights file>'" if "weights_sha256" in base else repr(base.get("pretrained"))
    return ["## Usage", "", "```python", "from peftclip import AdaptedCLIP, BaseConfig, load_base", "",
            f"base = load_base(BaseConfig(model_name={base['model_name']!r}, pretrained={pretrained}))",
            "clip = AdaptedCLIP(base)",
            f"clip.add_adapter('adapter', {repo_id!r})",
            "image_features = clip.encode_images(['photo.jpg'])",
            "probs = clip.classify(['photo.jpg'], ['cat', 'dog'])", "```", "",
            "or from the command line:", "", "```bash", f"peftclip info {repo_id}",
            f"peftclip search {repo_id} --images photos/ --query 'a dog on a beach'", "```", ""]


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
    try:
        return download_adapter(path_or_repo_id, revision=revision, cache_dir=cache_dir)
    except AdapterError as e:
        raise AdapterError(f"no adapter folder {path_or_repo_id} here, and as a Hub repo id: {e}") from e


def load_adapter_from_hub(base: BaseModel, repo_id: str, revision: str | None = None,
                          adapter_name: str = "default", cache_dir: str | os.PathLike | None = None,
                          **kwargs: Any) -> nn.Module:
    """Download (or find in the cache) a Hub adapter and load it onto `base` like `load_adapter`."""
    return load_adapter(base, download_adapter(repo_id, revision, cache_dir), adapter_name, **kwargs)
