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
from typing import TYPE_CHECKING, Any

import huggingface_hub

from .io import (
    ADAPTER_CONFIG_NAME,
    METADATA_NAME,
    METRICS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterError,
    load_adapter,
    read_metadata,
)
from .utils import human_size

# open_clip, torch (through peftclip.models) and huggingface_hub's card classes load inside the functions
# that need them, so resolving an adapter folder for `peftclip info` stays quick and torch-free.
if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCardData
    from torch import nn

    from .models import BaseModel, hub_base_model

__all__ = ["PIPELINE_TAGS", "create_model_card", "download_adapter", "hub_base_model", "load_adapter_from_hub",
           "prepare_push_folder", "push_to_hub", "resolve_adapter"]

ADAPTER_FILES = (ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, METADATA_NAME, METRICS_NAME)
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# open_clip's models carry zero-shot-image-classification on the Hub: right for an adapter trained on class
# names. A retrieval adapter is used for its image and text embeddings (search, similarity), which is the
# Hub's feature-extraction task, the one multimodal embedding models such as jinaai/jina-clip-v1 carry.
PIPELINE_TAGS = {"classification": "zero-shot-image-classification", "retrieval": "feature-extraction"}


def __getattr__(name: str) -> Any:
    """`hub_base_model` is defined in peftclip.models (which imports torch) and re-exported here on first use."""
    if name == "hub_base_model":
        from .models import hub_base_model

        return hub_base_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected 'namespace/name'")


def _hub_dataset_id(source: str) -> str | None:
    """`source` when it is a Hub dataset id ('user/name', no file extension, not a local path), else None."""
    if _REPO_ID.match(source) and not Path(source).suffix and not Path(source).exists():
        return source
    return None


def _shown_source(source: str) -> str:
    """A data source as a card shows it: its Hub dataset id, or a local path's last name, never the path."""
    return _hub_dataset_id(source) or Path(source).name


def _base_license(base: dict[str, Any]) -> str | None:
    """The license open_clip's pretrained config records for the base's tag, if it records one."""
    if base.get("pretrained") is None or "weights_sha256" in base or base["model_name"].startswith("hf-hub:"):
        return None
    import open_clip

    return open_clip.get_pretrained_cfg(base["model_name"], base["pretrained"]).get("license")


def _eval_results(task: str, data: dict[str, Any], after: dict[str, Any]) -> list[EvalResult]:
    """The adapted model's metrics as model-index results on its held-out data; none without a data source."""
    from huggingface_hub import EvalResult

    source = data.get("source")
    if not source:
        return []
    return [EvalResult(task_type=task, dataset_type=_shown_source(source), dataset_name=_shown_source(source),
                       dataset_split=data.get("val_split"), metric_type=key, metric_name=key, metric_value=value)
            for key, value in after.items() if isinstance(value, (int, float))]


def _card_data(metadata: dict[str, Any], metrics: dict[str, Any], repo_id: str, license: str) -> ModelCardData:
    """The card's YAML metadata: library, base, task, license, tags, datasets and the metrics' model-index."""
    from huggingface_hub import ModelCardData

    from .models import hub_base_model

    base, training = metadata["base"], metadata.get("training", {})
    hub_id = hub_base_model(base)
    # classification when trained on class names, as `peftclip eval` decides
    task = PIPELINE_TAGS["classification" if "class_names" in training else "retrieval"]
    data = training.get("data", {})
    dataset_id = _hub_dataset_id(data["source"]) if data.get("source") else None
    results = _eval_results(task, data, metrics.get("after", {}))
    tags = ["peftclip", "peft", "open_clip", "clip", base["model_name"], *metadata["strategy"],
            *([f"base_model:adapter:{hub_id}"] if hub_id else [])]
    return ModelCardData(library_name="peftclip", base_model=hub_id, pipeline_tag=task,
                         license=_base_license(base) or license, tags=tags,
                         datasets=[dataset_id] if dataset_id else None,
                         model_name=repo_id if results else None, eval_results=results or None)


