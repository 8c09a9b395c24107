"""Recall@k counted as in CLIP_benchmark, on hand-built similarity layouts."""

from __future__ import annotations

import pytest
import torch

from peftclip.evaluate import retrieval_recall


def test_perfect_alignment_gives_full_recall():
    features = torch.eye(4)
    metrics = retrieval_recall(features, features, [0, 1, 2, 3])
    assert set(metrics.values()) == {100.0}


def test_any_true_caption_counts_for_image_to_text():
    # Image 0 has captions 0 and 1; caption 1 is its nearest text, caption 0 is not.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.3, 1.0], [1.0, 0.0], [0.0, 1.0]])
    metrics = retrieval_recall(images, texts, [0, 0, 1])
    assert metrics["image_to_text_R@1"] == 100.0
    # Caption 0 points at image 1, so text→image R@1 is 2 of 3.
    assert metrics["text_to_image_R@1"] == pytest.approx(200 / 3)


def test_recall_at_k_counts_hits_within_k():
    torch.manual_seed(0)
    images = torch.randn(20, 8)
    texts = images.roll(1, 0)  # every text matches the next image
    metrics = retrieval_recall(images, texts, list(range(20)))
    assert metrics["text_to_image_R@1"] == 0.0
    assert metrics["text_to_image_R@10"] >= metrics["text_to_image_R@5"] >= metrics["text_to_image_R@1"]


def test_classification_accuracy_top1_top5_and_mean_per_class():
    from peftclip.evaluate import classification_accuracy
    logits = torch.zeros(4, 6)
    logits[0, 0] = logits[1, 0] = logits[2, 1] = 1.0  # rows 0-2 predict 0, 0, 1
    logits[3, 5] = 1.0
    labels = [0, 0, 0, 2]  # class 0: 2 of 3 right; class 2: wrong at top-1
    metrics = classification_accuracy(logits, labels)
    assert metrics["top1"] == pytest.approx(50.0)
    assert metrics["mean_per_class"] == pytest.approx((200 / 3 + 0.0) / 2)
    assert metrics["top5"] == pytest.approx(100.0)  # ties put the true class within the top 5
