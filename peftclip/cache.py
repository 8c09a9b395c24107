"""Features of frozen towers, computed once and reused every epoch.

A tower is `live` when anything inside it trains, `trunk` when only its projection trains
(its pre-projection features are cached and the projection is applied each step), and
`full` when it is wholly frozen (its final features are cached). Caching an image tower
is only exact when its training images are not augmented.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .adapters.strategy import inner_model
from .families import TOWERS, projection_name, tower_of
from .utils import write_safetensors_atomic

__all__ = ["CachedCLIP", "CachedLabelled", "CachedPairs", "FeatureCache", "cache_frozen_towers", "cache_image_tower",
           "compute_features", "tower_modes"]

_DISK_MIN_BYTES = 64 << 20  # keep smaller caches in memory only
# Added modules whose parameters change a tower's output (MaPLe's text context, held by its visual prompt, both).
_PROMPTS = {"vision": ("peftclip_visual_prompt", "peftclip_clip_adapter.mlps.vision."),
            "text": ("peftclip_text_prompt", "peftclip_clip_adapter.mlps.text.", "peftclip_visual_prompt.text_ctx")}


def _in_tower(name: str, tower: str) -> bool:
    """Whether parameter `name` of the (unwrapped) CLIP model changes `tower`'s output."""
    if name.startswith("peftclip_"):
        return name.startswith(_PROMPTS[tower])
    return tower_of(name) == tower


def _projection_parameter(model: nn.Module, tower: str) -> str | None:
    """Full name of `tower`'s projection when it is a plain matrix (`x @ proj`); None for a module or none."""
    name = projection_name(model, tower)
    if name is None:
        return None
    try:
        model.get_parameter(name)
    except AttributeError:  # a module (timm's head.proj, an nn.Linear text_projection): the tower stays live
        return None
    return name


def tower_modes(model: nn.Module) -> dict[str, str]:
    """'live', 'trunk' or 'full' for each tower of an adapted open_clip model, of any tower family.

    `trunk` needs a projection that is a plain matrix; a tower whose trainable projection is a
    module (timm's `head.proj`) is `live`.
    """
    clip = inner_model(model)
    trainable = [n for n, p in clip.named_parameters() if p.requires_grad]
    modes = {}
    for tower in TOWERS:
        inside = [n for n in trainable if _in_tower(n, tower)]
        projection = _projection_parameter(clip, tower)
        modes[tower] = "full" if not inside else "trunk" if projection and inside == [projection] else "live"
    return modes


def _projection_slot(model: nn.Module, tower: str) -> tuple[nn.Module, str]:
    """(owner module, attribute) of `tower`'s matrix projection."""
    owner, _, attr = _projection_parameter(model, tower).rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


@contextlib.contextmanager
def _without_projection(model: nn.Module, tower: str) -> Iterator[None]:
    """Temporarily drop a tower's projection so open_clip returns pre-projection features."""
    owner, attr = _projection_slot(model, tower)
    saved = getattr(owner, attr)
    setattr(owner, attr, None)
    try:
        yield
    finally:
        setattr(owner, attr, saved)


class FeatureCache:
    """Tower features keyed by base, tower mode and inputs; in memory, and on disk when large."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._memory: dict[str, torch.Tensor] = {}

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def get(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached tensor for `key`, computing (and storing) it on a miss."""
        if key in self._memory:
            return self._memory[key]
        path = self.directory / f"{key}.safetensors" if self.directory else None
        if path is not None and path.is_file():
            features = load_file(path)["features"]
        else:
            features = compute().contiguous()
            if path is not None and features.numel() * features.element_size() >= _DISK_MIN_BYTES:
                write_safetensors_atomic({"features": features}, path)
        self._memory[key] = features
        return features


