"""The objective each model was trained with: open_clip's `ClipLoss` or `SigLipLoss`, across processes.

CLIP models learn with the softmax (InfoNCE) loss, SigLIP models (those with a
`logit_bias`) with the sigmoid loss; fine-tuning with the other one fights the
pretrained `logit_scale`/`logit_bias`. Both come from `open_clip.loss`, set up for
the current `torch.distributed` process group, so negatives span every process.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

__all__ = ["ContrastiveLoss", "LossFn", "clamp_logit_scale", "contrastive_step", "cross_entropy_step", "loss_for"]

# A training objective: (model, batch) -> scalar loss.
LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]

# open_clip_train clamps the learned temperature after every step so logits stay below 100x cosine.
MAX_LOGIT_SCALE = math.log(100)


def _clip_model(model: nn.Module) -> nn.Module:
    """The open_clip model inside DDP (`.module`), PEFT or feature-cache wrappers (`get_base_model()`)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _create_loss(sigmoid: bool) -> nn.Module:
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    if sigmoid:
        return SigLipLoss(rank=rank, world_size=world_size)
    # Each process scores its own rows against the gathered batch; gathering with grad sums every
    # process's gradient of its copy, so with data-parallel averaging the gradients are the global loss's.
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)


def loss_for(model: nn.Module) -> nn.Module:
    """open_clip's loss `model` was trained with, for the current process group.

    `SigLipLoss` when the (unwrapped) model has a `logit_bias`, else `ClipLoss`; either is
    called as `loss(image_features, text_features, logit_scale[, logit_bias])`.

    >>> from peftclip.models import load_base
    >>> type(loss_for(load_base().model)).__name__
    'ClipLoss'
    """
    return _create_loss(getattr(_clip_model(model), "logit_bias", None) is not None)


class ContrastiveLoss(nn.Module):
    """open_clip's loss on float32, L2-normalised features: sigmoid when `logit_bias` is given, else softmax.

    With several processes each computes the loss of its own rows against the whole batch;
    the mean over processes is the single-process loss on the whole batch, and with
    data-parallel gradient averaging the gradients match too. Local batches must be of
    equal size on every process.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        if logit_bias is None:
            return _create_loss(sigmoid=False)(image_features, text_features, logit_scale.float())
        return _create_loss(sigmoid=True)(image_features, text_features, logit_scale.float(), logit_bias.float())


_CONTRASTIVE = ContrastiveLoss()


def _unpack(outputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(image_features, text_features, logit_scale, logit_bias or None) from a CLIP forward's tuple or dict."""
    if isinstance(outputs, dict):
        return (outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                outputs.get("logit_bias"))
    if len(outputs) not in (3, 4):
        raise ValueError(f"a CLIP forward returns 3 or 4 outputs (features, logit_scale[, logit_bias]), "
                         f"got {len(outputs)}")
    return tuple(outputs) + (None,) * (4 - len(outputs))


def contrastive_step(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The loss `model` was trained with, on a batch of (images, texts) through `model(images, texts)`.

    Calls the (maybe prepared, DDP- or PEFT-wrapped) model's forward, so autocast and DDP
    apply. A model with a `logit_bias` gets the sigmoid loss even when its wrapper's
    forward does not return the bias (e.g. cached towers).
    """
    images, texts = batch[0], batch[1]
    image_features, text_features, logit_scale, logit_bias = _unpack(model(images, texts))
    if logit_bias is None:
        logit_bias = getattr(_clip_model(model), "logit_bias", None)
    return _CONTRASTIVE(image_features, text_features, logit_scale, logit_bias)


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Clamp a trainable `logit_scale` to [0, ln 100] in place, as open_clip_train does after each step.

    Call after `optimizer.step()`. Does nothing when `logit_scale` is frozen or absent.
    """
    logit_scale = getattr(_clip_model(model), "logit_scale", None)
    if isinstance(logit_scale, nn.Parameter) and logit_scale.requires_grad:
        logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def cross_entropy_step(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy for a batch of (images, labels) through a classifier `model(images) -> logits`."""
    images, labels = batch[0], batch[1]
    return F.cross_entropy(model(images).float(), labels)
