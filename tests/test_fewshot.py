"""The few-shot protocol: K images per class with a seed, and classify's --shots / --seeds on CIFAR-10."""

from __future__ import annotations

from collections import Counter

import pytest

from peftclip.data import DataConfig, load_labelled
from peftclip.fewshot import few_shot_indices, select_shots
from peftclip.recipes import classify
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def cifar10_train():
    train, _ = load_labelled(DataConfig(source=str(shared_data("cifar10")), val_split="test", label_column="label",
                                        max_images=2000, max_val_images=10))
    return train


def test_four_shots_of_cifar10_are_forty_images_the_same_for_the_same_seed(cifar10_train):
    first, again, other = (select_shots(cifar10_train, 4, seed) for seed in (1, 1, 2))
    assert len(first.images) == len(first.labels) == len(first.names) == 40
    assert Counter(first.labels) == {label: 4 for label in range(10)}
    assert first.names == again.names and first.labels == again.labels
    assert first.names != other.names
    assert set(first.names) <= set(cifar10_train.names)
    label_of = dict(zip(cifar10_train.names, cifar10_train.labels))
    assert all(label_of[name] == label for name, label in zip(first.names, first.labels))


@pytest.mark.parametrize("labels, shots, class_names, message", [
    ([0, 0, 1], 2, None, "shots=2: class 1 has only 1 training images"),
    ([0, 0, 0], 1, ["cat", "dog"], "shots=1: class 'dog' has only 0 training images"),
    ([0, 1], 0, None, "shots=0: must be at least 1"),
])
def test_too_few_images_of_a_class_are_refused_naming_it(labels, shots, class_names, message):
    with pytest.raises(ValueError, match=message):
        few_shot_indices(labels, shots, seed=0, class_names=class_names)


def test_classify_runs_once_per_seed_on_four_shots_and_reports_mean_and_std(tmp_path, capsys):
    out = tmp_path / "fewshot"
    summary = classify.main(["--source", str(shared_data("cifar10")), "--val-split", "test", "--max-images", "2000",
                             "--max-val-images", "40", "--shots", "4", "--seeds", "1", "2", "--max-steps", "1",
                             "--batch-size", "8", "--num-workers", "0", "--cpu", "--output-dir", str(out)])
    assert sorted(summary["seeds"]) == [1, 2]
    assert all(run["train_images"] == 40 for run in summary["seeds"].values())
    top1 = [run["after"]["top1"] for run in summary["seeds"].values()]
    assert summary["top1_mean"] == pytest.approx(sum(top1) / 2)
    assert summary["top1_std"] == pytest.approx(abs(top1[0] - top1[1]) / 2)
    assert (tmp_path / "fewshot-seed1" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "fewshot-seed2" / "adapter_model.safetensors").is_file()
    assert "top-1 over seeds 1, 2: " in capsys.readouterr().out
