"""Tip-Adapter (Zhang et al., 2022): a training-free cache model of the few-shot features, and Tip-Adapter-F.

The cache holds the L2-normalised image features of the K-shot training set as keys and their
one-hot labels as values. A test feature f gets

    logits = zero_shot + α · exp(−β · (1 − f·Kᵀ)) · V

so α weighs the cache against CLIP's zero-shot classifier and β sharpens the affinities. Building
the cache takes no gradient step; α and β are searched on a held-out split
(`search_alpha_beta`). Tip-Adapter-F fine-tunes the keys (`finetune_keys`) on the same cached
features, as the paper does. The adapter is two named tensors plus α and β, saved as one small
safetensors file (`save_tip_adapter` / `load_tip_adapter`), or, as the `tip_adapter` registry method,
attached to the model as `peftclip_tip_adapter` and saved in its adapter folder like any added module.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..utils import ConfigMixin, inner_model, write_safetensors_atomic

__all__ = ["TIP_ADAPTER_NAME", "TipAdapter", "TipAdapterClassifier", "TipAdapterConfig", "attach_tip_adapter",
           "create_tip_adapter", "finetune_keys", "load_tip_adapter", "save_tip_adapter", "search_alpha_beta",
           "set_tip_adapter"]

TIP_ADAPTER_NAME = "peftclip_tip_adapter"  # its attribute on a model, so its tensors' names start with it


@dataclass
class TipAdapterConfig(ConfigMixin):
    """The cache model's blend; the defaults are the paper's (α = 1, β = 5.5)."""

    section: ClassVar[str] = "tip_adapter"

    alpha: float = field(default=1.0, metadata={"help": "Weight of the cache logits against the zero-shot ones."})
    beta: float = field(default=5.5, metadata={"help": "Sharpness of the affinities exp(-beta (1 - f K^T))."})
    fine_tune: bool = field(default=False, metadata={
        "help": "Tip-Adapter-F: train the cache keys (the values stay the one-hot labels)."})
    search: bool = field(default=False, metadata={
        "help": "Pick alpha and beta on a grid by the accuracy on held-out training images (as many shots "
                "again per class, none in the cache), as the paper does."})
    n_classes: int = field(default=0, metadata={"help": "Classes the cache's values span (set from the data)."})
    cache_size: int = field(default=0, metadata={"help": "Images in the cache (set from the data)."})

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha}: must be non-negative")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta}: must be non-negative")
        for name in ("n_classes", "cache_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be non-negative")


class TipAdapter(nn.Module):
    """The cache model: keys (N, D) of normalised few-shot features, values (N, C) of one-hot labels.

    Both are parameters, so an adapter folder saves and loads them by name as any added module's.
    Gradients reach the keys only with `fine_tune` (Tip-Adapter-F) and never the values, which
    are the labels: an optimizer holding them leaves them as they are.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, config: TipAdapterConfig) -> None:
        super().__init__()
        if keys.ndim != 2 or values.ndim != 2 or len(keys) != len(values):
            raise ValueError(f"cache keys {tuple(keys.shape)} and values {tuple(values.shape)} must be (N, D), (N, C)")
        self.cache_keys = nn.Parameter(keys.clone())
        self.cache_values = nn.Parameter(values.clone())
        self.alpha, self.beta, self.fine_tune = config.alpha, config.beta, config.fine_tune

    def cache_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C) exp(−β(1 − f·Kᵀ))·V for (B, D) image features (normalised here)."""
        keys = self.cache_keys if self.fine_tune else self.cache_keys.detach()
        affinity = F.normalize(image_features, dim=-1) @ keys.T  # (B, N)
        return torch.exp(-self.beta * (1 - affinity)) @ self.cache_values.detach()

    def forward(self, image_features: torch.Tensor, zero_shot_logits: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits (B, C) plus α times the cache logits."""
        if self.alpha == 0:
            return zero_shot_logits
        return zero_shot_logits + self.alpha * self.cache_logits(image_features)


def set_tip_adapter(model: nn.Module, adapter: TipAdapter | None) -> None:
    """Make `adapter` the model's Tip-Adapter (None: none), as `AdaptedCLIP` switches adapters."""
    model.register_module(TIP_ADAPTER_NAME, adapter)


def attach_tip_adapter(model: nn.Module, config: TipAdapterConfig) -> TipAdapter:
    """An empty cache of `config`'s size on `model`.

    The classify recipe fills it from the few-shot features (`create_tip_adapter`) without a step,
    and trains only its keys for Tip-Adapter-F; loading an adapter folder fills it from the file.
    """
    from .heads import image_embed_dim

    device = next(model.parameters()).device
    adapter = TipAdapter(torch.zeros(config.cache_size, image_embed_dim(model)),
                         torch.zeros(config.cache_size, config.n_classes), config).to(device)
    set_tip_adapter(model, adapter)
    return adapter


