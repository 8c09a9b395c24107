"""Every strategy trains exactly its parameters, saves exactly them, and reloads exactly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from peftclip.adapters.lora import ClipLoraConfig
from peftclip.adapters.partial import PartialConfig
from peftclip.adapters.prompts import TextPromptConfig, VisualPromptConfig
from peftclip.adapters.strategy import AdapterSpec, apply_strategy
from peftclip.io import SAFETENSORS_WEIGHTS_NAME, load_adapter, save_adapter
from peftclip.losses import ContrastiveLoss
from peftclip.models import BaseConfig, load_base
from peftclip.train import TrainConfig, create_optimizer
from peftclip.utils import canonical_name
from tests.conftest import image_batch


def _vision(name):
    return name.startswith("visual.")


LORA = ClipLoraConfig(r=2)
PROJ = ("visual.proj", "text_projection")
# id -> (AdapterSpec, predicate over clean parameter names that must change after one step)
TEST_CASES = {
    "full": (AdapterSpec(partial=PartialConfig(full=True)), lambda n: not n.startswith("peftclip_")),
    "freeze_vision": (AdapterSpec(partial=PartialConfig(freeze="vision")),
                      lambda n: (not _vision(n) and n != "logit_scale") or n == "visual.proj"),
    "freeze_text": (AdapterSpec(partial=PartialConfig(freeze="text")), lambda n: _vision(n) or n == "text_projection"),
    "projections": (AdapterSpec(partial=PartialConfig(projections=True)), lambda n: n in PROJ),
    "projections_and_scale": (AdapterSpec(partial=PartialConfig(projections=True, logit_scale=True)),
                              lambda n: n in PROJ or n == "logit_scale"),
    "last_block_vision_with_norm": (
        AdapterSpec(partial=PartialConfig(last_blocks=1, block_towers=["vision"], final_norms=True)),
        lambda n: n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post."))),
    "logit_scale": (AdapterSpec(partial=PartialConfig(logit_scale=True)), lambda n: n == "logit_scale"),
    "new_proj_dim": (AdapterSpec(partial=PartialConfig(new_proj_dim=16)), lambda n: n in PROJ),
    "lora": (AdapterSpec(lora=LORA), lambda n: "lora_" in n),
    "projections_last2_lora": (AdapterSpec(lora=LORA, partial=PartialConfig(projections=True, last_blocks=2)),
                               lambda n: "lora_" in n or n in PROJ or ".resblocks." in n),
    "text_prompt": (AdapterSpec(text_prompt=TextPromptConfig(n_ctx=3)), lambda n: n.startswith("peftclip_text")),
    "text_prompt_init_class_specific": (
        AdapterSpec(text_prompt=TextPromptConfig(ctx_init="a photo of a", class_specific=True, n_classes=4)),
        lambda n: n.startswith("peftclip_text")),
    "visual_prompt_deep": (AdapterSpec(visual_prompt=VisualPromptConfig(n_tokens=2, deep=True)),
                           lambda n: n.startswith("peftclip_visual")),
    "text_prompt_and_logit_scale": (
        AdapterSpec(text_prompt=TextPromptConfig(), partial=PartialConfig(logit_scale=True)),
        lambda n: n.startswith("peftclip_text") or n == "logit_scale"),
    "both_prompts_and_lora": (
        AdapterSpec(lora=LORA, text_prompt=TextPromptConfig(), visual_prompt=VisualPromptConfig()),
        lambda n: "lora_" in n or n.startswith("peftclip_")),
}


def _build(case):
    spec = TEST_CASES[case][0]
    base = load_base(BaseConfig())
    model, tokenize = apply_strategy(base.model, spec, base.tokenizer, init_lora_weights=False)
    return base, model, tokenize, spec.to_dict()


def _one_step(model, tokenize):
    optimizer = create_optimizer(model, TrainConfig(lr=1e-2))
    images, texts = image_batch(model, n=4), tokenize([f"text {i}" for i in range(4)])
    image_features, text_features, scale = model(images, texts)
    ContrastiveLoss()(image_features, text_features, scale).backward()
    optimizer.step()


@pytest.mark.parametrize("case", list(TEST_CASES))
def test_one_step_changes_exactly_the_intended_parameters(case):
    base, model, tokenize, _ = _build(case)
    before = {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}
    _one_step(model, tokenize)
    should_change = TEST_CASES[case][1]
    for name, param in model.named_parameters():
        name = canonical_name(name)
        changed = not torch.equal(param.detach(), before[name])
        assert changed == should_change(name), f"{name}: changed={changed}"


@pytest.mark.parametrize("case", list(TEST_CASES))
def test_saved_file_holds_exactly_the_trained_tensors_and_reloads(case, tmp_path):
    base, model, tokenize, record = _build(case)
    _one_step(model, tokenize)
    out = save_adapter(model, tmp_path / case, base.info, record)
    trainable = {canonical_name(n).replace(".default", "") for n, p in model.named_parameters() if p.requires_grad}
    stored = load_file(out / SAFETENSORS_WEIGHTS_NAME)
    assert {canonical_name(k) for k in stored} == trainable
    # Size: 8-byte header length, the JSON header, then 4 bytes per fp32 parameter.
    raw = (out / SAFETENSORS_WEIGHTS_NAME).read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(raw) - 8 - header == 4 * n_params
    assert json.loads((out / "peftclip_config.json").read_text())["trainable_parameters"] == n_params

    loaded = load_adapter(load_base(BaseConfig()), out)
    images, texts = image_batch(model), tokenize([f"text {i}" for i in range(4)])
    with torch.no_grad():
        model.eval()
        for encode, inputs in (("encode_image", images), ("encode_text", texts)):
            want, got = getattr(model, encode)(inputs), getattr(loaded, encode)(inputs)
            assert torch.allclose(want, got, atol=1e-5, rtol=0), f"{encode}: {(want - got).abs().max()}"
        assert torch.equal(model.logit_scale, loaded.logit_scale)


def test_strategy_that_trains_nothing_is_refused():
    with pytest.raises(ValueError, match="trains nothing"):
        apply_strategy(load_base().model, AdapterSpec())


@pytest.mark.parametrize(("kwargs", "message"), [({"freeze": "audio"}, "freeze='audio'"),
                                                 ({"last_blocks": -1}, "last_blocks=-1"),
                                                 ({"block_towers": ["tail"]}, "unknown tower 'tail'"),
                                                 ({"new_proj_dim": 0}, "new_proj_dim=0")])
def test_invalid_partial_config_names_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PartialConfig(**kwargs)
