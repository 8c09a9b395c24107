"""Hub adapters, offline: loading from a pre-filled Hugging Face cache, the push call and its model card."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import huggingface_hub
import pytest
import torch
import yaml

from peftclip.adapters.lora import LoraConfig, apply_lora
from peftclip.cli import main
from peftclip.hub import (
    create_model_card,
    hub_base_model,
    load_adapter_from_hub,
    push_to_hub,
    resolve_adapter,
)
from peftclip.inference import AdaptedCLIP
from peftclip.io import AdapterError, save_adapter, save_metrics
from peftclip.models import load_base
from peftclip.utils import human_size
from tests.conftest import image_batch

CONFIG = LoraConfig(r=2, lora_alpha=6.0)


@pytest.fixture
def adapter(tmp_path):
    base = load_base()
    model = apply_lora(base.model, CONFIG, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        outputs = model.encode_image(image_batch(model))
    training = {"train": {"lr": 0.003, "epochs": 5, "batch_size": 64}, "data": {"source": "/data/captions.csv"}}
    out = save_adapter(model, tmp_path / "adapter", base.info, {"lora": CONFIG.to_dict()}, training=training)
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
    assert front["library_name"] == "peftclip" and front["license"] == "mit"
    assert {"peftclip", "open_clip", "peftclip-tiny", "lora"} <= set(front["tags"])
    assert "base_model" not in front  # random weights: no Hub model to point at
    trainable = sum(2 * (64 + 64) for _ in range(4 * 4)) + sum(2 * (64 + 256) * 2 for _ in range(4))
    size = human_size((folder / "adapter_model.safetensors").stat().st_size)
    for text in ("**peftclip-tiny** with random weights", "- init_seed: `0`", "| lora | r | `2` |",
                 "| lora | lora_alpha | `6.0` |", f"Trainable parameters: {trainable:,}; adapter file: {size} (fp32)",
                 "| text_to_image_R@1 | 1.50 | 57.25 |", "| lr | `0.003` |", "| data | `captions.csv` |",
                 "base = load_base(BaseConfig(model_name='peftclip-tiny', pretrained=None))",
                 "clip.add_adapter('adapter', 'someone/shapes-lora')"):
        assert text in card, text


@pytest.mark.parametrize(("base", "hub_id"), [
    ({"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    ({"model_name": "ViT-B-32", "pretrained": "openai"}, "timm/vit_base_patch32_clip_224.openai"),
    ({"model_name": "hf-hub:someone/my-clip", "pretrained": None}, "someone/my-clip"),
    ({"model_name": "ViT-B-32", "pretrained": "w.safetensors", "weights_sha256": "ab" * 32}, None),
    ({"model_name": "peftclip-tiny", "pretrained": None, "init_seed": 0}, None),
])
def test_base_model_is_the_hub_id_open_clip_knows(base, hub_id):
    assert hub_base_model(base) == hub_id


def test_card_of_a_pretrained_base_points_at_its_hub_repo(adapter, tmp_path):
    folder, _ = adapter
    metadata = json.loads((folder / "peftclip_config.json").read_text())
    metadata["base"] = {"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    (folder / "peftclip_config.json").write_text(json.dumps(metadata))
    card = create_model_card(folder, "someone/b32-lora")
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert "with pretrained weights `laion2b_s34b_b79k`" in card
    assert "pretrained='laion2b_s34b_b79k'" in card


def test_nothing_in_a_downloaded_repo_is_executed(adapter, tmp_path, offline):
    """A repo with a pickle that runs code when unpickled, and a Python file, beside the real adapter."""
    folder, outputs = adapter
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["pytorch_model.bin"] = pickle.dumps(Payload())
    files["adapter_model.bin"] = pickle.dumps(Payload())
    files["modeling.py"] = f"open({str(marker)!r}, 'w')\n".encode()
    _fill_cache(tmp_path / "cache", "someone/booby-trapped", files)
    clip = AdaptedCLIP(load_base())
    clip.add_adapter("trap", resolve_adapter("someone/booby-trapped", cache_dir=tmp_path / "cache"))
    assert torch.allclose(clip.encode_images(image_batch(clip.model), normalize=False), outputs, atol=1e-5)
    assert not marker.exists()


def test_adapted_clip_and_cli_take_repo_ids_from_the_offline_cache(adapter, tmp_path, offline, monkeypatch, capsys):
    folder, outputs = adapter
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _fill_cache(tmp_path / "cache", "someone/shapes-lora", {p.name: p.read_bytes() for p in folder.iterdir()},
                revision="v2", commit="c" * 40)
    clip = AdaptedCLIP(load_base())
    clip.add_adapter("shapes", "someone/shapes-lora", revision="v2")
    assert torch.allclose(clip.encode_images(image_batch(clip.model), normalize=False), outputs, atol=1e-5)
    assert main(["info", "someone/shapes-lora", "--revision", "v2"]) == 0
    assert "lora: blocks=all" in capsys.readouterr().out
    assert main(["info", "someone/shapes-lora"]) == 2  # only v2 is cached
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
