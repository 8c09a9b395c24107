"""Hub adapters, offline: loading from a pre-filled Hugging Face cache, the push call and its model card."""

from __future__ import annotations

import hashlib
import os
import pickle
import time

import huggingface_hub
import open_clip
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from safetensors.torch import save_file

from peftclip.adapters.lora import ClipLoraConfig, apply_lora
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
from peftclip.models import BaseConfig, load_base
from peftclip.utils import human_size
from tests.conftest import image_batch

CONFIG = ClipLoraConfig(r=2, lora_alpha=6.0)


TRAINING = {"train": {"lr": 0.003, "epochs": 5, "batch_size": 64}, "data": {"source": "/data/captions.csv"}}
METRICS = {"before": {"text_to_image_R@1": 1.5}, "after": {"text_to_image_R@1": 57.25}}
LAION_B32 = {"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
LAION_B32_HUB = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def _save(out, base_info=None, training=TRAINING, metrics=METRICS):
    """A tiny LoRA adapter saved as if trained on `base_info` (default: the tiny base); returns (folder, outputs)."""
    base = load_base()
    model = apply_lora(base.model, CONFIG, init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        outputs = model.encode_image(image_batch(model))
    out = save_adapter(model, out, base_info or base.info, {"lora": CONFIG.to_dict()}, training=training)
    save_metrics(out, metrics)
    return out, outputs


@pytest.fixture
def adapter(tmp_path):
    return _save(tmp_path / "adapter")


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


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def logged_out(monkeypatch, tmp_path):
    """No HF_TOKEN and an empty HF_HOME: huggingface_hub finds no token."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    return tmp_path / "hub_cache"


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


def test_push_makes_the_exact_calls_with_card_and_adapter_files(adapter, online, monkeypatch):
    folder, _ = adapter
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    before = sorted(p.name for p in folder.iterdir())
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        calls["token"] = self.token

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
    assert calls["token"] == "hf_test"
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
    data = ModelCard(card).data.to_dict()
    assert data["library_name"] == "peftclip" and data["license"] == "mit"
    assert {"peftclip", "peft", "open_clip", "clip", "peftclip-tiny", "lora"} <= set(data["tags"])
    assert data["pipeline_tag"] == "feature-extraction"  # a retrieval adapter: no class names
    assert "base_model" not in data  # random weights: no Hub model to point at
    assert "datasets" not in data  # a local file, not a Hub dataset
    trainable = sum(2 * (64 + 64) for _ in range(4 * 4)) + sum(2 * (64 + 256) * 2 for _ in range(4))
    size = human_size((folder / "adapter_model.safetensors").stat().st_size)
    for text in ("**peftclip-tiny** with random weights", "- init_seed: `0`", "| lora | r | `2` |",
                 "| lora | lora_alpha | `6.0` |", f"Trainable parameters: {trainable:,}; adapter file: {size} (fp32)",
                 "| text_to_image_R@1 | 1.50 | 57.25 |", "| lr | `0.003` |", "| data | `captions.csv` |",
                 "base = load_base(BaseConfig(model_name='peftclip-tiny', pretrained=None))",
                 "clip.load_adapter('someone/shapes-lora', 'adapter')"):
        assert text in card, text


# (training recorded, pipeline tag, datasets, model-index dataset type, split, metrics.json's after)
CARD_CASES = [
    ({"data": {"source": "/data/captions.csv"}}, "feature-extraction", None, "captions.csv", None,
     {"text_to_image_R@1": 57.25, "image_to_text_R@5": 80.0}),
    ({"data": {"source": "nlphuji/flickr30k"}}, "feature-extraction", ["nlphuji/flickr30k"], "nlphuji/flickr30k", None,
     {"text_to_image_R@1": 30.5}),
    ({"data": {"source": "uoft-cs/cifar10", "val_split": "test"}, "class_names": ["cat", "dog"]},
     "zero-shot-image-classification", ["uoft-cs/cifar10"], "uoft-cs/cifar10", "test", {"top1": 91.5, "top5": 99.0}),
    ({"data": {"source": "../../shared/data/cifar10"}, "class_names": ["cat", "dog"]},
     "zero-shot-image-classification", None, "cifar10", None, {"top1": 91.5}),
]


@pytest.mark.parametrize(("training", "pipeline_tag", "datasets", "dataset_type", "split", "after"), CARD_CASES)
def test_card_metadata_task_datasets_and_model_index(training, pipeline_tag, datasets, dataset_type, split, after,
                                                     tmp_path):
    folder, _ = _save(tmp_path / "adapter", training=training, metrics={"before": {}, "after": after})
    data = ModelCard(create_model_card(folder, "someone/x")).data.to_dict()
    assert data["pipeline_tag"] == pipeline_tag
    assert data.get("datasets") == datasets
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "someone/x"
    assert {r.metric_type: r.metric_value for r in results} == after
    assert {(r.task_type, r.dataset_type, r.dataset_name, r.dataset_split) for r in results} == {
        (pipeline_tag, dataset_type, dataset_type, split)}


def test_card_without_metrics_has_no_model_index(tmp_path):
    folder, _ = _save(tmp_path / "adapter")
    (folder / "metrics.json").unlink()
    card = create_model_card(folder, "someone/x")
    assert "model-index" not in ModelCard(card).data.to_dict() and "No metrics were recorded." in card


@pytest.mark.parametrize(("base", "hub_id"), [
    (LAION_B32, LAION_B32_HUB),
    ({"model_name": "ViT-B-32", "pretrained": "openai"}, "timm/vit_base_patch32_clip_224.openai"),
    ({"model_name": "ViTamin-S", "pretrained": "datacomp1b"}, "jienengchen/ViTamin-S"),  # hf_hub names a file
    ({"model_name": "hf-hub:someone/my-clip", "pretrained": None}, "someone/my-clip"),
    ({"model_name": "ViT-B-32", "pretrained": "w.safetensors", "weights_sha256": "ab" * 32}, None),
    ({"model_name": "peftclip-tiny", "pretrained": None, "init_seed": 0}, None),
])
def test_base_model_is_the_hub_id_open_clip_knows(base, hub_id):
    assert hub_base_model(base) == hub_id


def test_card_of_a_pretrained_base_points_at_its_hub_repo(tmp_path):
    folder, _ = _save(tmp_path / "adapter", base_info=LAION_B32)
    card = create_model_card(folder, "someone/b32-lora")
    data = ModelCard(card).data.to_dict()
    assert data["base_model"] == LAION_B32_HUB
    assert f"base_model:adapter:{LAION_B32_HUB}" in data["tags"]
    assert "with pretrained weights `laion2b_s34b_b79k`" in card
    assert "pretrained='laion2b_s34b_b79k'" in card


def test_card_license_is_the_bases_when_open_clip_records_one(tmp_path, monkeypatch):
    folder, _ = _save(tmp_path / "adapter", base_info=LAION_B32)
    get_cfg = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: {**get_cfg(model, tag), "license": "mit"})
    assert ModelCard(create_model_card(folder, "someone/x", license="apache-2.0")).data.license == "mit"


def test_card_shows_no_absolute_local_path(tmp_path):
    weights = tmp_path / "home" / "me" / "weights.safetensors"
    weights.parent.mkdir(parents=True)
    save_file(load_base().model.state_dict(), weights)
    base = load_base(BaseConfig(pretrained=str(weights)))
    source = tmp_path / "home" / "me" / "flickr" / "captions.csv"
    training = {"train": {"output_dir": str(tmp_path / "out"), "lr": 0.003},
                "data": {"source": str(source), "val_split": "test"}}
    folder, _ = _save(tmp_path / "adapter", base_info=base.info, training=training)
    card = create_model_card(folder, "someone/x")
    for path in (str(tmp_path), "/home", "/root", "/tmp"):
        assert path not in card, path
    assert "| data | `captions.csv` |" in card and "- pretrained: `weights.safetensors`" in card


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
    clip.load_adapter(resolve_adapter("someone/booby-trapped", cache_dir=tmp_path / "cache"), "trap")
    assert torch.allclose(clip.encode_images(image_batch(clip.model), normalize=False), outputs, atol=1e-5)
    assert not marker.exists()


def test_adapted_clip_and_cli_take_repo_ids_from_the_offline_cache(adapter, tmp_path, offline, monkeypatch, capsys):
    folder, outputs = adapter
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _fill_cache(tmp_path / "cache", "someone/shapes-lora", {p.name: p.read_bytes() for p in folder.iterdir()},
                revision="v2", commit="c" * 40)
    clip = AdaptedCLIP(load_base())
    clip.load_adapter("someone/shapes-lora", "shapes", revision="v2")
    assert torch.allclose(clip.encode_images(image_batch(clip.model), normalize=False), outputs, atol=1e-5)
    assert main(["info", "someone/shapes-lora", "--revision", "v2"]) == 0
    assert "lora: blocks=all" in capsys.readouterr().out
    assert main(["info", "someone/shapes-lora"]) == 2  # only v2 is cached
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_push_offline_is_one_line_error_before_any_upload(adapter, offline, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("tried to reach the Hub"))
    assert main(["push", str(adapter[0]), "someone/x"]) == 2
    assert capsys.readouterr().err == "error: offline (HF_HUB_OFFLINE=1): cannot push; unset HF_HUB_OFFLINE to upload\n"


def test_push_without_a_token_says_how_to_log_in(adapter, online, logged_out, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("tried to reach the Hub"))
    assert main(["push", str(adapter[0]), "someone/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not logged in: run `hf auth login`") and "HF_TOKEN" in err and err.count("\n") == 1


@pytest.mark.parametrize(("name", "content"), [
    ("weights.safetensors", b"not weights, just text\n"),
    ("empty.safetensors", b""),
    ("weights.pt", b"not weights, just text\n"),
    ("notes.txt", b"not weights, just text\n"),
])
def test_pretrained_file_that_is_not_weights_is_named(name, content, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a bare file name, as typed on the command line
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"^not a weights file: {name} "):
        load_base(BaseConfig(pretrained=name))
    assert main(["eval", "--model-name", "peftclip-tiny", "--pretrained", name, "--source", "data.csv"]) == 2
    assert capsys.readouterr().err.startswith(f"error: not a weights file: {name} ")


@pytest.mark.parametrize("save", [save_file, torch.save])
def test_pretrained_weights_files_still_load(save, tmp_path):
    reference = load_base(BaseConfig(init_seed=3)).model
    save(reference.state_dict(), tmp_path / "w.safetensors" if save is save_file else tmp_path / "w.pt")
    path = next(tmp_path.glob("w.*"))
    loaded = load_base(BaseConfig(pretrained=str(path))).model
    assert torch.equal(loaded.text_projection, reference.text_projection)


def test_uncached_pretrained_tag_fails_at_once_offline(offline, empty_hub_cache):
    start = time.monotonic()
    with pytest.raises(OSError, match="^pretrained weights for ViT-B-32/openai are not in the Hugging Face cache "
                                      "and HF_HUB_OFFLINE is set"):
        load_base(BaseConfig(model_name="ViT-B-32", pretrained="openai"))
    assert time.monotonic() - start < 3  # no model built, no network waited on


def _no_network(*args, **kwargs):
    raise OSError("sentinel: open_clip was called")


def test_uncached_pretrained_tag_says_what_it_fetches_online(online, empty_hub_cache, monkeypatch, capsys):
    monkeypatch.setattr(open_clip, "create_model_and_transforms", _no_network)
    with pytest.raises(RuntimeError, match="sentinel"):
        load_base(BaseConfig(model_name="ViT-B-32", pretrained="openai"))
    assert capsys.readouterr().err == ("fetching pretrained weights for ViT-B-32/openai from the Hugging Face Hub "
                                       "(timm/vit_base_patch32_clip_224.openai)\n")


def test_cached_pretrained_tag_goes_to_open_clip_offline(offline, empty_hub_cache, monkeypatch, capsys):
    _fill_cache(empty_hub_cache, "timm/vit_base_patch32_clip_224.openai", {"open_clip_model.safetensors": b"w"})
    monkeypatch.setattr(open_clip, "create_model_and_transforms", _no_network)
    with pytest.raises(RuntimeError, match="sentinel"):
        load_base(BaseConfig(model_name="ViT-B-32", pretrained="openai"))
    assert capsys.readouterr().err == ""
