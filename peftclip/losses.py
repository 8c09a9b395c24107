"""Contrastive (CLIP InfoNCE) loss whose negatives span every process."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastiveLoss", "LossFn", "contrastive_step", "cross_entropy_step", "gather_features"]

# A training objective: (model, batch) -> scalar loss.
LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]


def gather_features(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `features` from all processes, keeping the autograd graph.

    Returns the gathered tensor and this process's row offset in it. With one
    process (or no process group) it returns `features` unchanged and offset 0.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    # torch.distributed.nn's all_gather sums the incoming gradients of every rank's
    # copy in backward, so each rank's features get the gradient of the global loss.
    gathered = dist_fn.all_gather(features)
    return torch.cat(gathered, dim=0), dist.get_rank() * features.shape[0]


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the global batch, computed for this process's rows.

    Each process scores its own images against all gathered texts and its own texts
    against all gathered images (open_clip's `local_loss`). The mean of the
    per-process losses is the single-process loss on the whole batch, and with
    data-parallel gradient averaging the gradients match too. Local batches must
    be of equal size on every process.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        all_images, offset = gather_features(image_features)
        all_texts, _ = gather_features(text_features)
        scale = logit_scale.float()
        logits_per_image = scale * image_features @ all_texts.T  # (B_local, B_global)
        logits_per_text = scale * text_features @ all_images.T  # (B_local, B_global)
        labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


_CONTRASTIVE = ContrastiveLoss()


def contrastive_step(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Symmetric InfoNCE for a batch of (images, texts) through a CLIP-style `model(images, texts)`."""
    images, texts = batch[0], batch[1]
    image_features, text_features, logit_scale = model(images, texts)
    return _CONTRASTIVE(image_features, text_features, logit_scale)


def cross_entropy_step(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy for a batch of (images, labels) through a classifier `model(images) -> logits`."""
    images, labels = batch[0], batch[1]
    return F.cross_entropy(model(images).float(), labels)
