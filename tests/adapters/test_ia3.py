"""IA³ through PEFT: l ⊙ (W x) on attention targets, W (l ⊙ x) on feed-forward ones; trains, saves, switches, merges."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch

from peftclip.adapters.attention import convert_attention
from peftclip.adapters.ia3 import ClipIA3Config, apply_ia3, ia3_target_names
from peftclip.adapters.lora import ClipLoraConfig
from peftclip.adapters.strategy import AdapterSpec, apply_strategy
from peftclip.inference import AdaptedCLIP
from peftclip.io import ADAPTER_CONFIG_NAME, AdapterError, load_adapter, save_adapter
from peftclip.models import load_base
from peftclip.recipes import classify, lora_retrieval
from peftclip.train import TrainConfig, create_optimizer
from tests.conftest import image_batch, text_batch

TOL = 1e-5
MERGED_TOL = 1e-4  # (l ⊙ W) x rounds differently from l ⊙ (W x)
CONFIG = dict(ia3_target_modules=["q", "v", "out", "c_fc", "c_proj"])


def _encode(model, base):
    with torch.no_grad():
        model.eval()
        return torch.cat([model.encode_image(image_batch(model)), model.encode_text(text_batch(base))])


def _perturbed(model, seed: int):
    """`model` with its trainable IA³ vectors moved off their initial ones (so l is not all ones)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    return model


def _trained(seed: int, config: ClipIA3Config):
    """(base, IA³ model with random vectors, the spec) on a fresh tiny base."""
    base = load_base()
    spec = AdapterSpec(ia3=config)
    model, _ = apply_strategy(base.model, spec, base.tokenizer)
    return base, _perturbed(model, seed), spec


def test_outputs_equal_hand_built_rescaled_weights(tiny_base):
    config = ClipIA3Config(**CONFIG)
    convert_attention(tiny_base.model)
    original = copy.deepcopy(tiny_base.model)
    model = _perturbed(apply_ia3(tiny_base.model, config), seed=1)
    reference = copy.deepcopy(original)
    names, feedforward = ia3_target_names(original, config)
    assert feedforward and set(feedforward) < set(names)
    with torch.no_grad():
        for name in names:
            scale = model.get_base_model().get_submodule(name).ia3_l["default"].flatten()
            target = reference.get_submodule(name)
            if name in feedforward:  # W (l ⊙ x): l scales the input columns
                target.weight.mul_(scale[None, :])
            else:  # l ⊙ (W x + b): l scales the output rows and the bias
                target.weight.mul_(scale[:, None])
                target.bias.mul_(scale)
    got, want = _encode(model, tiny_base), _encode(reference, tiny_base)
    assert torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()
    assert not torch.allclose(got, _encode(original, tiny_base), atol=1e-3), "IA³ had no effect"


def test_default_targets_are_the_papers_keys_values_and_mlp_output(tiny_base):
    model = apply_ia3(tiny_base.model, ClipIA3Config())
    names, feedforward = ia3_target_names(tiny_base.model, ClipIA3Config())
    assert {n.rpartition(".")[2] for n in names} == {"k_proj", "v_proj", "c_proj"}
    assert {n.rpartition(".")[2] for n in feedforward} == {"c_proj"}
    assert _encode(model, tiny_base).isfinite().all()
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "ia3_l" in n)


