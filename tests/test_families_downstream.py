"""Every tiny open_clip family goes the whole way: save/load, AdaptedCLIP, merge, scale and plain export."""

from __future__ import annotations

import importlib
from pathlib import Path

import huggingface_hub
import open_clip
import peft
import pytest
import torch

from peftclip import io
from peftclip.adapters.lora import ClipLoraConfig, apply_lora
from peftclip.adapters.partial import PartialConfig
from peftclip.adapters.strategy import AdapterSpec, apply_strategy
from peftclip.cache import FeatureCache, cache_frozen_towers, tower_modes
from peftclip.data import DataConfig, TrainPairs, load_pairs
from peftclip.families import projection_name
from peftclip.inference import AdaptedCLIP
from peftclip.interop import import_peft_adapter
from peftclip.io import AdapterError, load_adapter, save_adapter
from peftclip.models import BaseConfig, load_base
from peftclip.synthetic import make_shapes_dataset
from peftclip.train import TrainConfig, create_accelerator, train
from tests.conftest import image_batch
from tests.hf_cache import fill_hub_cache

TOL = 1e-5
MERGED_TOL = 1e-4  # (W + s·BA)x rounds differently from Wx + s·B(Ax)
FAMILIES = ["peftclip-tiny", "peftclip-tiny-siglip", "peftclip-tiny-convnext", "peftclip-tiny-resnet",
            "peftclip-tiny-eva", "peftclip-tiny-hftext"]
SPECS = {"lora": AdapterSpec(lora=ClipLoraConfig(r=2)),
         "projections": AdapterSpec(partial=PartialConfig(projections=True))}
TEXTS = ["a red circle", "two dogs playing in the snow"]


@pytest.fixture(scope="module", autouse=True)
def offline_hub(tmp_path_factory):
    """The tiny tokenizer and HF text config in an offline hub cache, for SigLIP and HF-text families."""
    hub_cache = tmp_path_factory.mktemp("hub")
    fill_hub_cache(hub_cache)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def _outputs(model, tokenizer) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return {"image": model.encode_image(image_batch(model)), "text": model.encode_text(tokenizer(TEXTS))}


def _close(got, want, atol=TOL) -> bool:
    return all(torch.allclose(got[k], want[k], atol=atol, rtol=0) for k in want)


def _trained(name: str, spec: AdapterSpec, folder, seed: int):
    """Save an adapter of `spec` with random non-zero weights on `name`; returns its folder and outputs."""
    torch.manual_seed(seed)
    base = load_base(BaseConfig(model_name=name))
    model, tokenize = apply_strategy(base.model, spec, base.tokenizer, init_lora_weights=False)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return save_adapter(model, folder, base.info, spec.to_dict()), _outputs(model, tokenize)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(model name, {strategy: (folder, outputs)}, bare base outputs) for one tiny family."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    saved = {kind: _trained(name, spec, folder / kind, seed) for seed, (kind, spec) in enumerate(SPECS.items())}
    base = load_base(BaseConfig(model_name=name))
    return name, saved, _outputs(base.model, base.tokenizer)


@pytest.mark.parametrize("kind", list(SPECS))
def test_a_saved_adapter_reloads_onto_a_fresh_base_to_the_same_outputs(family, kind):
    name, saved, base_outputs = family
    base = load_base(BaseConfig(model_name=name))
    got = _outputs(load_adapter(base, saved[kind][0]), base.tokenizer)
    assert _close(got, saved[kind][1])
    assert not _close(got, base_outputs)  # the adapter really changes something


def test_adapted_clip_switches_merges_scales_and_exports_a_plain_open_clip_checkpoint(family, tmp_path):
    name, saved, base_outputs = family
    clip = AdaptedCLIP(load_base(BaseConfig(model_name=name)))
    for kind in SPECS:
        clip.load_adapter(saved[kind][0], kind)
    for kind in [*SPECS, None, "lora"]:
        with clip.using(kind) as model:
            assert _close(_outputs(model, clip.tokenizer()), saved[kind][1] if kind else base_outputs), kind

    clip.merge("lora")
    with clip.using("lora") as model:
        merged = _outputs(model, clip.tokenizer())
    assert _close(merged, saved["lora"][1], atol=MERGED_TOL)
    path = clip.export_merged("lora", tmp_path / "merged.safetensors")
    clip.unmerge()
    with clip.using("lora") as model:
        assert _close(_outputs(model, clip.tokenizer()), saved["lora"][1])

    clip.set_scale("lora", 0.5)
    with clip.using("lora") as model:
        half = _outputs(model, clip.tokenizer())
    assert not _close(half, saved["lora"][1]) and not _close(half, base_outputs)
    clip.set_scale("lora", 1.0)
    with clip.using("lora") as model:
        assert _close(_outputs(model, clip.tokenizer()), saved["lora"][1])

    plain, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(path))  # no peftclip conversion
    assert _close(_outputs(plain, open_clip.get_tokenizer(name)), merged)


def test_a_rank_above_a_layer_width_warns_naming_the_layer():
    base = load_base(BaseConfig(model_name="peftclip-tiny"))
    width = base.model.visual.transformer.resblocks[0].attn.out_proj.in_features
    with pytest.warns(UserWarning, match=rf"r={width + 1} is larger .* visual\.transformer\.resblocks\.0\.attn\.q_proj "
                                         rf"\(width {width}\)"):
        apply_lora(base.model, ClipLoraConfig(r=width + 1, towers=["vision"]))


