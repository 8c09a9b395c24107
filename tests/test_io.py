"""Adapter folders: exact save→load, base identity, checksums, and refusal of pickles."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file as load_safetensors_file

from peftclip.adapters.lora import LoraConfig, apply_lora
from peftclip.io import (
    ADAPTER_CONFIG_NAME,
    METADATA_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterError,
    load_adapter,
    read_metadata,
    save_adapter,
)
from peftclip.models import BaseConfig, load_base
from tests.conftest import image_batch, text_batch

CONFIG = LoraConfig(r=2)


@pytest.fixture
def saved(tmp_path, tiny_base):
    """A tiny-base LoRA adapter with non-zero B, saved; returns (folder, trained model, base)."""
    model = apply_lora(tiny_base.model, CONFIG, init_lora_weights=False)
    out = save_adapter(model, tmp_path / "adapter", tiny_base.info, {"lora": CONFIG.to_dict()}, {"lr": 1e-3})
    return out, model, tiny_base


def test_folder_holds_only_peft_layout_and_metadata(saved):
    out, model, _ = saved
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME,
                                                            METADATA_NAME])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    metadata = read_metadata(out)
    assert metadata["base"] == {"model_name": "peftclip-tiny", "pretrained": None, "init_seed": 0}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert metadata["trainable_parameters"] == trainable
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["peft_type"] == "LORA"


def test_weights_file_is_under_one_percent_of_the_base(saved):
    out, model, _ = saved
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert (out / SAFETENSORS_WEIGHTS_NAME).stat().st_size < 0.01 * base_bytes


def test_load_onto_fresh_base_reproduces_outputs(saved):
    out, model, base = saved
    images, texts = image_batch(model), text_batch(base)
    loaded = load_adapter(load_base(BaseConfig()), out)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
        assert torch.allclose(loaded.encode_text(texts), model.encode_text(texts), atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_wrong_base_names_both_bases(saved):
    out, _, _ = saved
    with pytest.raises(AdapterError, match=r"trained on base .*init_seed=0.*loaded base is .*init_seed=1"):
        load_adapter(load_base(BaseConfig(init_seed=1)), out)


def test_truncated_weights_fail_the_checksum(saved):
    out, _, _ = saved
    weights = out / SAFETENSORS_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="checksum mismatch"):
        load_adapter(load_base(BaseConfig()), out)


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt"])
def test_pickle_files_are_refused(saved, name):
    out, _, _ = saved
    (out / SAFETENSORS_WEIGHTS_NAME).rename(out / name)
    with pytest.raises(AdapterError, match="pickle files are never loaded"):
        read_metadata(out)
    with pytest.raises(AdapterError, match="pickle files are never loaded as adapters"):
        read_metadata(out / name)


def test_saving_again_replaces_the_folder_whole(saved):
    out, model, base = saved
    (out / "stray.txt").write_text("from an older run")
    save_adapter(model, out, base.info, {"lora": CONFIG.to_dict()})
    assert not (out / "stray.txt").exists()
    assert read_metadata(out)["trainable_parameters"] > 0


@pytest.mark.parametrize(("save_dtype", "dtype", "tol"), [("bf16", torch.bfloat16, 5e-2), ("fp16", torch.float16,
                                                                                             5e-3)])
def test_half_precision_file_is_half_the_size_and_loads_into_fp32(saved, tmp_path, save_dtype, dtype, tol):
    out, model, base = saved
    half = save_adapter(model, tmp_path / save_dtype, base.info, {"lora": CONFIG.to_dict()}, save_dtype=save_dtype)
    def data_bytes(folder):  # a safetensors file: 8-byte header length, the JSON header, then the data
        raw = (folder / SAFETENSORS_WEIGHTS_NAME).read_bytes()
        return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]

    assert data_bytes(out) == 4 * read_metadata(out)["trainable_parameters"] == 2 * data_bytes(half)
    assert {t.dtype for t in load_safetensors_file(half / SAFETENSORS_WEIGHTS_NAME).values()} == {dtype}
    loaded = load_adapter(load_base(BaseConfig()), half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    images = image_batch(model)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=tol, rtol=0)


def test_unknown_save_dtype_is_refused_before_writing(saved, tmp_path):
    out, model, base = saved
    with pytest.raises(ValueError, match="save_dtype='fp8'"):
        save_adapter(model, tmp_path / "x", base.info, {"lora": CONFIG.to_dict()}, save_dtype="fp8")
    assert not (tmp_path / "x").exists()
