"""Retrieval metrics for image–caption sets, counted as in CLIP_benchmark."""

from __future__ import annotations

import torch

__all__ = ["RECALL_KS", "classification_accuracy", "retrieval_recall"]

RECALL_KS = (1, 5, 10)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor,
                     text_to_image: torch.Tensor | list[int], ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways, in percent.

    Image→text counts a hit when any of the image's captions is among its top k texts;
    text→image counts a hit when the caption's own image is among its top k images.

    Args:
        image_features: (N_images, D) embeddings.
        text_features: (N_texts, D) embeddings.
        text_to_image: for each text, the index of its image.
        ks: cut-offs.

    >>> retrieval_recall(torch.eye(2), torch.eye(2), [0, 1])["image_to_text_R@1"]
    100.0
    """
    text_to_image = torch.as_tensor(text_to_image, device=image_features.device)
    image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
    scores = text_features @ image_features.T  # (N_texts, N_images)
    positives = text_to_image[:, None] == torch.arange(image_features.shape[0], device=scores.device)[None, :]
    metrics = {}
    for k in ks:
        k_img = min(k, scores.shape[1])
        top_images = scores.topk(k_img, dim=1).indices  # (N_texts, k)
        t2i = positives.gather(1, top_images).any(dim=1).float().mean().item()
        k_txt = min(k, scores.shape[0])
        top_texts = scores.T.topk(k_txt, dim=1).indices  # (N_images, k)
        i2t = positives.T.gather(1, top_texts).any(dim=1).float().mean().item()
        metrics[f"image_to_text_R@{k}"] = 100.0 * i2t
        metrics[f"text_to_image_R@{k}"] = 100.0 * t2i
    return metrics


def classification_accuracy(logits: torch.Tensor, labels: torch.Tensor | list[int],
                            n_classes: int | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean per-class accuracy, in percent.

    Mean per-class accuracy averages the top-1 accuracy of each class present in `labels`.

    >>> classification_accuracy(torch.eye(3), [0, 1, 2])["top1"]
    100.0
    """
    labels = torch.as_tensor(labels, device=logits.device)
    n_classes = n_classes or logits.shape[1]
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct1 = top[:, 0] == labels
    per_class = [correct1[labels == c].float().mean() for c in range(n_classes) if (labels == c).any()]
    return {"top1": 100.0 * correct1.float().mean().item(),
            "top5": 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item(),
            "mean_per_class": 100.0 * torch.stack(per_class).mean().item()}
