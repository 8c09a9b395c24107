"""Frozen-tower features: the right towers are cached, and cached training equals uncached training."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peftclip.adapters import (
    AdapterSpec,
    ClipLoraConfig,
    PartialConfig,
    TextPromptConfig,
    apply_strategy,
)
from peftclip.cache import FeatureCache, cache_frozen_towers, tower_modes
from peftclip.data import DataConfig, TrainPairs, load_pairs
from peftclip.models import load_base
from peftclip.synthetic import make_shapes_dataset
from peftclip.train import TrainConfig, create_accelerator, train

# id -> (spec, expected tower modes)
CASES = {
    "projections": (AdapterSpec(partial=PartialConfig(projections=True)), {"vision": "trunk", "text": "trunk"}),
    "logit_scale": (AdapterSpec(partial=PartialConfig(logit_scale=True)), {"vision": "full", "text": "full"}),
    "freeze_vision": (AdapterSpec(partial=PartialConfig(freeze="vision")), {"vision": "trunk", "text": "live"}),
    "text_prompt": (AdapterSpec(text_prompt=TextPromptConfig(n_ctx=2)), {"vision": "full", "text": "live"}),
    "freeze_text": (AdapterSpec(partial=PartialConfig(freeze="text")), {"vision": "live", "text": "trunk"}),
    "lora_both": (AdapterSpec(lora=ClipLoraConfig(r=2)), {"vision": "live", "text": "live"}),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    source = make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=40)
    return load_pairs(DataConfig(source=str(source), val_fraction=0.2))[0]


@pytest.mark.parametrize("case", list(CASES))
def test_tower_modes(case):
    spec, expected = CASES[case]
    base = load_base()
    model, _ = apply_strategy(base.model, spec, base.tokenizer)
    assert tower_modes(model) == expected


def _train(pairs, case, cached, tmp_path):
    base = load_base()
    model, tokenize = apply_strategy(base.model, CASES[case][0], base.tokenizer)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = TrainPairs(pairs, base.preprocess_val, tokenize, seed=0)
    train_model = model
    if cached:
        train_model, data = cache_frozen_towers(model, data, base.info, augment=False, cache=FeatureCache())
        assert train_model is not model
    config = TrainConfig(output_dir=str(tmp_path / case), batch_size=8, epochs=2, lr=1e-2, warmup_steps=0,
                         num_workers=0, cpu=True)
    losses = train(train_model, data, config, create_accelerator(config)).losses
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(trained[n], initial[n]) for n in trained), "training changed nothing"
    return losses, trained


@pytest.mark.parametrize("case", ["projections", "logit_scale", "freeze_vision", "text_prompt", "freeze_text"])
def test_cached_training_matches_uncached(pairs, case, tmp_path):
    plain_losses, plain = _train(pairs, case, cached=False, tmp_path=tmp_path)
    cached_losses, cached = _train(pairs, case, cached=True, tmp_path=tmp_path)
    assert cached_losses == pytest.approx(plain_losses, abs=1e-4)
    for name, tensor in plain.items():
        assert torch.allclose(cached[name], tensor, atol=1e-4), name


def test_augmented_image_tower_is_not_cached_and_live_towers_never_are(pairs):
    base = load_base()
    model, tokenize = apply_strategy(base.model, CASES["logit_scale"][0], base.tokenizer)
    data = TrainPairs(pairs, base.preprocess_train, tokenize)
    cached_model, _ = cache_frozen_towers(model, data, base.info, augment=True, cache=FeatureCache())
    assert cached_model.modes == {"vision": "live", "text": "full"}
    lora, tokenize = apply_strategy(load_base().model, CASES["lora_both"][0], base.tokenizer)
    same, same_data = cache_frozen_towers(lora, data, base.info, augment=False, cache=FeatureCache())
    assert same is lora and same_data is data


def test_cache_is_reused_and_kept_on_disk(tmp_path, pairs, monkeypatch):
    monkeypatch.setattr("peftclip.cache._DISK_MIN_BYTES", 0)
    calls = []
    cache = FeatureCache(tmp_path / "features")
    compute = lambda: calls.append(1) or torch.ones(3, 4)  # noqa: E731
    key = FeatureCache.key(base="b", tower="vision")
    assert torch.equal(cache.get(key, compute), torch.ones(3, 4))
    assert torch.equal(FeatureCache(tmp_path / "features").get(key, compute), torch.ones(3, 4))
    assert len(calls) == 1 and len(list((tmp_path / "features").glob("*.safetensors"))) == 1


def test_cached_linear_probe_matches_uncached(tmp_path):
    from peftclip.recipes import classify
    source = make_shapes_dataset(tmp_path / "shapes", n_images=40) / "labels.csv"
    runs = {}
    for cached in (False, True):
        runs[cached] = classify.main(["--source", str(source), "--no-lora", "--no-augment", "--max-steps", "3",
                                      "--batch-size", "8", "--num-workers", "0", "--val-fraction", "0.25",
                                      "--output-dir", str(tmp_path / f"out-{cached}"),
                                      "--feature-cache" if cached else "--no-feature-cache"])
    assert runs[True]["after"] == pytest.approx(runs[False]["after"], abs=1e-6)
    weights = [load_file(tmp_path / f"out-{c}" / "adapter_model.safetensors") for c in (False, True)]
    for name, tensor in weights[0].items():
        assert torch.allclose(weights[1][name], tensor, atol=1e-5), name


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("spec", [AdapterSpec(partial=PartialConfig(projections=True, logit_scale=True)),
                                  AdapterSpec(lora=ClipLoraConfig(r=2, towers=["vision"]),
                                              partial=PartialConfig(projections=True))])
def test_group_learning_rates_apply_with_the_cache_on_and_off(pairs, cached, spec):
    """Parameter groups come from canonical names, whatever wraps the model (PEFT, the feature cache)."""
    from peftclip.train import create_optimizer, param_group
    base = load_base()
    model, tokenize = apply_strategy(base.model, spec, base.tokenizer)
    train_model = model
    if cached:
        data = TrainPairs(pairs, base.preprocess_val, tokenize)
        train_model, _ = cache_frozen_towers(model, data, base.info, augment=False, cache=FeatureCache())
        assert type(train_model).__name__ == "CachedCLIP"
    config = TrainConfig(lr=1e-3, group_lr={"projections": 0.5, "lora": 0.25})
    optimizer = create_optimizer(train_model, config)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in train_model.named_parameters():
        if param.requires_grad:
            want = 0.25 if "lora_" in name else 0.5
            assert lr_of[id(param)] == want, (name, param_group(name))
