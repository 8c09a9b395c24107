"""Zero-shot weights and the classification head, trained alone or with another strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftclip.adapters import AdapterSpec, ClipLoraConfig, PartialConfig, apply_strategy
from peftclip.adapters.heads import HeadConfig, classifier, zero_shot_weights
from peftclip.io import load_adapter, save_adapter
from peftclip.losses import cross_entropy_step
from peftclip.models import load_base
from peftclip.train import TrainConfig, create_optimizer
from peftclip.utils import canonical_name
from tests.conftest import image_batch

CLASSES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def test_zero_shot_weights_average_normalised_template_embeddings():
    base = load_base()
    weights = zero_shot_weights(base.model, base.tokenizer, CLASSES, TEMPLATES)
    with torch.no_grad():
        for row, name in zip(weights, CLASSES):
            texts = base.tokenizer([t.format(name) for t in TEMPLATES])
            expected = F.normalize(base.model.encode_text(texts, normalize=True).mean(0), dim=-1)
            assert torch.allclose(row, expected, atol=1e-6)


def test_zero_shot_initialised_head_predicts_like_zero_shot():
    base = load_base()
    weights = zero_shot_weights(base.model, base.tokenizer, CLASSES, TEMPLATES)
    model, _ = apply_strategy(base.model, AdapterSpec(head=HeadConfig(n_classes=3)), head_weights=weights)
    images = image_batch(model, n=8)
    with torch.no_grad():
        zero_shot = base.model.encode_image(images, normalize=True) @ weights.T
        assert torch.equal(classifier(model)(images).argmax(1), zero_shot.argmax(1))


HEAD_CASES = {
    "linear_probe": (AdapterSpec(head=HeadConfig(n_classes=3)), lambda n: n.startswith("peftclip_head")),
    "lora_and_head": (AdapterSpec(lora=ClipLoraConfig(r=2, towers=["vision"]), head=HeadConfig(n_classes=3)),
                      lambda n: n.startswith("peftclip_head") or "lora_" in n),
    "last_block_and_head": (AdapterSpec(partial=PartialConfig(last_blocks=1, block_towers=["vision"]),
                                        head=HeadConfig(n_classes=3)),
                            lambda n: n.startswith(("peftclip_head", "visual.transformer.resblocks.1."))),
}


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_cross_entropy_step_trains_exactly_the_head_strategy_and_reloads(case, tmp_path):
    spec, should_change = HEAD_CASES[case]
    base = load_base()
    weights = zero_shot_weights(base.model, base.tokenizer, CLASSES, TEMPLATES)
    model, _ = apply_strategy(base.model, spec, base.tokenizer, head_weights=weights, init_lora_weights=False)
    before = {canonical_name(n): p.detach().clone() for n, p in model.named_parameters()}
    optimizer = create_optimizer(model, TrainConfig(lr=1e-2))
    images, labels = image_batch(model, n=6), torch.tensor([0, 1, 2, 0, 1, 2])
    cross_entropy_step(classifier(model), (images, labels)).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        clean = canonical_name(name)
        assert (not torch.equal(param.detach(), before[clean])) == should_change(clean), name
    out = save_adapter(model, tmp_path / case, base.info, spec.to_dict())
    loaded = load_adapter(load_base(), out)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(classifier(model)(images), classifier(loaded)(images), atol=1e-4, rtol=0)


def test_zero_shot_head_without_weights_is_refused():
    with pytest.raises(ValueError, match="needs the zero-shot weights"):
        apply_strategy(load_base().model, AdapterSpec(head=HeadConfig(n_classes=3)))
