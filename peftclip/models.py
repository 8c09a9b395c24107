"""Load an open_clip model as a frozen base and describe it for adapter metadata."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import huggingface_hub
import open_clip
import torch
from open_clip.constants import HF_WEIGHTS_NAME
from open_clip.pretrained import _get_safe_alternatives
from safetensors import SafetensorError, safe_open
from torch import nn

from . import timm_trunks  # noqa: F401  (registers the tiny timm trunks the tiny configs name)
from .utils import ConfigMixin, file_sha256

__all__ = ["BaseConfig", "BaseModel", "TINY_MODEL", "describe_base", "freeze", "hub_base_model", "load_base"]

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODEL = "peftclip-tiny"

open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class BaseConfig(ConfigMixin):
    """Which open_clip model to load as the frozen base."""

    section: ClassVar[str] = "base"

    model_name: str = field(
        default=TINY_MODEL,
        metadata={"help": "open_clip architecture name (e.g. ViT-B-32), or a model config JSON file.", "path": True},
    )
    pretrained: str | None = field(
        default=None,
        metadata={"help": "open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local weights file; "
                  "None gives random weights seeded by `init_seed`.", "path": True},
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of the random weights when `pretrained` is None."})

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")



@dataclass
class BaseModel:
    """A loaded base: the open_clip model, its transforms and tokenizer, and where it came from."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    info: dict[str, Any]


def _resolve_model_name(model_name: str) -> str:
    """Return an open_clip name, registering `model_name` first when it is a config JSON file."""
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return model_name
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model_name!r}; see open_clip.list_models() "
            f"or pass a model config .json file"
        )
    return model_name


_WEIGHTS_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}


def _check_pretrained(model_name: str, pretrained: str | None) -> None:
    """Refuse unknown tags and files that are not weights; fail fast on uncached weights when offline."""
    if pretrained is None or model_name.startswith(("hf-hub:", "local-dir:")):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags:
        _check_pretrained_download(model_name, pretrained)
        return
    path = Path(pretrained)
    if path.is_file():
        _check_weights_file(path)
        return
    if os.sep in pretrained or path.suffix in _WEIGHTS_SUFFIXES:
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
    raise ValueError(
        f"pretrained tag {pretrained!r} does not exist for {model_name}; known tags: {', '.join(tags) or 'none'}"
    )


