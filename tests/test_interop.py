"""PEFT interop: peftclip folders in plain PEFT, plain PEFT LoRA folders imported into peftclip."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import open_clip
import peft
import pytest
import torch

import peftclip.interop  # noqa: F401  (registers the tiny config, as peftclip.models does)
from peftclip.adapters.lora import ClipLoraConfig, apply_lora, lora_target_names
from peftclip.adapters.partial import PartialConfig
from peftclip.adapters.strategy import AdapterSpec, apply_strategy
from peftclip.cli import main
from peftclip.interop import import_peft_adapter, prepare_for_peft
from peftclip.io import AdapterError, load_adapter, save_adapter
from peftclip.models import BaseConfig, load_base
from tests.conftest import image_batch, text_batch

TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]

REGEX_CASES = [
    ClipLoraConfig(),
    ClipLoraConfig(towers=["vision"], blocks=1, target_modules=["q", "c_fc"]),
    ClipLoraConfig(towers=["text"], blocks=[0, -1], target_modules=["out"]),
    ClipLoraConfig(blocks=[1], target_modules=["k", "v", "c_proj"]),
]


def _adapted(model: torch.nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}


def _features(model, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def _assert_same(got, want) -> None:
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=TOL, rtol=0), (g - w).abs().max()


@pytest.mark.parametrize("config", REGEX_CASES, ids=repr)
def test_compact_regex_adapts_exactly_the_named_layers(any_base, config):
    model = prepare_for_peft(any_base.model)
    names = set(lora_target_names(model, config))
    peft_model = apply_lora(model, config)
    assert _adapted(peft_model) == names
    assert len(peft_model.peft_config["default"].target_modules) < 200


def _save(tmp_path: Path, config: ClipLoraConfig, partial: PartialConfig | None = None) -> tuple[Path, torch.nn.Module]:
    """A peftclip adapter with non-zero LoRA on the tiny base; returns the folder and the adapted model."""
    base = load_base(BaseConfig())
    spec = AdapterSpec(lora=config, partial=partial)
    model, _ = apply_strategy(base.model, spec, base.tokenizer, init_lora_weights=False)
    if partial is not None:
        with torch.no_grad():
            model.get_base_model().logit_scale.add_(1.0)
    return save_adapter(model, tmp_path / "adapter", base.info, spec.to_dict()), model


def _plain_tiny() -> torch.nn.Module:
    torch.manual_seed(0)  # load_base's default init seed
    return open_clip.create_model("peftclip-tiny", pretrained=None)


def _peft_load(model, folder) -> tuple[torch.nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, str(folder))
    return loaded, [str(w.message) for w in caught]


@pytest.mark.parametrize("targets", [["q", "c_fc"], ["out", "c_proj"], ["k", "v"]])
def test_plain_peft_warns_on_an_unprepared_model(tmp_path, targets):
    folder, _ = _save(tmp_path, ClipLoraConfig(target_modules=targets))
    try:
        _, messages = _peft_load(_plain_tiny(), folder)
    except ValueError as e:  # nothing matches at all: PEFT refuses
        messages = [str(e)]
    assert any("prepare_for_peft" in m or "not found in the base model" in m for m in messages), messages
    _, messages = _peft_load(prepare_for_peft(_plain_tiny()), folder)
    assert not any("peftclip" in m for m in messages), messages


@pytest.mark.parametrize("config", [ClipLoraConfig(), ClipLoraConfig(target_modules=["c_fc", "c_proj"])], ids=repr)
def test_prepared_plain_peft_gives_load_adapter_outputs(tmp_path, config):
    folder, _ = _save(tmp_path, config)
    want_base = load_base(BaseConfig())
    images, texts = image_batch(want_base.model), text_batch(want_base)
    want = _features(load_adapter(want_base, folder), images, texts)
    plain = _plain_tiny()
    if config.target_modules == ["c_fc", "c_proj"]:  # MLP-only: no split needed
        got, messages = _peft_load(plain, folder)
        assert not any("peftclip" in m for m in messages)
    else:
        got, _ = _peft_load(prepare_for_peft(plain), folder)
    _assert_same(_features(got.eval(), images, texts), want)


def test_plain_peft_warns_about_tensors_it_does_not_load(tmp_path):
    folder, _ = _save(tmp_path, ClipLoraConfig(target_modules=["c_fc"]),
                      PartialConfig(projections=True, logit_scale=True))
    _, messages = _peft_load(prepare_for_peft(_plain_tiny()), folder)
    assert any("logit_scale" in m and "text_projection" in m and "peftclip.load_adapter" in m for m in messages)


def test_readme_plain_peft_block_matches_load_adapter(tmp_path, monkeypatch):
    """The README's plain-PEFT block, run as written on the tiny base, gives load_adapter's features."""
    from PIL import Image
    text = (REPO / "README.md").read_text()
    section = text.split("## Using a peftclip adapter from plain PEFT", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "peft.PeftModel.from_pretrained(peftclip.prepare_for_peft(" in block
    (tmp_path / "outputs").mkdir()
    _save(tmp_path / "outputs", ClipLoraConfig(target_modules=["q", "out", "c_fc"]))
    (tmp_path / "outputs" / "adapter").rename(tmp_path / "outputs" / "lora_retrieval")
    for name, colour in (("a.jpg", "red"), ("b.jpg", "blue")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    base = load_base(BaseConfig())
    images = torch.stack([base.preprocess_val(Image.open(tmp_path / n).convert("RGB")) for n in ("a.jpg", "b.jpg")])
    want = load_adapter(base, tmp_path / "outputs" / "lora_retrieval")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    with torch.no_grad():
        expected = want.encode_image(images, normalize=True)
    assert torch.allclose(namespace["features"], expected, atol=TOL, rtol=0)


def _peft_on_plain(target_modules: list[str], out: Path) -> torch.nn.Module:
    """A plain open_clip tiny model with PEFT's own LoRA (non-zero B), saved by save_pretrained."""
    model = peft.get_peft_model(_plain_tiny(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=target_modules,
                                                               init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B everywhere, out_proj included
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(str(out))
    return model.eval()


IMPORT_CASES = [(["c_fc", "c_proj"], False), (["attn"], True)]


@pytest.mark.parametrize(("targets", "warns"), IMPORT_CASES)
def test_import_reproduces_the_peft_model(tmp_path, targets, warns):
    peft_model = _peft_on_plain(targets, tmp_path / "peft")
    base = load_base(BaseConfig())
    images, texts = image_batch(base.model), text_batch(base)
    want = _features(peft_model, images, texts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = import_peft_adapter(tmp_path / "peft", base, tmp_path / "imported")
    assert any("applies its out_proj update twice" in str(w.message) for w in caught) == warns
    fresh = load_base(BaseConfig())
    got = _features(load_adapter(fresh, folder), images, texts)
    _assert_same(got, want)


def test_apply_lora_save_pretrained_imports_and_loads(tmp_path):
    base = load_base(BaseConfig())
    config = ClipLoraConfig(towers=["vision"], blocks=1, target_modules=["q", "v", "c_proj"], r=3)
    model = apply_lora(base.model, config, init_lora_weights=False)
    model.save_pretrained(str(tmp_path / "peft"))
    images, texts = image_batch(base.model), text_batch(base)
    want = _features(model.eval(), images, texts)
    with pytest.raises(AdapterError, match="import-peft"):
        load_adapter(load_base(BaseConfig()), tmp_path / "peft")
    assert main(["import-peft", str(tmp_path / "peft"), "--model-name", "peftclip-tiny",
                 "--out", str(tmp_path / "imported")]) == 0
    fresh = load_base(BaseConfig())
    _assert_same(_features(load_adapter(fresh, tmp_path / "imported"), images, texts), want)


def test_import_refuses_layers_no_lora_config_describes(tmp_path):
    peft.get_peft_model(_plain_tiny(), peft.LoraConfig(
        r=2, target_modules=["visual.transformer.resblocks.0.mlp.c_fc", "transformer.resblocks.1.mlp.c_proj"],
    )).save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(AdapterError, match="not one set of blocks"):
        import_peft_adapter(tmp_path / "peft", load_base(BaseConfig()), tmp_path / "imported")
    assert main(["import-peft", str(tmp_path / "peft"), "--model-name", "peftclip-tiny",
                 "--out", str(tmp_path / "imported")]) == 2


VARIANT_CASES = [dict(use_dora=True), dict(use_rslora=True), dict(use_dora=True, use_rslora=True)]


@pytest.mark.parametrize("variant", VARIANT_CASES, ids=str)
def test_plain_peft_dora_and_rslora_import_and_export_keep_the_variant(tmp_path, variant):
    """A DoRA / rsLoRA adapter made by plain PEFT on a prepared open_clip model round-trips through peftclip."""
    targets = ["visual.transformer.resblocks.0.attn.q_proj", "visual.transformer.resblocks.0.attn.v_proj",
               "transformer.resblocks.0.attn.q_proj", "transformer.resblocks.0.attn.v_proj",
               "visual.transformer.resblocks.1.attn.q_proj", "visual.transformer.resblocks.1.attn.v_proj",
               "transformer.resblocks.1.attn.q_proj", "transformer.resblocks.1.attn.v_proj"]
    model = peft.get_peft_model(prepare_for_peft(_plain_tiny()), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False, **variant))
    torch.manual_seed(2)
    with torch.no_grad():  # move B and DoRA's magnitudes off their start
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(tmp_path / "peft"))
    base = load_base(BaseConfig())
    images, texts = image_batch(base.model), text_batch(base)
    want = _features(model.eval(), images, texts)
    folder = import_peft_adapter(tmp_path / "peft", base, tmp_path / "imported")
    lora = json.loads((folder / "peftclip_config.json").read_text())["strategy"]["lora"]
    assert {k: lora[k] for k in variant} == variant
    _assert_same(_features(load_adapter(load_base(BaseConfig()), folder), images, texts), want)
    exported, _ = _peft_load(prepare_for_peft(_plain_tiny()), folder)  # peftclip's folder back in plain PEFT
    assert all(getattr(exported.peft_config["default"], k) == v for k, v in variant.items())
    _assert_same(_features(exported.eval(), images, texts), want)

