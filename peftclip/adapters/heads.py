"""Classification on CLIP image embeddings: zero-shot weights and a trainable linear head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier
from torch import nn

from ..utils import ConfigMixin, inner_model

__all__ = ["CLASSIFIER_NAME", "ClipClassifier", "HeadConfig", "attach_head", "classifier", "create_head",
           "image_embed_dim", "zero_shot_weights"]

CLASSIFIER_NAME = "peftclip_head"
DEFAULT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "a drawing of a {}.")
HEAD_INITS = ("zeroshot", "random")


@dataclass
class HeadConfig(ConfigMixin):
    """A linear classification head on normalised image embeddings."""

    section: ClassVar[str] = "head"

    n_classes: int = field(default=10, metadata={"help": "Number of classes."})
    init: str = field(default="zeroshot", metadata={"help": f"Initial weights, one of {HEAD_INITS}."})

    def __post_init__(self) -> None:
        if self.n_classes < 2:
            raise ValueError(f"n_classes={self.n_classes}: a classifier needs at least 2 classes")
        if self.init not in HEAD_INITS:
            raise ValueError(f"init={self.init!r}; choose from {HEAD_INITS}")


@torch.no_grad()
def zero_shot_weights(model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """(n_classes, embed_dim) averaged, normalised text embeddings of each class's prompts.

    >>> from peftclip.models import load_base
    >>> base = load_base()
    >>> zero_shot_weights(base.model, base.tokenizer, ["cat", "dog"]).shape
    torch.Size([2, 64])
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    weights = build_zero_shot_classifier(model, tokenizer, list(class_names), list(templates), device=device,
                                         use_tqdm=False)  # (embed_dim, n_classes)
    model.train(was_training)
    return weights.T.contiguous()


class ClipClassifier(nn.Module):
    """Logits of a linear head over the normalised image embeddings, scaled like CLIP's."""

    def __init__(self, weights: torch.Tensor, logit_scale: float = 100.0) -> None:
        super().__init__()
        self.linear = nn.Linear(weights.shape[1], weights.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weights)
            self.linear.bias.zero_()
        self.logit_scale = logit_scale

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.linear(F.normalize(image_features, dim=-1))


class _ClassifierForward(nn.Module):
    """`images -> logits` through a (maybe wrapped) CLIP model whose open_clip model carries a head."""

    def __init__(self, model: nn.Module, head: ClipClassifier) -> None:
        super().__init__()
        self.model = model
        self._head = [head]  # not a submodule: its parameters belong to `model`

    def get_base_model(self) -> nn.Module:
        """The open_clip model inside (so `inner_model` and checkpointing see through this wrapper)."""
        return inner_model(self.model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The wrapped model's forward (not encode_image), so autocast applies inside it.
        return self._head[0](self.model(images, None)[0])


def image_embed_dim(inner: nn.Module) -> int:
    """Width of `inner`'s image embeddings: the tower's `output_dim`, else (timm towers) that of a blank image's."""
    visual = inner.visual
    if hasattr(visual, "output_dim"):
        return visual.output_dim
    param, was_training = next(inner.parameters()), visual.training
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    with torch.no_grad():
        width = visual.eval()(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)).shape[-1]
    visual.train(was_training)
    return width


def create_head(inner: nn.Module, config: HeadConfig, weights: torch.Tensor | None = None) -> ClipClassifier:
    """A head for the open_clip model `inner`, on its device, not yet attached; `weights` start it."""
    if config.init == "zeroshot" and weights is None:
        raise ValueError("init='zeroshot' needs the zero-shot weights (see zero_shot_weights)")
    embed_dim = image_embed_dim(inner)
    if weights is None:
        weights = torch.randn(config.n_classes, embed_dim) * embed_dim ** -0.5
    if tuple(weights.shape) != (config.n_classes, embed_dim):
        raise ValueError(f"head weights have shape {tuple(weights.shape)}, expected ({config.n_classes}, {embed_dim})")
    return ClipClassifier(weights.float()).to(next(inner.parameters()).device)


def attach_head(inner: nn.Module, config: HeadConfig, weights: torch.Tensor | None = None) -> ClipClassifier:
    """Add a trainable head to the open_clip model `inner`; `weights` start it (zero-shot init)."""
    head = create_head(inner, config, weights)
    inner.register_module(CLASSIFIER_NAME, head)
    return head


def classifier(model: nn.Module) -> nn.Module:
    """`images -> logits` for an adapted model that carries a head (see `apply_strategy`)."""
    head = getattr(inner_model(model), CLASSIFIER_NAME, None)
    if head is None:
        raise ValueError("this model has no classification head; enable the head strategy")
    return _ClassifierForward(model, head)
