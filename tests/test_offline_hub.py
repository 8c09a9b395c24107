"""The tiny per-family configs build offline; HF tokenizers and text configs resolve from a pre-filled hub cache."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from peftclip.models import BaseConfig, load_base
from tests import hf_cache
from tests.hf_cache import TEXT_CONFIG, TINY_HUB_ID

tiny_hub = hf_cache.tiny_hub  # the fixture, for this module's tests

# config name -> (open_clip image tower class, text tower class, has a logit_bias)
TEST_CASES = {
    "peftclip-tiny-siglip": ("TimmModel", "TextTransformer", True),
    "peftclip-tiny-convnext": ("TimmModel", "Transformer", False),
    "peftclip-tiny-resnet": ("ModifiedResNet", "Transformer", False),
    "peftclip-tiny-eva": ("TimmModel", "TextTransformer", False),
    "peftclip-tiny-hftext": ("VisionTransformer", "HFTextEncoder", False),
}


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.text if hasattr(model, "text") else model.transformer


@pytest.mark.parametrize("name", list(TEST_CASES))
def test_tiny_config_builds_and_encodes_offline(name, tiny_hub):
    base = load_base(BaseConfig(model_name=name))
    visual_class, text_class, has_bias = TEST_CASES[name]
    assert type(base.model.visual).__name__ == visual_class
    assert type(_text_tower(base.model)).__name__ == text_class
    assert (getattr(base.model, "logit_bias", None) is not None) == has_bias
    assert sum(p.numel() for p in base.model.parameters()) < 3_000_000
    images = torch.randn(2, 3, 32, 32)
    texts = base.tokenizer(["a photo of a dog", "two cats playing in the snow"])
    with torch.no_grad():
        image_features, text_features = base.model.encode_image(images), base.model.encode_text(texts)
    assert image_features.shape == text_features.shape == (2, 32)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()


@pytest.mark.parametrize("name", ["peftclip-tiny-siglip", "peftclip-tiny-hftext", f"hf-hub:{TINY_HUB_ID}"])
def test_hf_tokenizer_comes_from_the_hub_cache(name, tiny_hub):
    tokens = open_clip.get_tokenizer(name)(["a photo of a zebra"], context_length=8)
    # <s>=0 a=4 photo=14 of=7 a=4 zebra=<unk>=3 </s>=2 <pad>=1: the cached vocabulary, not CLIP's BPE
    assert tokens.tolist() == [[0, 4, 14, 7, 4, 3, 2, 1]]


def test_hf_text_tower_takes_its_config_from_the_hub_cache(tiny_hub):
    text = load_base(BaseConfig(model_name="peftclip-tiny-hftext")).model.text
    assert text.config.model_type == "roberta"
    assert text.config.hidden_size == TEXT_CONFIG["hidden_size"]
    assert text.config.num_hidden_layers == TEXT_CONFIG["num_hidden_layers"]


def test_without_the_cached_tokenizer_loading_fails_offline_naming_the_repo(tiny_hub, monkeypatch):
    empty = tiny_hub.parent / "empty"
    empty.mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(empty))
    with pytest.raises(OSError, match=TINY_HUB_ID):
        load_base(BaseConfig(model_name="peftclip-tiny-siglip"))


def test_a_config_can_name_a_local_tokenizer_folder(tiny_hub, tmp_path):
    snapshot = next((tiny_hub / f"models--{TINY_HUB_ID.replace('/', '--')}" / "snapshots").iterdir())
    config = open_clip.get_model_config("peftclip-tiny-hftext")
    config["text_cfg"].update(hf_model_name=str(snapshot), hf_tokenizer_name=str(snapshot))
    path = tmp_path / "local-tokenizer-clip.json"
    path.write_text(json.dumps(config))
    base = load_base(BaseConfig(model_name=str(path)))
    assert base.tokenizer(["a photo"], context_length=4).tolist() == [[0, 4, 14, 2]]