@torch.no_grad()
def compute_features(model: nn.Module, tower: str, mode: str, inputs: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Features of every input (image tensors or token ids) through a frozen tower, on the CPU."""
    clip = inner_model(model)
    encode = clip.encode_image if tower == "vision" else clip.encode_text
    context = _without_projection(clip, tower) if mode == "trunk" else contextlib.nullcontext()
    was_training = clip.training
    clip.eval()
    chunks = []
    with context:
        for batch in DataLoader(inputs, batch_size=batch_size):
            chunks.append(encode(batch.to(device)).float().cpu())
    clip.train(was_training)
    return torch.cat(chunks)


class CachedCLIP(nn.Module):
    """A CLIP model whose cached towers take features instead of images or tokens.

    `encode_image`/`encode_text` accept cached features for a `trunk`/`full` tower (applying
    the trainable projection for `trunk`) and raw inputs for a `live` one.
    """

    def __init__(self, model: nn.Module, modes: dict[str, str]) -> None:
        super().__init__()
        self.model, self.modes = model, modes

    def get_base_model(self) -> nn.Module:
        return inner_model(self.model)

    def _encode(self, tower: str, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        clip = inner_model(self.model)
        mode = self.modes[tower]
        if mode == "live":
            encode = self.model.encode_image if tower == "vision" else self.model.encode_text
            features = encode(x)
        elif mode == "trunk":
            owner, attr = _projection_slot(clip, tower)
            features = x @ getattr(owner, attr)
        else:
            features = x
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode("vision", images, normalize)

    def encode_text(self, texts: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode("text", texts, normalize)

    def forward(self, images: torch.Tensor | None,
                texts: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """As open_clip's CLIP forward: normalised features of what is given (None for what is not)."""
        return (self.encode_image(images, normalize=True) if images is not None else None,
                self.encode_text(texts, normalize=True) if texts is not None else None,
                inner_model(self.model).logit_scale.exp())


class CachedPairs(Dataset):
    """`TrainPairs` with cached towers: the same caption sampling, features in place of inputs."""

    def __init__(self, pairs: Dataset, image_features: torch.Tensor | None,
                 text_features: torch.Tensor | None) -> None:
        self.pairs, self.image_features, self.text_features = pairs, image_features, text_features
        counts = torch.tensor([len(c) for c in pairs.captions])
        self.offsets = torch.cumsum(counts, 0) - counts  # first caption of each image in the flat list

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.pairs.caption_index(i)
        image = self.image_features[i] if self.image_features is not None else self.pairs.image(i)
        if self.text_features is not None:
            return image, self.text_features[self.offsets[i] + j]
        return image, self.pairs.tokenizer([self.pairs.captions[i][j]])[0]


class _Images(Dataset):
    def __init__(self, pairs: Dataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.pairs.image(i)


def cache_frozen_towers(model: nn.Module, pairs: Dataset, base_info: dict[str, Any], augment: bool,
                        cache: FeatureCache, device: str | torch.device = "cpu") -> tuple[nn.Module, Dataset]:
    """Swap frozen towers for cached features; returns the model and data to train on.

    Returns (`model`, `pairs`) unchanged when no tower can be cached: both live, or only
    the image tower frozen but its training images augmented.
    """
    modes = tower_modes(model)
    use_images = modes["vision"] != "live" and not augment
    use_texts = modes["text"] != "live"
    if not (use_images or use_texts):
        return model, pairs
    common = {"base": base_info, "names": pairs.names, "seed": pairs.seed}
    image_features = text_features = None
    if use_images:
        key = FeatureCache.key(tower="vision", mode=modes["vision"], transform=repr(pairs.transform), **common)
        image_features = cache.get(key, lambda: compute_features(model, "vision", modes["vision"], _Images(pairs),
                                                                  device=device))
    if use_texts:
        captions = [c for group in pairs.captions for c in group]
        key = FeatureCache.key(tower="text", mode=modes["text"], captions=captions, **common)
        text_features = cache.get(key, lambda: compute_features(
            model, "text", modes["text"], pairs.tokenizer(captions), device=device))
    active = {"vision": modes["vision"] if use_images else "live", "text": modes["text"] if use_texts else "live"}
    return CachedCLIP(model, active), CachedPairs(pairs, image_features, text_features)


class CachedLabelled(Dataset):
    """(cached image features, label) in place of `LabelledImages`' (image, label)."""

    def __init__(self, data: Dataset, image_features: torch.Tensor) -> None:
        self.data, self.image_features = data, image_features

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.image_features[i], self.data.labels[i]


def cache_image_tower(model: nn.Module, data: Dataset, base_info: dict[str, Any], augment: bool,
                      cache: FeatureCache, device: str | torch.device = "cpu") -> tuple[nn.Module, Dataset]:
    """For labelled images: swap a frozen, unaugmented image tower for cached features."""
    mode = tower_modes(model)["vision"]
    if mode == "live" or augment:
        return model, data
    key = FeatureCache.key(tower="vision", mode=mode, transform=repr(data.transform), base=base_info,
                           names=data.names, seed=data.seed)
    features = cache.get(key, lambda: compute_features(model, "vision", mode, _Images(data), device=device))
    return CachedCLIP(model, {"vision": mode, "text": "live"}), CachedLabelled(data, features)