def create_model_card(adapter_dir: str | os.PathLike, repo_id: str, license: str = "apache-2.0") -> str:
    """The Hub README.md of an adapter folder: `huggingface_hub` card metadata, then base, strategy, training,
    size, metrics and usage. Local paths appear only by their last name.

    Args:
        adapter_dir: the adapter folder (validated first).
        repo_id: the Hub repo the card is for, shown in the title and usage.
        license: the card's license when open_clip records none for the base.

    >>> print(create_model_card("outputs/lora_retrieval", "me/shapes-lora"))  # doctest: +SKIP
    """
    from huggingface_hub import ModelCard

    from .models import hub_base_model

    adapter_dir = Path(adapter_dir)
    metadata = read_metadata(adapter_dir)
    metrics_file = adapter_dir / METRICS_NAME
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    base, hub_id = metadata["base"], hub_base_model(metadata["base"])
    described = f"**{base['model_name']}**" + (f" with pretrained weights `{base['pretrained']}`"
                                                if base.get("pretrained") else " with random weights")
    lines = [f"# {repo_id}", "", f"A peftclip adapter for the open_clip model {described}.", "",
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
    lines += _metrics_section(metrics)
    lines += _usage_section(repo_id, base)
    card_data = _card_data(metadata, metrics or {}, repo_id, license)
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)))


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
        rows.append(f"| data | `{_shown_source(source)}` |")
    return ["", "## Training", "", "| setting | value |", "|---|---|", *rows] if rows else []


def _metrics_section(metrics: dict[str, Any] | None) -> list[str]:
    if metrics is None:
        return ["## Metrics", "", "No metrics were recorded.", ""]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    rows = [f"| {key} | {before.get(key, float('nan')):.2f} | {value:.2f} |" for key, value in after.items()
            if isinstance(value, (int, float))]
    return ["## Metrics", "", "| metric | base | adapted |", "|---|---:|---:|", *rows, ""]


def _usage_section(repo_id: str, base: dict[str, Any]) -> list[str]:
    pretrained = "'<the weights file>'" if "weights_sha256" in base else repr(base.get("pretrained"))
    return ["## Usage", "", "```python", "from peftclip import AdaptedCLIP, BaseConfig, load_base", "",
            f"base = load_base(BaseConfig(model_name={base['model_name']!r}, pretrained={pretrained}))",
            "clip = AdaptedCLIP(base)",
            f"clip.load_adapter({repo_id!r}, 'adapter')",
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


def _check_can_push(token: str | None) -> str:
    """The token to push with; refuses at once when offline or not logged in, before any work or upload."""
    if huggingface_hub.is_offline_mode():
        raise OSError("offline (HF_HUB_OFFLINE=1): cannot push; unset HF_HUB_OFFLINE to upload")
    token = token or huggingface_hub.get_token()
    if not token:
        raise PermissionError("not logged in: run `hf auth login` (huggingface_hub's CLI) or set HF_TOKEN")
    return token


def push_to_hub(adapter_dir: str | os.PathLike, repo_id: str, *, private: bool = False,
                revision: str | None = None, commit_message: str | None = None, token: str | None = None,
                license: str = "apache-2.0") -> str:
    """Upload an adapter folder with a generated model card; returns the commit URL.

    Args:
        adapter_dir: the adapter folder; only its adapter files and the card are uploaded.
        repo_id: 'namespace/name'; created if absent.
        private: create the repo as private.
        revision: branch to push to (default: main).
        commit_message: the commit's message.
        token: a Hub token; default: `huggingface_hub.get_token()` (HF_TOKEN or `hf auth login`).
        license: the card's license when open_clip records none for the base.

    >>> push_to_hub("outputs/lora_retrieval", "me/shapes-lora")  # doctest: +SKIP
    """
    _check_repo_id(repo_id)
    token = _check_can_push(token)
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
    from huggingface_hub.errors import LocalEntryNotFoundError

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
