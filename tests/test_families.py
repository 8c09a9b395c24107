"""Every open_clip architecture maps to a tower family, and LoRA on each family is exact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch
import transformers
from torch import nn

from peftclip.adapters.attention import convert_attention
from peftclip.adapters.lora import ClipLoraConfig, apply_lora, lora_target_names
from peftclip.adapters.partial import PartialConfig, apply_partial
from peftclip.families import block_paths, family_of, final_norm_names, projection_name
from peftclip.inference import export_open_clip_state_dict
from peftclip.losses import ContrastiveLoss
from peftclip.models import BaseConfig, load_base
from tests.conftest import image_batch
from tests.hf_cache import TINY_HUB_ID, fill_hub_cache, tiny_hub  # noqa: F401  (fixture)

TOL = 1e-5
# Hub text configs the HF-text open_clip models name, written as real transformers configs (2 layers keep it small).
HF_CONFIGS = {"xlm-roberta": lambda: transformers.XLMRobertaConfig(num_hidden_layers=2),
              "roberta": lambda: transformers.RobertaConfig(num_hidden_layers=2),
              "mt5": lambda: transformers.MT5Config(num_layers=2),
              "nllb": lambda: transformers.M2M100Config(encoder_layers=2, decoder_layers=1)}


def _write_hub_config(hub_cache: Path, repo_id: str, config: transformers.PretrainedConfig) -> None:
    """`config.json` of `repo_id` in the hub cache layout, so AutoConfig finds it with HF_HUB_OFFLINE=1."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "tiny"
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps(config.to_dict()))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("tiny")


@pytest.fixture(scope="module")
def hf_text_configs(tmp_path_factory) -> None:
    """An offline hub cache holding the text config of every HF-text open_clip model."""
    hub_cache = tmp_path_factory.mktemp("hub")
    fill_hub_cache(hub_cache)
    for name in open_clip.list_models():
        repo_id = open_clip.get_model_config(name).get("text_cfg", {}).get("hf_model_name")
        if repo_id and repo_id != TINY_HUB_ID:
            kind = next(k for k in HF_CONFIGS if k in repo_id)
            _write_hub_config(hub_cache, repo_id, HF_CONFIGS[kind]())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def _per_block(family: str, block: nn.Module) -> int:
    """LoRA layers one block must hold under the default targets, written out per family."""
    mlp = getattr(block, "mlp", None)
    gated_in = 2 if any(hasattr(mlp, a) for a in ("fc1_g", "w0")) else 1  # SwiGLU / GeGLU: two input layers
    if family == "timm-convnext":
        return 2
    if family == "timm-fastvit":
        return 2 + (4 if type(block).__name__ == "AttentionBlock" else 0)
    if family == "hf-t5":
        return 4 + len([n for n in ("wi", "wi_0", "wi_1") if hasattr(block.layer[1].DenseReluDense, n)]) + 1
    return 4 + gated_in + 1


def _expected(model: nn.Module, tower: str, config: dict) -> int:
    family = family_of(model, tower).name
    blocks = [model.get_submodule(p) for p in block_paths(model, tower)]
    cfg = config["vision_cfg" if tower == "vision" else "text_cfg"]
    depth = cfg.get("layers")
    if family == "resnet":
        assert len(blocks) == sum(depth)
        return 2 * len(blocks) + 4  # default targets: c_fc=conv1, c_proj=conv3, and the pool's q, k, v, out
    if family in ("vit", "text"):
        assert len(blocks) == depth
    if family.startswith("hf-"):
        hf = model.text.config
        assert len(blocks) == next(getattr(hf, a) for a in ("num_hidden_layers", "num_layers", "encoder_layers")
                                   if hasattr(hf, a))
    return sum(_per_block(family, b) for b in blocks)


@pytest.mark.usefixtures("hf_text_configs")
def test_every_open_clip_model_gets_default_lora_in_both_towers():
    failures = []
    for name in open_clip.list_models():
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, device="meta", pretrained_text=False)
        convert_attention(model)
        config = open_clip.get_model_config(name)
        for tower in ("vision", "text"):
            try:
                found = len(lora_target_names(model, ClipLoraConfig(towers=[tower])))
                want = _expected(model, tower, config)
            except (ValueError, AssertionError) as e:
                failures.append(f"{name} {tower}: {e}")
                continue
            if found != want or not found:
                failures.append(f"{name} {tower} ({family_of(model, tower).name}): {found} LoRA layers, want {want}")
    assert not failures, "\n".join(failures)


# Tiny local configs, one per family (H7's peftclip-tiny-* configs).
TINY = {"vit": "peftclip-tiny", "timm-vit(siglip)": "peftclip-tiny-siglip",
        "timm-vit(eva02)": "peftclip-tiny-eva", "timm-convnext": "peftclip-tiny-convnext",
        "resnet": "peftclip-tiny-resnet", "hf-roberta": "peftclip-tiny-hftext"}
ALL_TARGETS = ClipLoraConfig(target_modules=["q", "k", "v", "out", "c_fc", "c_proj", "conv2"], r=2, lora_alpha=3.0)


def _load(name: str):
    base = load_base(BaseConfig(model_name=name))
    texts = base.tokenizer(["a photo of a red circle", "two dogs playing in the snow"])
    return base, image_batch(base.model), texts


