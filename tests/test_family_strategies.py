"""Every strategy on every tiny tower family: one step trains exactly its parameters, or it is refused by name.

Each tiny config covers one vision family and one text family (`peftclip-tiny`: vit + text,
`-siglip`: timm ViT without a class token + text with a logit bias, `-eva`: timm EVA with rotary
embeddings, `-convnext`, `-resnet`, `-hftext`: hf-roberta). The prompt methods, which add
tokens and so change outputs even at zero, also save and reload exactly on every family they
apply to.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from peftclip.adapters.heads import HeadConfig, classifier
from peftclip.adapters.lora import ClipLoraConfig
from peftclip.adapters.partial import PartialConfig
from peftclip.adapters.prompts import TextPromptConfig, VisualPromptConfig
from peftclip.adapters.strategy import AdapterSpec, apply_strategy
from peftclip.families import TOWERS, block_paths, final_norm_names, projection_name, tower_of
from peftclip.io import load_adapter, save_adapter
from peftclip.losses import contrastive_step, cross_entropy_step
from peftclip.models import BaseConfig, load_base
from peftclip.train import TrainConfig, create_optimizer
from peftclip.utils import canonical_name
from tests import hf_cache
from tests.conftest import image_batch

tiny_hub = hf_cache.tiny_hub

CONFIGS = ["peftclip-tiny", "peftclip-tiny-siglip", "peftclip-tiny-eva", "peftclip-tiny-convnext",
           "peftclip-tiny-resnet", "peftclip-tiny-hftext"]
VIT_CONFIGS = ["peftclip-tiny", "peftclip-tiny-siglip", "peftclip-tiny-eva"]
HF_TEXT = "peftclip-tiny-hftext"
TEXTS = ["a photo of a red dog", "two cats playing in the snow", "a man running", "blue water"]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _projections(model: nn.Module) -> list[str]:
    return [p for p in (projection_name(model, t) for t in TOWERS) if p is not None]


def _last_blocks(model: nn.Module) -> list[str]:
    return [p for t in TOWERS for p in block_paths(model, t)[-2:] + final_norm_names(model, t)]


def _has_bias(model: nn.Module) -> bool:
    return isinstance(getattr(model, "logit_bias", None), nn.Parameter)  # open_clip sets it to None without one


def _shared(model: nn.Module) -> set[str]:
    return {"logit_scale", "logit_bias"} if _has_bias(model) else {"logit_scale"}


# strategy -> (AdapterSpec for the base model, which clean parameter names one step must change)
STRATEGIES: dict[str, tuple[Callable[[nn.Module], AdapterSpec], Callable[[nn.Module, str], bool]]] = {
    "lora": (lambda m: AdapterSpec(lora=ClipLoraConfig(r=2)), lambda m, n: "lora_" in n),
    "full": (lambda m: AdapterSpec(partial=PartialConfig(full=True)), lambda m, n: not n.startswith("peftclip_")),
    "freeze_vision": (lambda m: AdapterSpec(partial=PartialConfig(freeze="vision")),
                      lambda m, n: tower_of(n) == "text" or _under(n, _projections(m))),
    "freeze_text": (lambda m: AdapterSpec(partial=PartialConfig(freeze="text")),
                    lambda m, n: tower_of(n) == "vision" or _under(n, _projections(m))),
    "projections": (lambda m: AdapterSpec(partial=PartialConfig(projections=True)),
                    lambda m, n: _under(n, _projections(m))),
    "last_2_blocks": (lambda m: AdapterSpec(partial=PartialConfig(last_blocks=2, final_norms=True)),
                      lambda m, n: _under(n, _last_blocks(m))),
    "logit_scale": (lambda m: AdapterSpec(partial=PartialConfig(logit_scale=True, logit_bias=_has_bias(m))),
                    lambda m, n: n in _shared(m)),
    "new_proj_dim": (lambda m: AdapterSpec(partial=PartialConfig(new_proj_dim=16)),
                     lambda m, n: _under(n, _projections(m))),
    "text_prompt": (lambda m: AdapterSpec(text_prompt=TextPromptConfig(n_ctx=2)),
                    lambda m, n: n.startswith("peftclip_text_prompt.")),
    "visual_prompt": (lambda m: AdapterSpec(visual_prompt=VisualPromptConfig(n_tokens=2, deep=True)),
                      lambda m, n: n.startswith("peftclip_visual_prompt.")),
    "head": (lambda m: AdapterSpec(head=HeadConfig(n_classes=3, init="random")),
             lambda m, n: n.startswith("peftclip_head.")),
}
_NO_VPT = "vision tower .* takes no visual prompts: visual prompts apply to ViT towers only.*LoRA and partial"
# (config, strategy) pairs the registry says do not apply -> what the error must say
REFUSED = {
    ("peftclip-tiny-convnext", "visual_prompt"): "the timm-convnext " + _NO_VPT,
    ("peftclip-tiny-resnet", "visual_prompt"): "the resnet " + _NO_VPT,
    ("peftclip-tiny-siglip", "new_proj_dim"): "the timm-vit vision tower has no projection to resize",
    ("peftclip-tiny-eva", "new_proj_dim"): "visual.trunk.head of the timm-vit vision tower is a Linear",
    ("peftclip-tiny-convnext", "new_proj_dim"): "of the timm-convnext vision tower is a Linear.*projections=True",
    ("peftclip-tiny-resnet", "new_proj_dim"): "of the resnet vision tower is a Linear.*projections=True",
    ("peftclip-tiny-hftext", "new_proj_dim"): "of the hf-roberta text tower is a Linear.*projections=True",
}
CASES = [pytest.param(c, s, id=f"{c}-{s}") for c in CONFIGS for s in STRATEGIES]


def _build(config: str, spec: Callable[[nn.Module], AdapterSpec] | AdapterSpec, unzero: bool = False):
    base = load_base(BaseConfig(model_name=config))
    with torch.no_grad():  # zero-initialised scales (ResNet's last BN per block) pass no gradient to what feeds them
        for param in base.model.parameters():
            if unzero and not param.any():
                param.normal_(std=0.1)
    spec = spec if isinstance(spec, AdapterSpec) else spec(base.model)
    model, tokenize = apply_strategy(base.model, spec, base.tokenizer, init_lora_weights=False)
    return base, spec, model, tokenize


def _one_step(model: nn.Module, tokenize: Callable, spec: AdapterSpec) -> None:
    optimizer = create_optimizer(model, TrainConfig(lr=1e-2))
    images = image_batch(model, n=4)
    if spec.head is not None:
        loss = cross_entropy_step(classifier(model), (images, torch.tensor([0, 1, 2, 0])))
    else:
        loss = contrastive_step(model, (images, tokenize(TEXTS)))
    loss.backward()
    optimizer.step()


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {canonical_name(n) for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


@pytest.mark.parametrize(("config", "strategy"), CASES)
def test_one_step_changes_exactly_the_strategys_parameters(config, strategy, tiny_hub):
    make_spec, expected = STRATEGIES[strategy]
    if (config, strategy) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[config, strategy]):
            _build(config, make_spec)
        return
    base, spec, model, tokenize = _build(config, make_spec, unzero=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _one_step(model, tokenize, spec)
    inner = base.model
    want = {canonical_name(n) for n, _ in model.named_parameters() if expected(inner, canonical_name(n))}
    assert want, f"{strategy} on {config} should train something"
    assert _changed(model, before) == want


def test_logit_bias_is_refused_on_a_model_without_one():
    with pytest.raises(ValueError, match="logit_bias=True: CLIP has no logit_bias .*use logit_scale"):
        _build("peftclip-tiny", AdapterSpec(partial=PartialConfig(logit_scale=True, logit_bias=True)))


PROMPT_CASES = ([pytest.param(c, AdapterSpec(visual_prompt=VisualPromptConfig(n_tokens=3, deep=deep)), "encode_image",
                              id=f"{c}-vpt-{'deep' if deep else 'shallow'}")
                 for c in VIT_CONFIGS for deep in (False, True)]
                + [pytest.param(c, AdapterSpec(text_prompt=TextPromptConfig(ctx_init="a photo of the")), "encode_text",
                                id=f"{c}-coop") for c in ("peftclip-tiny", "peftclip-tiny-siglip", HF_TEXT)])


def _encode(model: nn.Module, encode: str, tokenize: Callable) -> torch.Tensor:
    inputs = image_batch(model, n=4, seed=1) if encode == "encode_image" else tokenize(TEXTS)
    with torch.no_grad():
        return getattr(model, encode)(inputs, normalize=True)  # unit vectors: tolerances mean the same everywhere


@pytest.mark.parametrize(("config", "spec", "encode"), PROMPT_CASES)
def test_prompts_change_the_output_train_alone_and_reload_exactly(config, spec, encode, tiny_hub, tmp_path):
    base, _, model, tokenize = _build(config, spec)
    model.eval()
    prompt = next(m for n, m in model.named_children() if n.startswith("peftclip_"))
    plain = _encode(load_base(BaseConfig(model_name=config)).model.eval(), encode, base.tokenizer)
    if encode == "encode_text":  # the context starts as "a photo of the": same words, so compare to them
        texts = [f"a photo of the {t}" for t in TEXTS]
        with torch.no_grad():
            want = load_base(BaseConfig(model_name=config)).model.eval().encode_text(base.tokenizer(texts))
            assert torch.allclose(model.encode_text(tokenize(TEXTS)), want, atol=1e-5)
    with torch.no_grad():
        for param in prompt.parameters():
            param.normal_()  # large enough that every family's output moves visibly
    assert not torch.allclose(_encode(model, encode, tokenize), plain, atol=1e-3)

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _one_step(model, tokenize, spec)
    assert _changed(model, before) == {n for n, _ in model.named_parameters() if n.startswith("peftclip_")}

    model.eval()
    out = save_adapter(model, tmp_path / "adapter", base.info, spec.to_dict())
    loaded = load_adapter(load_base(BaseConfig(model_name=config)), out)
    want, got = _encode(model, encode, tokenize), _encode(loaded, encode, tokenize)
    assert torch.allclose(want, got, atol=1e-5, rtol=0), (want - got).abs().max()


@pytest.mark.parametrize("config", VIT_CONFIGS)
def test_visual_prompts_are_dropped_before_pooling(config, tiny_hub):
    """The pooled sequence has the base's length: prompts only act through attention, as in VPT."""
    base, _, model, _ = _build(config, AdapterSpec(visual_prompt=VisualPromptConfig(n_tokens=3, deep=True)))
    lengths = {}
    last = model.get_submodule(block_paths(model, "vision")[-1])
    last.register_forward_hook(lambda module, inputs, output: lengths.update(out=output.shape[1]))
    last.register_forward_pre_hook(lambda module, args: lengths.update({"in": args[0].shape[1]}))
    _encode(model, "encode_image", base.tokenizer)
    assert lengths["in"] == lengths["out"] + 3