def create_tip_adapter(features: torch.Tensor, labels: Sequence[int] | torch.Tensor, n_classes: int,
                       config: TipAdapterConfig | None = None) -> TipAdapter:
    """The cache of `features` (N, D) (the model's image embeddings of the K-shot set) and their labels.

    >>> adapter = create_tip_adapter(torch.randn(4, 8), [0, 1, 1, 0], n_classes=2)
    >>> adapter.cache_keys.shape, adapter.cache_values.shape
    (torch.Size([4, 8]), torch.Size([4, 2]))
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} cache features but {len(labels)} labels")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes:
        raise ValueError(f"cache labels span {int(labels.min())}..{int(labels.max())}, outside 0..{n_classes - 1}")
    keys = F.normalize(features.detach().float(), dim=-1)
    values = F.one_hot(labels, n_classes).to(keys.dtype)
    return TipAdapter(keys, values, config or TipAdapterConfig())


@torch.no_grad()
def search_alpha_beta(adapter: TipAdapter, features: torch.Tensor, zero_shot_logits: torch.Tensor,
                      labels: Sequence[int] | torch.Tensor, alphas: Sequence[float] = (0.5, 1, 2, 3, 5, 7),
                      betas: Sequence[float] = (1, 2, 3.5, 5.5, 7, 10)) -> tuple[float, float, float]:
    """Set the (α, β) of the grid with the best held-out top-1 on `adapter`; returns (α, β, accuracy).

    The grid is the paper's kind of search (its ranges, coarser); ties keep the first pair.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    best = (adapter.alpha, adapter.beta, -1.0)
    for alpha, beta in itertools.product(alphas, betas):
        adapter.alpha, adapter.beta = float(alpha), float(beta)
        accuracy = (adapter(features, zero_shot_logits).argmax(-1) == labels).float().mean().item()
        if accuracy > best[2]:
            best = (float(alpha), float(beta), accuracy)
    adapter.alpha, adapter.beta = best[0], best[1]
    return best


def finetune_keys(adapter: TipAdapter, features: torch.Tensor, zero_shot_logits: torch.Tensor,
                  labels: Sequence[int] | torch.Tensor, steps: int = 20, lr: float = 1e-3) -> list[float]:
    """Tip-Adapter-F: train the cache keys with cross-entropy on cached few-shot features; returns the losses.

    As in the paper the keys start from the features and are trained with AdamW on a cosine
    schedule; the values stay fixed.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    adapter.fine_tune = True
    optimizer = torch.optim.AdamW([adapter.cache_keys], lr=lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(adapter(features, zero_shot_logits), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def save_tip_adapter(adapter: TipAdapter, path: str | os.PathLike) -> Path:
    """Write the cache's tensors by name (`cache_keys`, `cache_values`) and α, β to one safetensors file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    return write_safetensors_atomic(tensors, path, metadata={"alpha": repr(adapter.alpha), "beta": repr(adapter.beta)})


def load_tip_adapter(path: str | os.PathLike) -> TipAdapter:
    """The adapter `save_tip_adapter` wrote to `path`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError) as e:
        raise OSError(f"{path}: cannot read a Tip-Adapter file: {e}") from e
    missing = sorted({"cache_keys", "cache_values"} - set(tensors)) + sorted({"alpha", "beta"} - set(metadata))
    if missing:
        raise ValueError(f"{path}: not a Tip-Adapter file (missing {missing})")
    config = TipAdapterConfig(alpha=float(metadata["alpha"]), beta=float(metadata["beta"]))
    return TipAdapter(tensors["cache_keys"], tensors["cache_values"], config).requires_grad_(False)


class TipAdapterClassifier(nn.Module):
    """`images -> zero-shot + α · cache logits` through `model`'s Tip-Adapter, as a module (DDP wraps its forward).

    `model` may be the feature cache's wrapper, whose `encode_image` takes cached image features.

    Args:
        model: the model holding an attached `TipAdapter` (`peftclip_tip_adapter`).
        zero_shot_weights: (C, D) normalised class embeddings of the zero-shot classifier.
    """

    def __init__(self, model: nn.Module, zero_shot_weights: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(getattr(inner_model(model), TIP_ADAPTER_NAME, None), TipAdapter):
            raise ValueError("this model has no Tip-Adapter; enable the tip_adapter strategy")
        self.model = model
        self.register_buffer("zero_shot_weights", zero_shot_weights, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inner = inner_model(self.model)
        features = self.model.encode_image(images, normalize=True)
        zero_shot = inner.logit_scale.exp() * features @ self.zero_shot_weights.T
        return getattr(inner, TIP_ADAPTER_NAME)(features, zero_shot)
