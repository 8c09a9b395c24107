"""Every method in the METHODS registry: save -> load gives the same outputs; AdaptedCLIP switches it with LoRA."""

from __future__ import annotations

import pytest
import torch

from peftclip.adapters.clip_adapter import ClipAdapterConfig
from peftclip.adapters.ia3 import ClipIA3Config
from peftclip.adapters.lora import ClipLoraConfig
from peftclip.adapters.maple import MapleConfig
from peftclip.adapters.prompts import TextPromptConfig, VisualPromptConfig
from peftclip.adapters.strategy import METHODS, AdapterSpec, StrategyConfig, apply_strategy
from peftclip.cache import tower_modes
from peftclip.inference import AdaptedCLIP
from peftclip.io import load_adapter, save_adapter
from peftclip.models import load_base
from tests.conftest import image_batch, randomly_trained

TOL = 1e-5
TEXTS = ["a photo of a cat.", "two dogs in the snow"]
SPECS = {
    "lora": AdapterSpec(lora=ClipLoraConfig(r=2)),
    "clip_adapter": AdapterSpec(clip_adapter=ClipAdapterConfig(adapter_towers=["vision", "text"])),
    "cocoop": AdapterSpec(cocoop=TextPromptConfig(n_ctx=3)),
    "maple": AdapterSpec(maple=MapleConfig(prompt_length=2, prompt_depth=2)),
    "ia3": AdapterSpec(ia3=ClipIA3Config()),
}


PROMPT_ATTR = {"cocoop": "peftclip_text_prompt", "maple": "peftclip_visual_prompt"}


def _outputs(images, texts):
    return {"image": images, "text": texts}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Each spec trained to random weights and saved, with its image and text outputs."""
    folder, out = tmp_path_factory.mktemp("methods"), {}
    for seed, (name, spec) in enumerate(SPECS.items()):
        base, model, tokenize = randomly_trained(spec, seed)
        with torch.no_grad():
            model.eval()
            want = _outputs(model.encode_image(image_batch(model)), model.encode_text(tokenize(TEXTS)))
        out[name] = save_adapter(model, folder / name, base.info, spec.to_dict()), want
    return out


@pytest.mark.parametrize("name", [n for n in SPECS if n != "lora"])
def test_save_load_gives_the_same_outputs(zoo, name):
    folder, want = zoo[name]
    base = load_base()
    model = load_adapter(base, folder)
    prompt = getattr(model, PROMPT_ATTR.get(name, ""), None)  # the prompt methods tokenize with placeholders
    tokenize = prompt.tokenize if prompt is not None else base.tokenizer
    with torch.no_grad():
        got = _outputs(model.encode_image(image_batch(model)), model.encode_text(tokenize(TEXTS)))
    assert all(torch.allclose(got[k], want[k], atol=TOL) for k in want)


@pytest.mark.parametrize("name", [n for n in SPECS if n != "lora"])
def test_adapted_clip_switches_between_it_and_lora(zoo, name):
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(zoo["lora"][0], "lora")
    clip.load_adapter(zoo[name][0], name)
    images = image_batch(clip.model)
    for adapter in (name, "lora", name):
        got = _outputs(clip.encode_images(images, adapter=adapter, normalize=False),
                       clip.encode_texts(TEXTS, adapter=adapter, normalize=False))
        assert all(torch.allclose(got[k], zoo[adapter][1][k], atol=TOL) for k in got), adapter


def test_every_method_has_a_flag_or_an_active_section():
    flags = {f for f in StrategyConfig.__dataclass_fields__}
    assert set(METHODS) - flags == {"partial"}


@pytest.mark.parametrize("pair", [("cocoop", "text_prompt"), ("maple", "visual_prompt")])
def test_methods_bringing_the_same_prompts_are_refused_together(pair):
    configs = {"cocoop": TextPromptConfig(), "text_prompt": TextPromptConfig(), "maple": MapleConfig(),
               "visual_prompt": VisualPromptConfig()}
    with pytest.raises(ValueError, match=f"--{pair[0]} and --{pair[1].replace('_', '-')} contradict"):
        AdapterSpec(**{name: configs[name] for name in pair})


@pytest.mark.parametrize("name,modes", [("clip_adapter", {"vision": "live", "text": "live"}),
                                        ("maple", {"vision": "live", "text": "live"}),
                                        ("cocoop", {"vision": "full", "text": "live"})])
def test_feature_cache_keeps_the_towers_a_method_changes_live(name, modes):
    base = load_base()
    model, _ = apply_strategy(base.model, SPECS[name], base.tokenizer)
    assert tower_modes(model) == modes