def _check_weights_file(path: Path) -> None:
    """Refuse a file open_clip cannot read as weights: safetensors, or torch's zip or pickle checkpoints."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt"):  # reads the header only
                return
        with open(path, "rb") as f:
            first = f.read(1)
    except SafetensorError as e:
        raise ValueError(f"not a weights file: {path} ({e})") from e
    except OSError as e:
        raise OSError(f"cannot read pretrained weights file {path}: {e.strerror}") from e
    if first != pickle.PROTO and not zipfile.is_zipfile(path):
        raise ValueError(f"not a weights file: {path} (neither safetensors nor a torch checkpoint)")


def _pretrained_hub_file(model_name: str, tag: str) -> tuple[str, str] | None:
    """(repo id, file name) open_clip downloads a pretrained tag from, or None when it has no Hub entry."""
    hf_hub = open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "")
    if not hf_hub:
        return None
    repo_id, filename = os.path.split(hf_hub)  # 'org/name/' (open_clip's default file) or 'org/name/file.bin'
    return repo_id, filename or HF_WEIGHTS_NAME


def _check_pretrained_download(model_name: str, tag: str) -> None:
    """Before open_clip builds the model: fail at once offline without the weights, else say what is fetched."""
    hub_file = _pretrained_hub_file(model_name, tag)
    if hub_file is None:
        return
    repo_id, filename = hub_file
    # open_clip tries the safetensors alternatives of the file first, then the file itself
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo_id, name), str)
           for name in (*_get_safe_alternatives(filename), filename)):
        return
    if huggingface_hub.is_offline_mode():
        raise OSError(f"pretrained weights for {model_name}/{tag} are not in the Hugging Face cache and "
                      f"HF_HUB_OFFLINE is set: fetch them once online, or pass a local weights file")
    print(f"fetching pretrained weights for {model_name}/{tag} from the Hugging Face Hub ({repo_id})",
          file=sys.stderr)


def hub_base_model(base: dict[str, Any]) -> str | None:
    """The Hub repo id of an adapter's base, when open_clip knows one (an `hf-hub:` name or a pretrained tag).

    >>> hub_base_model({"model_name": "ViT-B-32", "pretrained": "openai"})
    'timm/vit_base_patch32_clip_224.openai'
    """
    name, tag = base["model_name"], base.get("pretrained")
    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:")
    if tag is None or "weights_sha256" in base:
        return None  # random init or a local weights file: not on the Hub
    hub_file = _pretrained_hub_file(name, tag)
    return hub_file[0] if hub_file else None


def describe_base(config: BaseConfig) -> dict[str, Any]:
    """Identify a base for adapter metadata: model name plus pretrained tag, weights-file hash or seed."""
    info: dict[str, Any] = {"model_name": Path(config.model_name).stem if config.model_name.endswith(".json")
                            else config.model_name}
    if config.pretrained is None:
        info["pretrained"] = None
        info["init_seed"] = config.init_seed
    elif Path(config.pretrained).is_file():
        info["pretrained"] = Path(config.pretrained).name
        info["weights_sha256"] = file_sha256(config.pretrained)
    else:
        info["pretrained"] = config.pretrained
    return info


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's 'No pretrained weights loaded ... initialized randomly': asked for, so not a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(pretrained: str | None):
    """While creating a model with `pretrained=None`, filter that one record from the root logger open_clip uses."""
    if pretrained is not None:
        yield
        return
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def freeze(model: nn.Module) -> nn.Module:
    """Set requires_grad=False on every parameter of `model` and return it."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _get_tokenizer(name: str) -> Callable:
    """open_clip's tokenizer for `name`, naming the Hugging Face tokenizer when it cannot be loaded.

    Models with `text_cfg.hf_tokenizer_name` (SigLIP, HF text towers) load their tokenizer
    with `transformers.AutoTokenizer`: from the Hub, from the Hugging Face cache when
    HF_HUB_OFFLINE=1, or from a local folder. To use a local tokenizer, copy the model's
    config JSON, set `text_cfg.hf_tokenizer_name` (and `hf_model_name` for an HF text tower)
    to a folder holding `tokenizer.json`/`tokenizer_config.json` (and `config.json`), and
    pass that JSON file as `model_name`.
    """
    try:
        return open_clip.get_tokenizer(name)
    except OSError as e:
        config = open_clip.get_model_config(name) if name in open_clip.list_models() else None
        hf_name = ((config or {}).get("text_cfg") or {}).get("hf_tokenizer_name", name)
        raise OSError(f"could not load tokenizer {hf_name!r} of {name} ({str(e).splitlines()[0]}); offline it must be "
                      f"in the Hugging Face cache, or set text_cfg.hf_tokenizer_name to a local folder") from e


def load_base(config: BaseConfig | None = None, device: str | torch.device = "cpu") -> BaseModel:
    """Load an open_clip model with its transforms and tokenizer, frozen.

    Args:
        config: which architecture and weights; defaults to the tiny CPU model with random weights.
        device: where to put the model.

    >>> base = load_base(BaseConfig(model_name="peftclip-tiny"))
    >>> base.model.encode_image(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 64])
    """
    config = config or BaseConfig()
    name = _resolve_model_name(config.model_name)
    _check_pretrained(name, config.pretrained)
    if config.pretrained is None:
        torch.manual_seed(config.init_seed)
    try:
        with _quiet_random_init(config.pretrained):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=config.pretrained, device=device,
                # random weights means the HF text tower's too, not its Hub checkpoint
                pretrained_text=config.pretrained is not None,
            )
    except (OSError, RuntimeError) as e:
        raise RuntimeError(f"could not load {name} with pretrained={config.pretrained!r}: {e}") from e
    model.eval()
    return BaseModel(
        model=freeze(model),
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=_get_tokenizer(name),
        info=describe_base(config),
    )
