"""Tip-Adapter: a training-free cache blended with zero-shot logits; Tip-Adapter-F trains only its keys."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from peftclip.adapters.heads import zero_shot_weights
from peftclip.adapters.tip_adapter import (
    TipAdapterConfig,
    create_tip_adapter,
    finetune_keys,
    load_tip_adapter,
    save_tip_adapter,
    search_alpha_beta,
)
from peftclip.fewshot import few_shot_indices
from peftclip.models import load_base
from tests.conftest import shared_data

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(base, paths, rows):
    table = pa.concat_tables([pq.read_table(p) for p in paths]).take(list(rows)).to_pydict()
    images = [Image.open(io.BytesIO(item["bytes"])).convert("RGB") for item in table["image"]]
    return torch.stack([base.preprocess_val(im) for im in images]), table["label"]


@pytest.fixture(scope="module")
def cifar():
    """Tiny-base features and zero-shot logits of 16 shots per class and 100 held-out CIFAR-10 images."""
    base = load_base()
    base.model.eval()
    train = [shared_data("cifar10", f"train-0000{i}-of-00002.parquet") for i in range(2)]
    labels = [x for p in train for x in pq.read_table(p, columns=["label"]).column("label").to_pylist()]
    shots, shot_labels = _images(base, train, few_shot_indices(labels, shots=16, seed=1, class_names=CLASSES))
    test = [shared_data("cifar10", "test-00000-of-00001.parquet")]
    held, held_labels = _images(base, test, range(0, 5000, 50))  # every 50th: the file is sorted by label
    with torch.no_grad():
        weights = zero_shot_weights(base.model, base.tokenizer, CLASSES)
        features = {k: base.model.encode_image(v, normalize=True) for k, v in (("shots", shots), ("held", held))}
    scale = base.model.logit_scale.exp().item()
    return dict(base=base, shots=features["shots"], shot_labels=shot_labels, held=features["held"],
                held_labels=held_labels, zero_shot=scale * features["held"] @ weights.T)


def test_cache_is_built_without_an_optimizer_step(cifar, optimizer_steps):
    adapter = create_tip_adapter(cifar["shots"], cifar["shot_labels"], len(CLASSES))  # paper's α=1, β=5.5
    logits = adapter(cifar["held"], cifar["zero_shot"])
    assert optimizer_steps == []
    assert adapter.cache_keys.shape == (160, cifar["shots"].shape[1]) and adapter.cache_values.sum(0).eq(16).all()
    assert not torch.equal(logits, cifar["zero_shot"])
    assert not logits.requires_grad, "a gradient would reach the training-free cache"


@pytest.mark.parametrize("alpha,beta", [(0.0, 5.5), (1.0, 1e4)])
def test_no_cache_weight_or_infinite_sharpness_is_exactly_zero_shot(cifar, alpha, beta):
    adapter = create_tip_adapter(cifar["shots"], cifar["shot_labels"], len(CLASSES), TipAdapterConfig(alpha, beta))
    assert torch.equal(adapter(cifar["held"], cifar["zero_shot"]), cifar["zero_shot"])


def test_flat_affinities_shift_every_class_alike(cifar):
    """β = 0: every cache entry weighs 1, so K shots add α·K to every class and zero-shot's ranking stays."""
    adapter = create_tip_adapter(cifar["shots"], cifar["shot_labels"], len(CLASSES), TipAdapterConfig(2.0, 0.0))
    assert torch.allclose(adapter(cifar["held"], cifar["zero_shot"]), cifar["zero_shot"] + 2.0 * 16)


def test_search_sets_the_best_held_out_pair(cifar):
    adapter = create_tip_adapter(cifar["shots"], cifar["shot_labels"], len(CLASSES))
    alpha, beta, accuracy = search_alpha_beta(adapter, cifar["held"], cifar["zero_shot"], cifar["held_labels"])
    assert (adapter.alpha, adapter.beta) == (alpha, beta)
    predicted = adapter(cifar["held"], cifar["zero_shot"]).argmax(-1)
    assert accuracy == (predicted == torch.tensor(cifar["held_labels"])).float().mean().item()


def test_finetuning_changes_only_the_keys(cifar, optimizer_steps):
    adapter = create_tip_adapter(cifar["shots"], cifar["shot_labels"], len(CLASSES))
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    base_before = {k: v.clone() for k, v in cifar["base"].model.state_dict().items()}
    finetune_keys(adapter, cifar["held"], cifar["zero_shot"], cifar["held_labels"], steps=1)
    changed = {k for k, v in adapter.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"cache_keys"} and optimizer_steps == [1]
    assert all(torch.equal(v, base_before[k]) for k, v in cifar["base"].model.state_dict().items())


def test_save_load_gives_the_same_logits(cifar, tmp_path):
    adapter = create_tip_adapter(cifar["shots"], cifar["shot_labels"], len(CLASSES), TipAdapterConfig(1.7, 3.5))
    loaded = load_tip_adapter(save_tip_adapter(adapter, tmp_path / "tip.safetensors"))
    assert (loaded.alpha, loaded.beta) == (1.7, 3.5)
    assert torch.equal(loaded(cifar["held"], cifar["zero_shot"]), adapter(cifar["held"], cifar["zero_shot"]))


def test_a_file_without_the_cache_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=r"x.safetensors: not a Tip-Adapter file \(missing \['cache_keys'"):
        load_tip_adapter(tmp_path / "x.safetensors")