def _reference(converted: nn.Module, peft_model, config: ClipLoraConfig) -> nn.Module:
    """A copy of the converted base whose adapted weights are W + B·A·alpha/r (convolutions: B·A over (in, kh, kw))."""
    reference = copy.deepcopy(converted)
    for name in lora_target_names(reference, config):
        layer = peft_model.get_base_model().get_submodule(name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        weight = reference.get_submodule(name).weight
        with torch.no_grad():
            weight += (b.flatten(1) @ a.flatten(1)).view_as(weight) * (config.lora_alpha / config.r)
    return reference


@pytest.mark.usefixtures("tiny_hub")
@pytest.mark.parametrize("family", list(TINY))
def test_lora_on_each_family_equals_hand_built_reference(family):
    base, images, texts = _load(TINY[family])
    model = base.model
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(texts)
    convert_attention(model)
    converted = copy.deepcopy(model)
    with torch.no_grad():
        after = converted.encode_image(images), converted.encode_text(texts)
    for b, a in zip(before, after):
        assert torch.allclose(b, a, atol=TOL, rtol=0), f"conversion changed outputs by {(b - a).abs().max()}"
    peft_model = apply_lora(model, ALL_TARGETS, init_lora_weights=False)
    reference = _reference(converted, peft_model, ALL_TARGETS)
    with torch.no_grad():
        for encode, inputs, plain in (("encode_image", images, after[0]), ("encode_text", texts, after[1])):
            got, want = getattr(peft_model, encode)(inputs), getattr(reference, encode)(inputs)
            assert torch.allclose(got, want, atol=TOL, rtol=0), f"{encode}: {(got - want).abs().max()}"
            # not allclose: ConvNeXt's layer scale starts at 1e-6, so its blocks (and their LoRA) barely move outputs
            assert not torch.equal(got, plain), f"{encode}: the adapter had no effect"


@pytest.mark.usefixtures("tiny_hub")
@pytest.mark.parametrize("family", list(TINY))
def test_one_lora_step_changes_only_lora_parameters(family):
    base, images, texts = _load(TINY[family])
    model = apply_lora(base.model, ClipLoraConfig(r=2), init_lora_weights=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    image_features, text_features, scale = model(images, texts)[:3]
    ContrastiveLoss()(image_features, text_features, scale).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed - {n for n in changed if "lora_" in n})
    towers = {"vision" if ".visual." in n else "text" for n in changed}
    assert towers == {"vision", "text"}


def test_a_target_the_family_lacks_names_the_family_and_its_targets():
    base = load_base(BaseConfig(model_name="peftclip-tiny-convnext"))
    with pytest.raises(ValueError, match=r"timm-convnext vision tower has none of the LoRA targets \['q'\]"):
        apply_lora(base.model, ClipLoraConfig(towers=["vision"], target_modules=["q"]))


@pytest.mark.usefixtures("tiny_hub")
@pytest.mark.parametrize("family", list(TINY))
def test_partial_strategies_find_each_familys_blocks_norms_and_projections(family):
    base, images, texts = _load(TINY[family])
    model = base.model
    convert_attention(model)
    config = PartialConfig(projections=True, last_blocks=1, final_norms=True, logit_scale=True)
    chosen = set(apply_partial(model, config))
    wanted = {"logit_scale"}
    for tower in ("vision", "text"):
        last = block_paths(model, tower)[-1] + "."
        parts = [last, *(n + "." for n in final_norm_names(model, tower))]
        projection = projection_name(model, tower)
        wanted |= {n for n, _ in model.named_parameters()
                   if n.startswith(tuple(parts)) or n == projection or n.startswith(f"{projection}.")}
        assert any(n.startswith(last) for n in chosen), f"{tower}: last block not trained"
    assert chosen == wanted


def test_new_proj_dim_on_a_module_projection_names_the_family():
    base = load_base(BaseConfig(model_name="peftclip-tiny-convnext"))
    with pytest.raises(ValueError, match="timm-convnext vision tower is a Linear"):
        apply_partial(base.model, PartialConfig(new_proj_dim=8))


QKV = ClipLoraConfig(target_modules=["qkv", "out"], r=2, lora_alpha=3.0)


@pytest.mark.usefixtures("tiny_hub")
@pytest.mark.parametrize("family", ["vit", "timm-vit(siglip)"])
def test_fused_qkv_lora_equals_hand_built_reference_and_exports_to_open_clip(family):
    base, images, texts = _load(TINY[family])
    model = base.model
    plain = copy.deepcopy(model)
    convert_attention(model, fused_qkv=True)
    converted = copy.deepcopy(model)
    peft_model = apply_lora(model, QKV, init_lora_weights=False)
    assert all(n.endswith("qkv") or n.endswith("qkv_proj") or n.endswith(("out_proj", "proj"))
               for n in lora_target_names(model, QKV))
    reference = _reference(converted, peft_model, QKV)
    peft_model.base_model.merge_adapter()
    plain.load_state_dict(export_open_clip_state_dict(peft_model.get_base_model()))  # merged, open_clip's layout
    with torch.no_grad():
        for encode, inputs in (("encode_image", images), ("encode_text", texts)):
            got, want = getattr(peft_model, encode)(inputs), getattr(reference, encode)(inputs)
            assert torch.allclose(got, want, atol=TOL, rtol=0), f"{encode}: {(got - want).abs().max()}"
            exported = getattr(plain, encode)(inputs)
            assert torch.allclose(exported, want, atol=TOL, rtol=0), f"{encode}: {(exported - want).abs().max()}"


@pytest.mark.usefixtures("tiny_hub")
def test_fused_qkv_on_eva_is_refused_by_name():
    base, _, _ = _load(TINY["timm-vit(eva02)"])
    with pytest.raises(ValueError, match="EVA attention .* target q, k and v instead of qkv"):
        apply_lora(base.model, ClipLoraConfig(towers=["vision"], target_modules=["qkv"]))


def test_adapted_split_attention_is_refused_when_fused(tiny_base):
    model = apply_lora(tiny_base.model, ClipLoraConfig(target_modules=["q", "v"])).get_base_model()
    with pytest.raises(ValueError, match="already holds adapters on split q, k, v"):
        convert_attention(model, fused_qkv=True)
