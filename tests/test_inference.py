"""Many adapters on one base: switching, disabling, merging, interpolating and exporting."""

from __future__ import annotations

import open_clip
import pytest
import torch

from peftclip.adapters.lora import LoraConfig, apply_lora
from peftclip.adapters.partial import PartialConfig
from peftclip.adapters.strategy import AdapterSpec, apply_strategy
from peftclip.inference import AdaptedCLIP
from peftclip.io import AdapterError, save_adapter
from peftclip.models import BaseConfig, load_base
from tests.conftest import image_batch, text_batch

TOL = 1e-5


def _trained(tmp_path, name, seed, config):
    """An adapter with random non-zero LoRA weights; returns its folder and its own outputs."""
    torch.manual_seed(seed)
    base = load_base()
    model = apply_lora(base.model, config, init_lora_weights=False)
    model.eval()
    images, texts = image_batch(model), text_batch(base)
    with torch.no_grad():
        outputs = (model.encode_image(images), model.encode_text(texts))
    return save_adapter(model, tmp_path / name, base.info, {"lora": config.to_dict()}), outputs


@pytest.fixture
def two(tmp_path):
    first = _trained(tmp_path, "first", 1, LoraConfig(r=2))
    second = _trained(tmp_path, "second", 2, LoraConfig(r=4, towers=["vision"], target_modules=["q", "c_fc"]))
    clip = AdaptedCLIP(load_base())
    clip.add_adapter("first", first[0])
    clip.add_adapter("second", second[0])
    return clip, first[1], second[1]


def _encode(model, base):
    images, texts = image_batch(model), text_batch(base)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def _close(a, b):
    return all(torch.allclose(x, y, atol=TOL, rtol=0) for x, y in zip(a, b))


def test_each_adapter_reproduces_its_outputs_and_disabled_is_the_base(two):
    clip, first, second = two
    with clip.using("first") as model:
        assert _close(_encode(model, clip.base), first)
    with clip.using("second") as model:
        assert _close(_encode(model, clip.base), second)
    reference = load_base().model
    with clip.using(None) as model:
        assert _close(_encode(model, clip.base), _encode(reference, clip.base))
    assert clip.model.active_adapter == "second"  # the block restored the previous choice


def test_merge_then_unmerge_round_trips(two):
    clip, first, _ = two
    clip.set_adapter("first")
    layer = clip.model.get_base_model().visual.transformer.resblocks[0].attn.q_proj
    original = layer.base_layer.weight.detach().clone()
    clip.merge("first")
    assert not torch.allclose(layer.base_layer.weight, original)  # the update now lives in W
    assert _close(_encode(clip.model, clip.base), first)
    clip.unmerge()
    assert torch.allclose(layer.base_layer.weight, original, atol=TOL)
    assert _close(_encode(clip.model, clip.base), first)
    with clip.using(None) as model:
        assert _close(_encode(model, clip.base), _encode(load_base().model, clip.base))


@pytest.mark.parametrize(("alpha", "expected"), [(0.0, "base"), (1.0, "first")])
def test_interpolation_endpoints(two, alpha, expected):
    clip, first, _ = two
    clip.set_adapter("first")
    clip.set_scale("first", alpha)
    want = first if expected == "first" else _encode(load_base().model, clip.base)
    assert _close(_encode(clip.model, clip.base), want)


def test_interpolation_midpoint_lies_between(two):
    clip, first, _ = two
    clip.set_adapter("first")
    clip.set_scale("first", 0.5)
    half = _encode(clip.model, clip.base)[0]
    base = _encode(load_base().model, clip.base)[0]
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, first[0], atol=1e-4)


def test_merged_export_loads_with_plain_open_clip(two, tmp_path):
    clip, first, _ = two
    path = clip.export_merged("first", tmp_path / "merged.safetensors")
    plain, _, _ = open_clip.create_model_and_transforms("peftclip-tiny", pretrained=str(path))
    plain.eval()
    assert _close(_encode(plain, clip.base), first)
    assert clip.merged is None  # the export left the live model unmerged


def test_only_lora_adapters_share_a_base(tmp_path):
    base = load_base()
    model, _ = apply_strategy(base.model, AdapterSpec(partial=PartialConfig(projections=True)))
    out = save_adapter(model, tmp_path / "proj", base.info, AdapterSpec(partial=PartialConfig(projections=True))
                       .to_dict())
    with pytest.raises(AdapterError, match="only LoRA adapters can share one base"):
        AdaptedCLIP(load_base()).add_adapter("proj", out)


def test_second_adapter_for_another_base_is_refused(two, tmp_path):
    clip, _, _ = two
    base = load_base(BaseConfig(init_seed=5))
    model = apply_lora(base.model, LoraConfig(r=2))
    out = save_adapter(model, tmp_path / "other", base.info, {"lora": LoraConfig(r=2).to_dict()})
    with pytest.raises(AdapterError, match="trained on base"):
        clip.add_adapter("other", out)
