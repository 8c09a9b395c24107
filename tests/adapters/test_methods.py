"""PEFT's LoRA variants through PEFT: DoRA, rsLoRA and PiSSA equal their formulas; LoRA+ sets B's learning rate;
PiSSA/OLoRA adapters are saved as plain rank-2r LoRA that works on the unmodified base."""

from __future__ import annotations

import copy
import json

import open_clip
import peft
import pytest
import torch
from safetensors.torch import load_file

from peftclip.adapters.attention import convert_attention
from peftclip.adapters.lora import ClipLoraConfig, apply_lora, lora_target_names
from peftclip.adapters.lora_init import INITIAL_LORA_ATTR
from peftclip.adapters.strategy import AdapterSpec, apply_strategy
from peftclip.checkpoint import trainable_state_dict
from peftclip.cli import main
from peftclip.inference import AdaptedCLIP
from peftclip.interop import prepare_for_peft
from peftclip.io import ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, load_adapter, read_metadata, save_adapter
from peftclip.models import load_base
from peftclip.train import TrainConfig, create_optimizer
from tests.conftest import image_batch, text_batch

TOL = 1e-5
CONFIG = dict(towers=["vision", "text"], target_modules=["q", "v", "c_fc"], r=4, lora_alpha=8.0)


def _encode(model, base):
    with torch.no_grad():
        return torch.cat([model.encode_image(image_batch(model)), model.encode_text(text_batch(base))])


def _adapted(base, config: ClipLoraConfig, **overrides):
    """(converted base copy, PEFT model) with random non-zero A, B and (DoRA) magnitude."""
    convert_attention(base.model)
    original = copy.deepcopy(base.model)
    model = apply_lora(base.model, config, **overrides)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return original, model


def _lora(model, name):
    layer = model.get_base_model().get_submodule(name)
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _reference(original, model, config: ClipLoraConfig, weight):
    """A plain copy of the base whose targeted weights are `weight(W, B·A, layer)`."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name in lora_target_names(reference, config):
            layer, a, b = _lora(model, name)
            target = reference.get_submodule(name)
            target.weight.copy_(weight(target.weight, b @ a, layer))
    return reference


def _dora(w, ba, layer):
    """W' = m · (W + s·BA) / ||W + s·BA||, the norm over each output's input weights (the paper's columns)."""
    directed = w + ba * (8.0 / 4)
    return layer.lora_magnitude_vector["default"].weight[:, None] * directed / directed.norm(dim=1, keepdim=True)


FORMULAS = {
    "dora": (dict(use_dora=True), _dora),
    "rslora": (dict(use_rslora=True), lambda w, ba, layer: w + ba * 8.0 / 4 ** 0.5),
}


@pytest.mark.parametrize("variant", FORMULAS)
def test_variant_outputs_equal_hand_built_formula(tiny_base, variant):
    flags, formula = FORMULAS[variant]
    config = ClipLoraConfig(**CONFIG, **flags)
    original, model = _adapted(tiny_base, config, init_lora_weights=False)
    got, want = _encode(model, tiny_base), _encode(_reference(original, model, config, formula), tiny_base)
    assert torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()
    assert not torch.allclose(got, _encode(original, tiny_base), atol=1e-3), "the variant had no effect"


def test_pissa_starts_from_the_top_r_singular_part(tiny_base):
    config = ClipLoraConfig(**CONFIG, init_lora="pissa")
    convert_attention(tiny_base.model)
    original = copy.deepcopy(tiny_base.model)
    model = apply_lora(tiny_base.model, config)
    for name in lora_target_names(original, config):
        layer, a, b = _lora(model, name)
        w = original.get_submodule(name).weight
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        update = b @ a * layer.scaling["default"]
        assert torch.allclose(update, top, atol=TOL), f"{name}: BA is not the top-4 SVD part"
        assert torch.allclose(layer.base_layer.weight + update, w, atol=TOL), f"{name}: W_res + BA != W"
    assert torch.allclose(_encode(model, tiny_base), _encode(original, tiny_base), atol=TOL)


def test_loraplus_gives_b_the_ratio_of_a_learning_rate(tiny_base):
    model = apply_lora(tiny_base.model, ClipLoraConfig(**CONFIG, loraplus_lr_ratio=16.0))
    optimizer = create_optimizer(model, TrainConfig(lr=1e-3, group_lr={"lora": 2e-3}))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"lora": 2e-3, "lora_B": 2e-3 * 16.0}
    b_params = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    in_b = {id(p) for g in optimizer.param_groups if g["name"] == "lora_B" for p in g["params"]}
    assert in_b == b_params


