"""Hub adapters, offline: loading from a pre-filled Hugging Face cache, the push call and its model card."""

from __future__ import annotations

import hashlib
import os

import huggingface_hub
import pytest
import torch
import yaml

from peftclip.adapters.lora import LoraConfig, apply_lora
from peftclip.hub import (
    create_model_card,
    load_adapter_from_hub,
    push_to_hub,
    resolve_adapter,
)
from peftclip.io import AdapterError, save_adapter, save_metrics
from peftclip.models import load_base
from tests.conftest import image_batch

CONFIG = LoraConfig(r=2, lora_alpha=6.0)


@pytest.fixture
def adapter(tmp_path):
    base = load_base()
    model = apply_lora(base.model, CONFIG, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        outputs = model.encode_image(image_batch(model))
    out = save_adapter(model, tmp_path / "adapter", base.info, {"lora": CONFIG.to_dict()})
    save_metrics(out, {"before": {"text_to_image_R@1": 1.5}, "after": {"text_to_image_R@1": 57.25}})
    return out, outputs


def _fill_cache(cache, repo_id, files, revision="main", commit="a" * 40):
    """Lay files out as hf_hub_download does: blobs by hash, snapshot symlinks, a ref to the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_load_by_repo_id_from_offline_cache(adapter, tmp_path, offline):
    folder, outputs = adapter
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    _fill_cache(tmp_path / "cache", "someone/shapes-lora", files)
    _fill_cache(tmp_path / "cache", "someone/shapes-lora", files, revision="v1", commit="b" * 40)
    for revision in (None, "v1"):
        model = load_adapter_from_hub(load_base(), "someone/shapes-lora", revision=revision,
                                      cache_dir=tmp_path / "cache")
        with torch.no_grad():
            assert torch.allclose(model.encode_image(image_batch(model)), outputs, atol=1e-5, rtol=0)


def test_repo_missing_from_offline_cache_names_it(tmp_path, offline):
    with pytest.raises(AdapterError, match="someone/absent is not in the local Hugging Face cache"):
        load_adapter_from_hub(load_base(), "someone/absent", cache_dir=tmp_path / "cache")


def test_pickle_only_repo_is_refused(tmp_path, offline):
    _fill_cache(tmp_path / "cache", "someone/pickled", {"adapter_model.bin": b"\x80\x04pickle",
                                                       "adapter_config.json": b"{}"})
    with pytest.raises(AdapterError, match="pickle weights are never loaded"):
        load_adapter_from_hub(load_base(), "someone/pickled", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "/x"])
def test_bad_repo_id_is_refused(repo_id, tmp_path):
    with pytest.raises(ValueError, match="invalid Hub repo id"):
        push_to_hub(tmp_path, repo_id)


def test_resolve_keeps_local_folders(adapter):
    folder, _ = adapter
    assert resolve_adapter(str(folder)) == folder


def test_push_makes_the_exact_calls_with_card_and_adapter_files(adapter, monkeypatch):
    folder, _ = adapter
    before = sorted(p.name for p in folder.iterdir())
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = kwargs
        calls["uploaded"] = sorted(os.listdir(kwargs["folder_path"]))
        calls["card"] = open(os.path.join(kwargs["folder_path"], "README.md")).read()
        return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = push_to_hub(folder, "someone/shapes-lora", private=True, revision="dev", commit_message="first")
    assert url == "https://hub/commit/1"
    assert calls["create_repo"] == ("someone/shapes-lora", {"private": True, "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "someone/shapes-lora" and upload["revision"] == "dev"
    assert upload["commit_message"] == "first"
    assert set(upload["allow_patterns"]) == {"adapter_config.json", "adapter_model.safetensors",
                                             "peftclip_config.json", "metrics.json", "README.md"}
    assert calls["uploaded"] == sorted(before + ["README.md"])
    assert sorted(p.name for p in folder.iterdir()) == before  # the user's folder is untouched


def test_model_card_front_matter_and_body(adapter):
    folder, _ = adapter
    card = create_model_card(folder, "someone/shapes-lora", license="mit")
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peftclip" and front["base_model"] == "open_clip/peftclip-tiny"
    assert front["license"] == "mit" and {"peftclip", "open_clip", "lora"} <= set(front["tags"])
    trainable = sum(2 * (64 + 64) for _ in range(4 * 4)) + sum(2 * (64 + 256) * 2 for _ in range(4))
    for text in ("peftclip-tiny", "| lora | r | `2` |", "| lora | lora_alpha | `6.0` |", f"{trainable:,}", "KB",
                 "| text_to_image_R@1 | 1.50 | 57.25 |", "load_adapter_from_hub(base, 'someone/shapes-lora')"):
        assert text in card, text
