"""CLIP-Adapter: x' = α·MLP(x) + (1−α)·x on the chosen towers' features; trains, saves and switches alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftclip.adapters.clip_adapter import CLIP_ADAPTER_NAME, ClipAdapterConfig
from peftclip.adapters.lora import ClipLoraConfig
from peftclip.adapters.strategy import AdapterSpec, apply_strategy
from peftclip.inference import AdaptedCLIP
from peftclip.io import load_adapter, save_adapter
from peftclip.models import load_base
from peftclip.train import TrainConfig, create_optimizer, param_group
from tests.conftest import image_batch, text_batch

TOL = 1e-5
CASES = [ClipAdapterConfig(), ClipAdapterConfig(adapter_towers=["vision", "text"], adapter_ratio=0.6, reduction=2),
         ClipAdapterConfig(adapter_towers=["text"])]


def _encode(model, base):
    with torch.no_grad():
        return torch.cat([model.encode_image(image_batch(model)), model.encode_text(text_batch(base))])


@pytest.mark.parametrize("config", CASES, ids=repr)
def test_features_follow_the_residual_formula(tiny_base, config):
    plain = _encode(tiny_base.model, tiny_base)
    with torch.no_grad():
        image = tiny_base.model.visual(image_batch(tiny_base.model))  # before the hook
    model, _ = apply_strategy(tiny_base.model, AdapterSpec(clip_adapter=config), tiny_base.tokenizer)
    mlps = getattr(model, CLIP_ADAPTER_NAME).mlps
    with torch.no_grad():
        want_image = (config.adapter_ratio * mlps["vision"](image) + (1 - config.adapter_ratio) * image
                      if "vision" in mlps else image)
        got = model.encode_image(image_batch(model))
    assert torch.allclose(got, want_image, atol=TOL)
    changed = ~torch.isclose(_encode(model, tiny_base), plain, atol=TOL).all(dim=1)  # split attention moves ~1e-6
    assert changed.tolist() == ["vision" in mlps] * 2 + ["text" in mlps] * 2


def test_one_step_changes_only_its_parameters(tiny_base):
    config = CASES[1]
    model, _ = apply_strategy(tiny_base.model, AdapterSpec(clip_adapter=config), tiny_base.tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = create_optimizer(model, TrainConfig(lr=1e-2))
    image, text = model.encode_image(image_batch(model), normalize=True), model.encode_text(text_batch(tiny_base),
                                                                                          normalize=True)
    F.cross_entropy(10 * image @ text.T, torch.arange(2)).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith(CLIP_ADAPTER_NAME)} and changed
    assert {param_group(n) for n in changed} == {"adapters"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder, base = tmp_path_factory.mktemp("clip_adapter"), load_base()
    spec = AdapterSpec(clip_adapter=CASES[1])
    torch.manual_seed(3)
    model, _ = apply_strategy(base.model, spec, base.tokenizer)
    return save_adapter(model, folder / "adapter", base.info, spec.to_dict()), _encode(model, base)


def test_save_load_gives_the_same_outputs(saved):
    base = load_base()
    assert torch.allclose(_encode(load_adapter(base, saved[0]), base), saved[1], atol=TOL)


def test_adapted_clip_switches_between_it_and_lora(saved, tmp_path):
    base = load_base()
    lora, _ = apply_strategy(base.model, AdapterSpec(lora=ClipLoraConfig(r=2)), init_lora_weights=False)
    lora_out = _encode(lora, base)
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(save_adapter(lora, tmp_path / "lora", base.info, {"lora": ClipLoraConfig(r=2).to_dict()}), "lora")
    clip.load_adapter(saved[0], "mlp")
    for name, want in (("mlp", saved[1]), ("lora", lora_out), ("mlp", saved[1])):
        clip.set_adapter(name)
        assert torch.allclose(_encode(clip.model, base), want, atol=TOL), name
    clip.set_adapter(None)
    assert torch.allclose(_encode(clip.model, base), _encode(load_base().model, base), atol=TOL)