SIGLIP = "peftclip-tiny-siglip"
CACHE_CASES = {"vision_lora": (["vision"], {"vision": "live", "text": "full"}),
               "text_lora": (["text"], {"vision": "full", "text": "live"})}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    source = make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=24)
    return load_pairs(DataConfig(source=str(source), val_fraction=0.2))[0]


def _train_siglip(pairs, towers: list[str], cached: bool, folder) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    base = load_base(BaseConfig(model_name=SIGLIP))
    model, tokenize = apply_strategy(base.model, AdapterSpec(lora=ClipLoraConfig(r=2, towers=towers)), base.tokenizer)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = TrainPairs(pairs, base.preprocess_val, tokenize, seed=0)
    train_model = model
    if cached:
        train_model, data = cache_frozen_towers(model, data, base.info, augment=False, cache=FeatureCache())
        assert train_model.modes == CACHE_CASES["text_lora" if towers == ["text"] else "vision_lora"][1]
    config = TrainConfig(output_dir=str(folder), batch_size=8, epochs=1, lr=1e-2, warmup_steps=0, num_workers=0,
                         cpu=True)
    losses = train(train_model, data, config, create_accelerator(config)).losses
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(trained[n], initial[n]) for n in trained), "training changed nothing"
    return losses, trained


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_siglip_towers_are_cached_only_when_frozen_and_cached_training_matches_uncached(pairs, case, tmp_path):
    towers, modes = CACHE_CASES[case]
    base = load_base(BaseConfig(model_name=SIGLIP))
    model, _ = apply_strategy(base.model, AdapterSpec(lora=ClipLoraConfig(r=2, towers=towers)), base.tokenizer)
    assert tower_modes(model) == modes  # SigLIP's `text.` tower with LoRA is live, not cached
    plain_losses, plain = _train_siglip(pairs, towers, cached=False, folder=tmp_path / "plain")
    cached_losses, cached = _train_siglip(pairs, towers, cached=True, folder=tmp_path / "cached")
    assert cached_losses == pytest.approx(plain_losses, abs=1e-4)
    assert all(torch.allclose(cached[n], plain[n], atol=1e-4) for n in plain)


def test_a_trainable_module_projection_keeps_its_tower_live():
    base = load_base(BaseConfig(model_name=SIGLIP))
    model, _ = apply_strategy(base.model, AdapterSpec(partial=PartialConfig(projections=True)), base.tokenizer)
    assert isinstance(model.get_submodule(projection_name(model, "text")), torch.nn.Linear)  # not a matrix
    assert tower_modes(model) == {"vision": "full", "text": "live"}  # SigLIP's vision tower has no projection


RECIPE_CASES = {"siglip_retrieval": ("lora_retrieval", SIGLIP), "convnext_retrieval": ("lora_retrieval",
                "peftclip-tiny-convnext"), "resnet_retrieval": ("lora_retrieval", "peftclip-tiny-resnet"),
                "eva_classify": ("classify", "peftclip-tiny-eva")}
# The ResNet case also checks that training keeps frozen BatchNorm statistics (which no adapter holds) still.
@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipes_train_every_family_with_default_flags_and_the_adapter_reloads(case, tmp_path, monkeypatch):
    recipe_name, name = RECIPE_CASES[case]
    recipe = importlib.import_module(f"peftclip.recipes.{recipe_name}")
    monkeypatch.setenv("PEFTCLIP_CACHE", str(tmp_path / "cache"))
    tokenizer, saved = open_clip.get_tokenizer(name), {}

    def recording_save(model, output_dir, *args, **kwargs):
        was_training = model.training
        saved[Path(output_dir)] = _outputs(model, tokenizer)
        model.train(was_training)
        return io.save_adapter(model, output_dir, *args, **kwargs)

    monkeypatch.setattr(recipe, "save_adapter", recording_save)
    shapes = make_shapes_dataset(tmp_path / "shapes", n_images=32)
    source = shapes / "labels.csv" if recipe_name == "classify" else shapes
    out = tmp_path / "out"
    metrics = recipe.main(["--source", str(source), "--output-dir", str(out), "--max-steps", "2", "--batch-size",
                           "8", "--num-workers", "0", "--cpu", "--model-name", name])
    assert metrics["steps"] == 2
    base = load_base(BaseConfig(model_name=name))
    assert _close(_outputs(load_adapter(base, out), base.tokenizer), saved[out])


def test_importing_a_plain_peft_adapter_on_a_non_native_tower_is_refused_by_name(tmp_path):
    base = load_base(BaseConfig(model_name="peftclip-tiny-convnext"))
    layer = "visual.trunk.stages.0.blocks.0.mlp.fc1"
    plain = open_clip.create_model("peftclip-tiny-convnext")
    peft.get_peft_model(plain, peft.LoraConfig(r=2, target_modules=[layer])).save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterError, match=rf"{layer}, in the timm-convnext vision tower; .* native ViT and text"):
        import_peft_adapter(tmp_path / "peft", base, tmp_path / "imported")
