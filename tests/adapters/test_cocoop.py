"""CoCoOp: the context each class prompt gets moves with the image, and the meta-network learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftclip.adapters.cocoop import attach_cocoop_prompt, cocoop_logits
from peftclip.adapters.prompts import TextPromptConfig
from tests.conftest import image_batch

CLASSES = ["cat", "dog", "car"]


@pytest.fixture
def cocoop(tiny_base):
    model = tiny_base.model.requires_grad_(False)
    prompt = attach_cocoop_prompt(model, TextPromptConfig(n_ctx=4), tiny_base.tokenizer)
    return model, prompt, prompt.tokenize([f"a photo of a {c}." for c in CLASSES])


def test_prompt_changes_with_the_input_image(cocoop):
    model, prompt, tokens = cocoop
    images = image_batch(model, n=2)
    seen = []
    model.token_embedding.register_forward_hook(lambda m, i, out: seen.append(out.detach()), prepend=False)
    with torch.no_grad():
        logits = cocoop_logits(model, prompt, images, tokens)
    embedded = seen[-1].view(2, len(CLASSES), *seen[-1].shape[1:])  # after the prompt's hook: image-major
    ctx = embedded[:, :, prompt.start:prompt.start + 4]
    assert torch.equal(ctx[0, 0], ctx[0, 1]), "one image's classes share its context"
    assert not torch.allclose(ctx[0, 0], ctx[1, 0]), "two images got the same context"
    with torch.no_grad():
        alone = cocoop_logits(model, prompt, images[1:], tokens)
    assert torch.allclose(alone[0], logits[1], atol=1e-5), "an image's logits depend on other images in the batch"


def test_one_step_trains_context_and_meta_network_only(cocoop):
    model, prompt, tokens = cocoop
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    F.cross_entropy(cocoop_logits(model, prompt, image_batch(model, n=2), tokens), torch.tensor([0, 2])).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if n.startswith("peftclip_text_prompt.")}
    assert any(".meta_net." in n for n in changed) and "peftclip_text_prompt.ctx" in changed


def test_class_specific_context_is_refused(tiny_base):
    with pytest.raises(ValueError, match="one shared context"):
        attach_cocoop_prompt(tiny_base.model, TextPromptConfig(n_ctx=2, class_specific=True, n_classes=3),
                             tiny_base.tokenizer)
