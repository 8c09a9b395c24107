"""The few-shot protocol of CoOp, Tip-Adapter and CLIP-LoRA: K training images per class, drawn with a seed."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .data import LabelledSet

__all__ = ["few_shot_indices", "select_shots"]


def few_shot_indices(labels: Sequence[int], shots: int, seed: int,
                     class_names: Sequence[str] | None = None) -> list[int]:
    """Indices of `shots` items of every class, drawn with `seed` (the same ones for the same seed), in order.

    A class with fewer than `shots` items (or none) is refused, naming it: the protocol needs K of each.

    >>> few_shot_indices([0, 0, 0, 1, 1, 1], shots=2, seed=0)
    [1, 2, 3, 4]
    """
    if shots < 1:
        raise ValueError(f"shots={shots}: must be at least 1")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    classes = range(len(class_names)) if class_names is not None else sorted(by_class)
    rng = random.Random(seed)
    chosen = []
    for label in classes:
        if len(by_class[label]) < shots:
            name = class_names[label] if class_names is not None else label
            raise ValueError(f"shots={shots}: class {name!r} has only {len(by_class[label])} training images")
        chosen += rng.sample(by_class[label], shots)
    return sorted(chosen)


def select_shots(data: LabelledSet, shots: int, seed: int) -> LabelledSet:
    """`data` cut to `shots` images per class, drawn with `seed` (see `few_shot_indices`)."""
    indices = few_shot_indices(data.labels, shots, seed, data.class_names)
    return replace(data, images=[data.images[i] for i in indices], labels=[data.labels[i] for i in indices],
                   names=[data.names[i] for i in indices])