def test_one_step_changes_only_ia3_vectors_in_their_own_group(tiny_base):
    model = apply_ia3(tiny_base.model, ClipIA3Config(**CONFIG))
    optimizer = create_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    assert {g["name"] for g in optimizer.param_groups} == {"ia3"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    image, text = model.encode_image(image_batch(model)), model.encode_text(text_batch(tiny_base))
    (image @ text.T).sum().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    ia3 = {n for n in before if "ia3_l" in n}
    assert changed == ia3, sorted(changed ^ ia3)[:3]


def test_lora_and_ia3_together_are_refused_by_name():
    with pytest.raises(ValueError, match="LoRA and --ia3 contradict.*both wrap the model through PEFT; pick one"):
        AdapterSpec(lora=ClipLoraConfig(), ia3=ClipIA3Config())


@pytest.mark.parametrize("field,value,message", [
    ("ia3_target_modules", ["qk"], "unknown LoRA target 'qk'"),
    ("ia3_towers", ["audio"], "unknown tower 'audio'"),
    ("ia3_blocks", 0, "blocks=0"),
])
def test_bad_config_is_refused_naming_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        ClipIA3Config(**{field: value})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two IA³ adapters (different targets and vectors) and a LoRA one, saved, with their outputs."""
    folder, out = tmp_path_factory.mktemp("ia3"), {}
    for seed, (name, config) in enumerate({"ia3": ClipIA3Config(**CONFIG),
                                           "ia3_vision": ClipIA3Config(ia3_towers="vision")}.items()):
        base, model, spec = _trained(seed, config)
        out[name] = save_adapter(model, folder / name, base.info, spec.to_dict()), _encode(model, base)
    base = load_base()
    spec = AdapterSpec(lora=ClipLoraConfig(r=2))
    model, _ = apply_strategy(base.model, spec, base.tokenizer, init_lora_weights=False)
    out["lora"] = save_adapter(model, folder / "lora", base.info, spec.to_dict()), _encode(model, base)
    return out


def test_saves_peft_ia3_config_and_loads_to_the_same_outputs(saved):
    folder, want = saved["ia3"]
    assert json.loads((folder / ADAPTER_CONFIG_NAME).read_text())["peft_type"] == "IA3"
    base = load_base()
    assert torch.allclose(_encode(load_adapter(base, folder), base), want, atol=TOL, rtol=0)


def test_a_lora_config_under_an_ia3_strategy_is_refused(saved, tmp_path):
    folder = tmp_path / "swapped"
    folder.mkdir()
    for path in saved["ia3"][0].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / ADAPTER_CONFIG_NAME).write_bytes((saved["lora"][0] / ADAPTER_CONFIG_NAME).read_bytes())
    with pytest.raises(AdapterError, match="not a PEFT IA3 config, which strategy 'ia3' needs"):
        load_adapter(load_base(), folder)


def test_adapted_clip_switches_between_ia3_adapters_and_the_base(saved):
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(saved["ia3"][0], "ia3")
    clip.load_adapter(saved["ia3_vision"][0], "ia3_vision")
    base = load_base()
    bare = _encode(base.model, base)
    for name in ("ia3", "ia3_vision", None, "ia3"):
        clip.set_adapter(name)
        want = saved[name][1] if name else bare
        assert torch.allclose(_encode(clip.model, clip.base), want, atol=TOL, rtol=0), name


@pytest.mark.parametrize("order", [["lora", "ia3", "ia3_vision"], ["ia3", "lora", "ia3_vision"]], ids=str)
def test_adapted_clip_switches_between_ia3_and_lora_on_one_base(saved, order):
    # One PeftModel per tuner type over the same layers (IA³ around LoRA or LoRA around IA³), each type
    # enabled only while one of its adapters is active.
    clip = AdaptedCLIP(load_base())
    for name in order:
        clip.load_adapter(saved[name][0], name)
    base = load_base()
    bare = _encode(base.model, base)
    for name in [*order, None, *order[::-1], "lora"]:
        clip.set_adapter(name)
        want = saved[name][1] if name else bare
        assert torch.allclose(_encode(clip.model, clip.base), want, atol=TOL, rtol=0), name


def test_mixed_base_deletes_merges_and_exports_each_type(saved, tmp_path):
    clip = AdaptedCLIP(load_base())
    for name in ("ia3", "lora", "ia3_vision"):
        clip.load_adapter(saved[name][0], name)
    clip.merge("lora")  # IA³ layers stay disabled around (or inside) the merged LoRA ones
    assert torch.allclose(_encode(clip.model, clip.base), saved["lora"][1], atol=MERGED_TOL, rtol=0)
    with pytest.raises(ValueError, match="merged; unmerge"):
        clip.set_adapter("ia3")
    clip.unmerge()
    for name in ("ia3", "lora"):
        path = clip.export_merged(name, tmp_path / f"{name}.safetensors")
        plain, _, _ = open_clip.create_model_and_transforms("peftclip-tiny", pretrained=str(path))
        assert torch.allclose(_encode(plain, clip.base), saved[name][1], atol=MERGED_TOL, rtol=0), name
    clip.delete_adapter("ia3")
    for name in ("lora", "ia3_vision", "lora"):
        clip.set_adapter(name)
        assert torch.allclose(_encode(clip.model, clip.base), saved[name][1], atol=MERGED_TOL, rtol=0), name


def test_merge_and_export_give_the_adapters_outputs(saved, tmp_path):
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(saved["ia3"][0], "ia3")
    clip.merge("ia3")
    assert torch.allclose(_encode(clip.model, clip.base), saved["ia3"][1], atol=MERGED_TOL, rtol=0)
    clip.unmerge()
    path = clip.export_merged("ia3", tmp_path / "merged.safetensors")
    plain, _, _ = open_clip.create_model_and_transforms("peftclip-tiny", pretrained=str(path))
    assert torch.allclose(_encode(plain, clip.base), saved["ia3"][1], atol=MERGED_TOL, rtol=0)


def test_ia3_has_no_scale_to_interpolate(saved):
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(saved["ia3"][0], "ia3")
    with pytest.raises(ValueError, match="IA³, which PEFT cannot scale"):
        clip.set_scale("ia3", 0.5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from peftclip.synthetic import make_shapes_dataset
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n_images=40)


@pytest.mark.parametrize("recipe,source,extra", [
    (lora_retrieval, ".", []),
    (classify, "labels.csv", ["--no-head", "--val-fraction", "0.25"]),
])
def test_recipes_train_and_save_ia3(tmp_path, shapes, recipe, source, extra):
    out = tmp_path / "out"
    recipe.main(["--source", str(shapes / source), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "8",
                 "--num-workers", "0", "--cpu", "--no-lora", "--ia3", "--ia3-blocks", "1", *extra])
    model = load_adapter(load_base(), out)
    vectors = {n: p for n, p in model.named_parameters() if "ia3_l" in n}
    assert vectors and all("resblocks.1." in n for n in vectors)
    assert any(not torch.equal(p, torch.ones_like(p)) for p in vectors.values()), "IA³ did not train"
