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


RANKS = (1, 2, 5, 6, 10, 11)  # where each query's true match sits in its ranking, 1 = best
N_CANDIDATES = 12
# R@k is the share of queries whose true match ranks at k or better, counted by hand from RANKS.
EXPECTED_RECALL = {1: 100 / 6, 2: 200 / 6, 4: 200 / 6, 5: 300 / 6, 6: 400 / 6, 9: 400 / 6, 10: 500 / 6, 11: 100.0}


def _ranked_rows(true_columns: list[int], ranks: tuple[int, ...] = RANKS, n_columns: int = N_CANDIDATES,
                 last_columns: list[int] | None = None) -> torch.Tensor:
    """One row of distinct scores per query, with column true_columns[q] at rank ranks[q] (1 = highest score).

    last_columns[q], if given, ranks last; the other columns fill the remaining ranks in index order. Scores
    fall by 1 per rank, so there are no ties for topk to break.
    """
    rows = torch.zeros(len(ranks), n_columns)
    for query, (rank, true) in enumerate(zip(ranks, true_columns)):
        last = last_columns[query] if last_columns else None
        order = [c for c in range(n_columns) if c not in (true, last)]
        order.insert(rank - 1, true)
        order += [last] if last is not None else []
        rows[query, order] = torch.arange(n_columns, 0, -1, dtype=torch.float)
    return rows


def test_text_to_image_recall_at_k_counts_the_true_image_within_k():
    true_images = [3, 0, 11, 7, 5, 9]
    texts = _ranked_rows(true_images)
    # Images are one-hot, so a text's score for image j is its j-th entry divided by its own norm: same order.
    metrics = retrieval_recall(torch.eye(N_CANDIDATES), texts, true_images, ks=tuple(EXPECTED_RECALL))
    for k, expected in EXPECTED_RECALL.items():
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(expected), k


def test_image_to_text_recall_at_k_counts_the_best_ranked_of_its_captions():
    # Image i owns captions 2i and 2i+1; caption 2i+1 sits at rank RANKS[i], caption 2i always last.
    images = _ranked_rows([2 * i + 1 for i in range(len(RANKS))], last_columns=[2 * i for i in range(len(RANKS))])
    text_to_image = [i // 2 for i in range(N_CANDIDATES)]
    metrics = retrieval_recall(images, torch.eye(N_CANDIDATES), text_to_image, ks=tuple(EXPECTED_RECALL))
    for k, expected in EXPECTED_RECALL.items():
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(expected), k


def test_classification_accuracy_top1_top5_and_mean_per_class():
    from peftclip.evaluate import classification_accuracy
    labels = [0, 0, 0, 1, 2]
    logits = _ranked_rows(labels, ranks=(1, 2, 1, 5, 6), n_columns=8)  # the true class at these ranks
    metrics = classification_accuracy(logits, labels)
    assert metrics["top1"] == pytest.approx(40.0)  # ranks 1 and 1 of 5
    assert metrics["top5"] == pytest.approx(80.0)  # all but the rank-6 row
    assert metrics["mean_per_class"] == pytest.approx((200 / 3 + 0.0 + 0.0) / 3)
