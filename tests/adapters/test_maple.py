"""MaPLe: the vision prompts are the coupling of the text prompts, so an image-only loss trains the text context."""

from __future__ import annotations

import pytest
import torch

from peftclip.adapters.maple import MapleConfig, attach_maple_prompt
from tests.conftest import image_batch


@pytest.fixture
def maple(tiny_base):
    model = tiny_base.model.requires_grad_(False)
    return model, attach_maple_prompt(model, MapleConfig(prompt_length=2, prompt_depth=2), tiny_base.tokenizer)


def test_image_loss_reaches_the_text_prompts(maple):
    model, prompt = maple
    model.encode_image(image_batch(model)).square().sum().backward()
    assert prompt.text_ctx.grad is not None and prompt.text_ctx.grad.abs().sum() > 0
    assert all(p.grad is not None for p in prompt.coupling.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("peftclip_visual_prompt.")}


def test_vision_prompts_are_a_function_of_the_text_prompts(maple):
    model, prompt = maple
    images = image_batch(model)
    with torch.no_grad():
        before = model.encode_image(images)
        prompt.text_ctx[1].add_(torch.randn_like(prompt.text_ctx[1]))  # only depth 1
        after = model.encode_image(images)
        want = prompt.coupling[1](prompt.text_ctx[1])
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.equal(prompt.vision_prompts(1).detach(), want)


def test_text_features_use_the_context(maple, tiny_base):
    model, prompt = maple
    tokens = prompt.tokenize(["a photo of a cat."])
    with torch.no_grad():
        before = model.encode_text(tokens)
        prompt.text_ctx[0].add_(torch.randn_like(prompt.text_ctx[0]))  # not a constant: LayerNorm removes it
        assert not torch.allclose(before, model.encode_text(tokens), atol=1e-4)


def test_depth_beyond_the_towers_is_refused(tiny_base):
    with pytest.raises(ValueError, match="prompt_depth=99"):
        attach_maple_prompt(tiny_base.model, MapleConfig(prompt_depth=99), tiny_base.tokenizer)