@pytest.mark.parametrize("value", [0.0, -2.0])
def test_loraplus_ratio_must_be_positive(value):
    with pytest.raises(ValueError, match=f"loraplus_lr_ratio={value}"):
        ClipLoraConfig(loraplus_lr_ratio=value)


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init_lora='svd'.*pissa"):
        ClipLoraConfig(init_lora="svd")


VARIANTS = {"dora": dict(use_dora=True), "rslora": dict(use_rslora=True), "pissa": dict(init_lora="pissa"),
            "olora": dict(init_lora="olora"), "pissa_rslora": dict(init_lora="pissa", use_rslora=True),
            "olora_dora": dict(init_lora="olora", use_dora=True)}
# PiSSA/OLoRA are saved as plain LoRA of rank 2r: (r, lora_alpha) as saved; rsLoRA keeps alpha/sqrt(r) with alpha·√2.
CONVERTED = {"pissa": (8, 16.0), "olora": (8, 16.0), "pissa_rslora": (8, 8.0 * 2 ** 0.5), "olora_dora": (8, 16.0)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each variant trained to random weights and saved, with its outputs."""
    folder, out = tmp_path_factory.mktemp("variants"), {}
    for name, flags in VARIANTS.items():
        base = load_base()
        spec = AdapterSpec(lora=ClipLoraConfig(**CONFIG, **flags))
        _, model = _adapted(base, spec.lora)
        out[name] = save_adapter(model, folder / name, base.info, spec.to_dict()), _encode(model, base)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_saves_and_loads_to_the_same_outputs(saved, variant):
    folder, want = saved[variant]
    base = load_base()
    assert torch.allclose(_encode(load_adapter(base, folder), base), want, atol=TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_switches_merges_and_exports_in_adapted_clip(saved, tmp_path, variant):
    base = load_base()
    plain, _ = apply_strategy(base.model, AdapterSpec(lora=ClipLoraConfig(r=2)), init_lora_weights=False)
    plain_out = _encode(plain, base)
    clip = AdaptedCLIP(load_base())
    plain_dir = save_adapter(plain, tmp_path / "plain", base.info, {"lora": ClipLoraConfig(r=2).to_dict()})
    clip.load_adapter(plain_dir, "plain")
    clip.load_adapter(saved[variant][0], "variant")
    for name, want in (("variant", saved[variant][1]), ("plain", plain_out), ("variant", saved[variant][1])):
        clip.set_adapter(name)
        assert torch.allclose(_encode(clip.model, base), want, atol=TOL), name
    clip.merge("variant")
    assert torch.allclose(_encode(clip.model, base), saved[variant][1], atol=1e-4)
    exported = clip.export_merged("variant", tmp_path / "merged.safetensors")
    plain_clip, _, _ = open_clip.create_model_and_transforms("peftclip-tiny", pretrained=str(exported))
    assert torch.allclose(_encode(plain_clip, base), saved[variant][1], atol=1e-4), "export"


@pytest.mark.parametrize("variant", CONVERTED)
def test_residual_base_inits_are_saved_as_rank_2r_lora_with_the_conversion_recorded(saved, variant):
    folder, _ = saved[variant]
    metadata = read_metadata(folder)
    r, alpha = CONVERTED[variant]
    assert metadata["converted_from"] == {"init_lora": VARIANTS[variant]["init_lora"], "r": 4, "lora_alpha": 8.0}
    lora = metadata["strategy"]["lora"]
    assert (lora["r"], lora["init_lora"]) == (r, "default") and lora["lora_alpha"] == pytest.approx(alpha)
    peft_config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    assert (peft_config["r"], peft_config["init_lora_weights"]) == (r, True)
    assert peft_config["lora_alpha"] == pytest.approx(alpha)
    assert set(peft_config["rank_pattern"].values()) == {r}
    tensors = load_file(folder / SAFETENSORS_WEIGHTS_NAME)
    assert {t.shape[0] for k, t in tensors.items() if ".lora_A." in k} == {r}
    assert {t.shape[1] for k, t in tensors.items() if ".lora_B." in k} == {r}


@pytest.mark.parametrize("variant", ["pissa", "olora_dora"])
def test_converted_adapter_loads_in_plain_peft_on_the_unmodified_base(saved, variant):
    folder, want = saved[variant]
    base = load_base()
    model = peft.PeftModel.from_pretrained(prepare_for_peft(base.model), str(folder))
    assert torch.allclose(_encode(model, base), want, atol=TOL)


def test_info_shows_the_conversion(saved, capsys):
    assert main(["info", str(saved["olora"][0])]) == 0
    out = capsys.readouterr().out
    assert "converted:  from init_lora=olora (r=4, lora_alpha=8.0) to plain LoRA" in out
    assert "init_lora=default, lora_alpha=16.0" in out and "r=8," in out


def test_an_unconverted_residual_base_adapter_loads_alone_and_is_refused_on_a_shared_base(
        saved, tmp_path, monkeypatch):
    """A folder as peftclip wrote PiSSA adapters before the conversion (trained on, and only valid for, W_res)."""
    import peftclip.io

    base = load_base()
    spec = AdapterSpec(lora=ClipLoraConfig(**CONFIG, init_lora="pissa"))
    _, model = _adapted(base, spec.lora)
    monkeypatch.setattr(peftclip.io, "_as_plain_lora", lambda m, tensors, strategy, config, name:
                        (tensors, strategy, config, None))
    folder = save_adapter(model, tmp_path / "old", base.info, spec.to_dict())
    assert torch.allclose(_encode(load_adapter(load_base(), folder), base), _encode(model, base), atol=TOL)
    with pytest.raises(ValueError, match="init_lora='pissa'.*load_adapter"):
        AdaptedCLIP(load_base()).load_adapter(folder, "old")
    monkeypatch.undo()  # saving the loaded adapter again converts it
    fresh = load_base()
    resaved = save_adapter(load_adapter(fresh, folder), tmp_path / "new", fresh.info, spec.to_dict())
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(resaved, "new")
    assert torch.allclose(_encode(clip.model, base), _encode(model, base), atol=TOL)


def test_a_residual_base_model_without_its_initial_weights_is_refused_at_save(tmp_path):
    base = load_base()
    spec = AdapterSpec(lora=ClipLoraConfig(**CONFIG, init_lora="olora"))
    model = apply_lora(base.model, spec.lora)
    delattr(model, INITIAL_LORA_ATTR)
    with pytest.raises(ValueError, match="'default' uses a PiSSA/OLoRA init.*A0, B0"):
        save_adapter(model, tmp_path / "out", base.info, spec.to_dict())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_resumed_model_converts_to_the_same_adapter(tmp_path, init):
    """Resume rebuilds the model on the original base and loads the trained A, B: A0, B0 come out the same."""
    base = load_base()
    spec = AdapterSpec(lora=ClipLoraConfig(**CONFIG, init_lora=init))
    _, model = _adapted(base, spec.lora)
    resumed, _ = apply_strategy(load_base().model, spec)
    with torch.no_grad():
        params = dict(resumed.named_parameters())
        for name, tensor in trainable_state_dict(model).items():  # what a checkpoint holds
            params[name].copy_(tensor)
    first = save_adapter(model, tmp_path / "first", base.info, spec.to_dict())
    second = save_adapter(resumed, tmp_path / "second", base.info, spec.to_dict())
    want, got = load_file(first / SAFETENSORS_WEIGHTS_NAME), load_file(second / SAFETENSORS_WEIGHTS_NAME)
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], atol=TOL) for k in want)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_recipe_trained_residual_base_adapter_gives_the_trained_outputs_on_the_unmodified_base(
        tmp_path, monkeypatch, init):
    from peftclip.recipes import lora_retrieval
    from peftclip.synthetic import make_shapes_dataset

    trained = {}

    def save(model, *args, **kwargs):
        trained["model"] = copy.deepcopy(model).eval()
        return save_adapter(model, *args, **kwargs)

    monkeypatch.setattr(lora_retrieval, "save_adapter", save)
    out = tmp_path / "out"
    lora_retrieval.main(["--source", str(make_shapes_dataset(tmp_path / "shapes", n_images=24)), "--output-dir",
                         str(out), "--max-steps", "2", "--batch-size", "8", "--num-workers", "0", "--cpu",
                         "--init-lora", init, "--lr", "1e-2", "--warmup-steps", "0"])
    base = load_base()
    assert read_metadata(out)["converted_from"]["init_lora"] == init
    want = _encode(trained["model"], base)
    clip = AdaptedCLIP(load_base())
    clip.load_adapter(out, "trained")
    assert torch.allclose(_encode(clip.model, base), want, atol=TOL)
    clip.set_adapter(None)
    assert not torch.allclose(_encode(clip.model, base), want, atol=1e-3), "training had no effect"
